"""Torch-facing kernel ops of cm3rt.

Every op takes torch tensors, hands them to the compiled kernels in ``cm3rt._C`` through
DLPack (no torch headers in the extension, so no ABI lock to a torch version), and runs on
the tensors' device: the CPU kernels, or the CUDA kernels on the current CUDA stream. Output
tensors are allocated here (the kernels never allocate), or passed in with ``out=``.

Contracts are those of DESIGN.md ("Kernel contracts"); each function's docstring restates
the part a caller needs.
"""

from __future__ import annotations

import math

import torch
from torch.utils.dlpack import to_dlpack

from cm3rt._ext import _C

__all__ = [
    "kv_append",
    "paged_attention",
    "paged_attention_workspace",
    "build_info",
    "cuda_available",
]


def build_info() -> dict:
    """What the extension was built with: CUDA yes/no, architectures, CPU SIMD level."""
    return {
        "cuda": _C.built_with_cuda(),
        "cuda_archs": _C.cuda_archs(),
        "cuda_devices": _C.cuda_device_count(),
        "simd": _C.simd_level(),
        "summary": _C.build_info(),
    }


def cuda_available() -> bool:
    """True when the CUDA kernels are compiled in and a device is visible to them."""
    return _C.built_with_cuda() and _C.cuda_device_count() > 0


def _dl(t: torch.Tensor):
    # to_dlpack is ~10x cheaper than t.__dlpack__(); detach() drops autograd (no copy).
    return to_dlpack(t.detach() if t.requires_grad else t)


def _dl_opt(t: torch.Tensor | None):
    return None if t is None else _dl(t)


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _require_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    return t


def kv_append(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    *,
    validate: bool = False,
) -> None:
    """Write ``k, v [T, Hkv, D]`` into the paged caches ``[NB, BS, Hkv, D]``.

    Token ``t`` goes to block ``slots[t] // BS``, offset ``slots[t] % BS``; a slot of -1 is
    skipped (padding). ``slots`` is int32 ``[T]``. CPU slots are always range-checked; CUDA
    slots with ``validate=True`` (synchronises), and the CUDA kernel skips any slot out of
    range, so a bad slot can never write out of bounds.
    """
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("slots", slots)):
        _require_tensor(name, t)
    _C.kv_append(_dl(k), _dl(v), _dl(k_cache), _dl(v_cache), _dl(slots), validate, _stream(k))


def paged_attention_workspace(
    q: torch.Tensor, num_seqs: int, max_q_len: int, max_seq_len: int
) -> torch.Tensor | None:
    """Scratch for the CUDA split-KV decode path (None on CPU or when no split is planned).

    Allocate it once per batch shape and pass it as ``workspace=`` to keep a decode step free
    of allocations (for CUDA-graph capture).
    """
    if not q.is_cuda:
        return None
    sm = _C.cuda_sm_count(q.device.index or 0)
    nbytes = _C.paged_attention_workspace_bytes(
        q.shape[0], num_seqs, q.shape[1], q.shape[2], max_q_len, max_seq_len, sm
    )
    return torch.empty(nbytes, dtype=torch.uint8, device=q.device) if nbytes else None


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float | None = None,
    causal: bool = True,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    *,
    max_q_len: int | None = None,
    max_seq_len: int | None = None,
    workspace: torch.Tensor | None = None,
    validate: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed variable-length queries over a paged KV cache.

    Args:
        q: ``[T, H, D]`` queries of all sequences, packed (last dim contiguous).
        k_cache, v_cache: ``[NB, BS, Hkv, D]`` paged caches; ``H % Hkv == 0`` (GQA).
        block_tables: int32 ``[B, MB]``: key position ``j`` of sequence ``b`` lives in block
            ``block_tables[b, j // BS]`` at offset ``j % BS``.
        seq_lens: int32 ``[B]``: keys of each sequence, this step's new tokens included.
        cu_seqlens_q: int32 ``[B + 1]``: sequence ``b`` owns query rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``, the last ``q_len_b`` of its keys.
        scale: softmax scale, default ``1 / sqrt(D)``.
        causal: query ``i`` of ``b`` sees keys ``<= seq_lens[b] - q_len_b + i``.
        out: optional ``[T, H, D]`` output (same dtype as ``q``).
        return_lse: also return the natural-log log-sum-exp ``[T, H]`` (float32).
        max_q_len, max_seq_len: host-side upper bounds for the CUDA launch planner (computed
            from the shapes when omitted; pass them to avoid over-provisioned grids).
        workspace: CUDA split-KV scratch from :func:`paged_attention_workspace`.
        validate: range-check CUDA index tensors on the host (synchronises). CPU index tensors
            are always checked.

    A mix of prefill, chunked prefill after a cached prefix and decode rows (q_len 1) is one
    call. Softmax and accumulation are fp32.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("block_tables", block_tables), ("seq_lens", seq_lens),
                    ("cu_seqlens_q", cu_seqlens_q)):
        _require_tensor(name, t)
    if q.dim() != 3:
        raise ValueError(f"paged_attention: argument 'q' must be [T, H, D], got shape {tuple(q.shape)}")
    T, H, D = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if out is None:
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((T, H), dtype=torch.float32, device=q.device) if return_lse else None
    num_seqs = block_tables.shape[0] if block_tables.dim() == 2 else 0
    mq = -1 if max_q_len is None else int(max_q_len)
    ms = -1 if max_seq_len is None else int(max_seq_len)
    if q.is_cuda and workspace is None:
        workspace = paged_attention_workspace(
            q, num_seqs, T if mq < 0 else mq,
            (block_tables.shape[1] * k_cache.shape[1]) if ms < 0 else ms,
        )
    _C.paged_attention(
        _dl(q), _dl(k_cache), _dl(v_cache), _dl(block_tables), _dl(seq_lens),
        _dl(cu_seqlens_q), _dl(out), _dl_opt(lse), float(scale), bool(causal), mq, ms,
        _dl_opt(workspace), validate, _stream(q),
    )
    return (out, lse) if return_lse else out
