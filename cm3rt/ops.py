"""Torch-facing kernel ops of cm3rt.

Every op takes torch tensors, hands them to the compiled kernels in ``cm3rt._C`` through
DLPack (no torch headers in the extension, so no ABI lock to a torch version), and runs on
the tensors' device: the CPU kernels, or the CUDA kernels on the current CUDA stream. Output
tensors are allocated here (the kernels never allocate), or passed in with ``out=``.

Contracts are those of docs/DESIGN.md ("Kernel contracts"); each function's docstring restates
the part a caller needs.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Sequence

import torch
from torch.utils.dlpack import to_dlpack

from cm3rt import _ext
from cm3rt._ext import _C

__all__ = [
    "SAMPLE_MODES",
    "CpuDecoder",
    "build_info",
    "cuda_available",
    "emulated",
    "emulating",
    "kv_append",
    "linear",
    "linear_cpu_kernel",
    "linear_cpu_kernels",
    "linear_pack",
    "linear_packed",
    "linear_packed_is_fast",
    "linear_unpack",
    "pack_allowed_bits",
    "paged_attention",
    "paged_attention_workspace",
    "qk_norm_rope",
    "quantize_int8",
    "rms_norm",
    "sample_logits",
    "swiglu",
    "vq_embed",
    "vq_nearest",
]


def build_info() -> dict:
    """What the extension was built with: CUDA yes/no, architectures, CPU SIMD level, and
    the CPU linear kernels this machine can run (:func:`linear_cpu_kernels`)."""
    return {
        "cuda": _C.built_with_cuda(),
        "cuda_archs": _C.cuda_archs(),
        "cuda_devices": _C.cuda_device_count(),
        "simd": _C.simd_level(),
        "linear_cpu_kernels": list(_C.linear_cpu_kernels()),
        "summary": _C.build_info(),
    }


def cuda_available() -> bool:
    """True when the CUDA kernels are compiled in and a device is visible to them."""
    return _C.built_with_cuda() and _C.cuda_device_count() > 0


@contextlib.contextmanager
def emulated(enabled: bool = True) -> Iterator[None]:
    """Within the block, every op runs the CUDA kernels under the CPU emulator: CPU tensors
    go through the CUDA path of the bindings (validation, launch planning, the kernels) with
    host memory as device memory, and the emulator checks each access (memcheck, racecheck,
    initcheck, synccheck; a finding raises RuntimeError). For tests (``device="emu"``) and
    for debugging a kernel without a GPU; needs ``tools/cuda_emu/build.sh``. Not thread-safe:
    it swaps the module's kernel table. ``emulated(False)`` runs the native kernels again
    inside an emulated block (to compare the two)."""
    global _C
    saved = _C
    _C = _ext.load_emulator() if enabled else _ext._C
    try:
        yield
    finally:
        _C = saved


def emulating() -> bool:
    """True inside :func:`emulated` (the ops run the CUDA kernels under the emulator)."""
    return bool(_C.EMULATED)


def _on_device(t: torch.Tensor) -> bool:
    """True when the kernels treat `t` as device memory: a CUDA tensor, or any under
    :func:`emulated`."""
    return t.is_cuda or _C.EMULATED


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
    if not _on_device(q):
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
    if _on_device(q) and workspace is None:
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


# ---- sampling -----------------------------------------------------------------------------------

#: Combine modes of :func:`sample_logits` and their ids (for per-group ``mode`` tensors).
#: Built from the extension's own table, so the names can never drift from the C++ enum.
SAMPLE_MODES: dict[str, int] = {name: i for i, name in enumerate(_C.SAMPLE_MODE_NAMES)}

_GroupValue = int | float | torch.Tensor


def _group_value(name: str, value, kind: str, dtype: torch.dtype, device: torch.device):
    """A per-group argument as the kernel takes it: a Python number, or a [G] tensor of
    ``dtype`` on ``device`` (converted when it is not already)."""
    if isinstance(value, torch.Tensor):
        if value.dtype == dtype and value.dim() == 1 and value.device == device and \
                value.is_contiguous():
            return value  # as the kernel takes it (the engine's step: every argument)
        if kind == "int" and (value.is_floating_point() or value.is_complex()):
            raise TypeError(f"sample_logits: argument '{name}' must be an integer tensor, "
                            f"got {value.dtype}")
        if value.dim() == 0 and value.device.type == "cpu":
            return value.item()
        if value.dim() != 1:
            raise ValueError(f"sample_logits: argument '{name}' must be a number or a [G] tensor, "
                             f"got shape {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype).contiguous()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"sample_logits: argument '{name}' must be a number or a [G] tensor, "
                        f"got {type(value).__name__}")
    if kind == "int":
        if not isinstance(value, numbers.Integral):
            raise TypeError(f"sample_logits: argument '{name}' must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _mode_value(mode, device: torch.device):
    if isinstance(mode, str):
        if mode not in SAMPLE_MODES:
            raise ValueError(f"sample_logits: argument 'mode' must be one of "
                             f"{sorted(SAMPLE_MODES)}, got {mode!r}")
        return SAMPLE_MODES[mode]
    if isinstance(mode, (list, tuple)):
        ids = []
        for i, m in enumerate(mode):
            if m not in SAMPLE_MODES:
                raise ValueError(f"sample_logits: argument 'mode'[{i}] must be one of "
                                 f"{sorted(SAMPLE_MODES)}, got {m!r}")
            ids.append(SAMPLE_MODES[m])
        return torch.tensor(ids, dtype=torch.int32, device=device)
    if isinstance(mode, torch.Tensor):
        return _group_value("mode", mode, "int", torch.int32, device)
    raise TypeError(f"sample_logits: argument 'mode' must be a mode name, a list of names or an "
                    f"int [G] tensor, got {type(mode).__name__}")


def _to_dl_or_number(v):
    return _dl(v) if isinstance(v, torch.Tensor) else v


def sample_logits(
    logits: torch.Tensor,
    streams: int | torch.Tensor = 1,
    *,
    mode: str | Sequence[str] | torch.Tensor = "none",
    temperature: _GroupValue = 1.0,
    top_k: _GroupValue = 0,
    top_p: _GroupValue = 1.0,
    cfg_scale: _GroupValue = 1.0,
    cfg_image_scale: _GroupValue = 1.0,
    cd_alpha: _GroupValue = 0.1,
    cd_k: _GroupValue = 1,
    allowed: torch.Tensor | None = None,
    allowed_bits: torch.Tensor | None = None,
    seed: int | torch.Tensor,
    step: int | torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per group of streams from ``logits [R, V]`` (one fused op per step).

    Rows of a group are adjacent: cond, [image-cond,] uncond. Per group (docs/DESIGN.md, "Kernel contracts", steps 1-6):
    allowed-token mask -> combine (``none``: c; ``cfg``: u + s*(c - u); ``cfg3``:
    u + s_img*(i - u) + s_txt*(c - i); ``cdk``: log_softmax(c) - log_softmax(u) on tokens with
    p_c >= alpha * (k-th largest p_c)) -> temperature (0 = argmax, lowest id on ties) -> top-k
    (keep z >= k-th largest; ties kept) -> top-p (keep tokens whose mass strictly above them is
    < p; ties kept together) -> draw by inverse CDF in token-id order with one 64-bit uniform of
    Philox4x32-10 keyed by (seed, step). The same group with the same seed and step gives the
    same token whatever else is in the batch, on CPU and CUDA alike.

    Args:
        logits: ``[R, V]`` float32 / bfloat16 / float16, last dim contiguous.
        streams: rows per group, 1..3: an int (``R % streams == 0``), or an int ``[G]`` tensor
            (groups packed back to back; the counts sum to ``R``). ``none`` takes 1 or more
            (reads the cond row only), ``cfg`` and ``cdk`` take 2, ``cfg3`` takes 3.
        mode: ``"none" | "cfg" | "cfg3" | "cdk"``, a list of names, or an int ``[G]`` tensor
            of :data:`SAMPLE_MODES` ids.
        temperature, top_k, top_p, cfg_scale (s / s_txt), cfg_image_scale (s_img), cd_alpha,
        cd_k: a number or a ``[G]`` tensor each. ``top_k == 0`` and ``top_p == 1`` are off.
        allowed: bool ``[V]`` or ``[G, V]``: tokens that may be drawn (others are -inf in
            every stream). allowed_bits: the same as packed int32 ``[ceil(V/32)]`` or
            ``[G, ceil(V/32)]`` (bit ``j % 32`` of word ``j // 32``). At most one of the two.
        seed, step: int64 numbers or ``[G]`` tensors; the key of each group's draw.
        out: optional preallocated ``(tokens int64 [G], logprobs float32 [G])``.
        validate: for CUDA, range-check ``[G]`` tensor arguments on the host (synchronises).
            CPU arguments are always checked; numbers always.

    Returns:
        ``(tokens int64 [G], logprobs float32 [G])``; logprob is the log-probability of the
        token under the final (filtered, renormalised) distribution, 0 for argmax groups.
        A group with no allowed finite token, or with NaN / +inf in a row it reads, gets token
        -1 and logprob NaN (the rest of the batch is unaffected). A token whose weight is below
        2^-40 of the most likely token's is never drawn (fixed-point mass).
    """
    _require_tensor("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"sample_logits: argument 'logits' must be [R, V], got shape "
                         f"{tuple(logits.shape)}")
    dev = logits.device
    if isinstance(streams, torch.Tensor):
        streams_v = _group_value("streams", streams, "int", torch.int32, dev)
        if not isinstance(streams_v, torch.Tensor):
            streams_v = int(streams_v)
    else:
        streams_v = _group_value("streams", streams, "int", torch.int32, dev)
    if isinstance(streams_v, torch.Tensor):
        G = streams_v.shape[0]
    else:
        if streams_v < 1 or streams_v > 3:
            raise ValueError(f"sample_logits: argument 'streams' must be 1, 2 or 3, got {streams_v}")
        if logits.shape[0] % streams_v:
            raise ValueError(f"sample_logits: rows of 'logits' R = {logits.shape[0]} are not "
                             f"divisible by streams = {streams_v}")
        G = logits.shape[0] // streams_v
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    args = {
        "mode": _mode_value(mode, dev),
        "temperature": _group_value("temperature", temperature, "float", f32, dev),
        "top_k": _group_value("top_k", top_k, "int", i32, dev),
        "top_p": _group_value("top_p", top_p, "float", f32, dev),
        "cfg_scale": _group_value("cfg_scale", cfg_scale, "float", f32, dev),
        "cfg_image_scale": _group_value("cfg_image_scale", cfg_image_scale, "float", f32, dev),
        "cd_alpha": _group_value("cd_alpha", cd_alpha, "float", f32, dev),
        "cd_k": _group_value("cd_k", cd_k, "int", i32, dev),
        "seed": _group_value("seed", seed, "int", i64, dev),
        "step": _group_value("step", step, "int", i64, dev),
    }
    for name in ("allowed", "allowed_bits"):
        m = allowed if name == "allowed" else allowed_bits
        if m is not None:
            _require_tensor(name, m)
    if out is None:
        tokens = torch.empty(G, dtype=torch.int64, device=dev)
        logprobs = torch.empty(G, dtype=torch.float32, device=dev)
    else:
        tokens, logprobs = out
        _require_tensor("out[0]", tokens)
        _require_tensor("out[1]", logprobs)
    _C.sample_logits(
        _dl(logits), _to_dl_or_number(streams_v),
        *(_to_dl_or_number(args[k]) for k in ("mode", "temperature", "top_k", "top_p",
                                              "cfg_scale", "cfg_image_scale", "cd_alpha", "cd_k",
                                              "seed", "step")),
        _dl_opt(allowed), _dl_opt(allowed_bits), _dl(tokens), _dl(logprobs), bool(validate),
        _stream(logits),
    )
    return tokens, logprobs


def pack_allowed_bits(allowed: torch.Tensor) -> torch.Tensor:
    """Packs a bool ``[..., V]`` mask into int32 ``[..., ceil(V/32)]`` words for
    ``sample_logits(allowed_bits=...)``: token ``j`` is bit ``j % 32`` of word ``j // 32``."""
    _require_tensor("allowed", allowed)
    if allowed.dtype != torch.bool:
        raise TypeError(f"pack_allowed_bits: argument 'allowed' must be bool, got {allowed.dtype}")
    V = allowed.shape[-1]
    W = (V + 31) // 32
    padded = torch.zeros(*allowed.shape[:-1], W * 32, dtype=torch.int64, device=allowed.device)
    padded[..., :V] = allowed.to(torch.int64)
    weights = torch.bitwise_left_shift(
        torch.ones(32, dtype=torch.int64, device=allowed.device),
        torch.arange(32, device=allowed.device))
    words = (padded.view(*allowed.shape[:-1], W, 32) * weights).sum(-1)
    # two's complement wrap into int32 (bit 31 set -> negative)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


# ---- VQ codebook --------------------------------------------------------------------------------


def vq_nearest(
    z: torch.Tensor,
    codebook: torch.Tensor,
    codebook_sqnorm: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Index of the nearest code for every row: ``argmin_j ||z_i - e_j||^2``.

    Fused distance + argmin (no ``[N, K]`` distance matrix is ever formed), ties to the
    lowest ``j``. Scores are ``||e_j||^2 - 2 z_i . e_j`` in float32; a row without a finite
    score (NaN or inf in ``z``) gets -1.

    Args:
        z: ``[N, C]`` (last dim contiguous); float32 on CPU, float32 / bfloat16 / float16 on
            CUDA.
        codebook: ``[K, C]``, same dtype and device as ``z``.
        codebook_sqnorm: optional float32 ``[K]`` of ``||e_j||^2``; computed by the kernel when
            omitted (pass it when the codebook is reused, to save that work).
        out: optional int64 ``[N]`` output.

    Returns:
        int64 ``[N]`` code indices.
    """
    _require_tensor("z", z)
    _require_tensor("codebook", codebook)
    if z.dim() != 2:
        raise ValueError(f"vq_nearest: argument 'z' must be [N, C], got shape {tuple(z.shape)}")
    if out is None:
        out = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    _C.vq_nearest(_dl(z), _dl(codebook), _dl_opt(codebook_sqnorm), _dl(out), _stream(z))
    return out


def vq_embed(
    idx: torch.Tensor,
    codebook: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """Code vectors of ``idx``: ``out[..., :] = codebook[idx[...], :]`` (shape ``idx.shape +
    (C,)``, the codebook's dtype).

    ``idx`` is int32 or int64 of any shape. CPU indices are always range-checked (ValueError
    naming the position); CUDA ones with ``validate=True`` (synchronises); an out-of-range
    CUDA index yields a zero row, never an out-of-bounds read.
    """
    _require_tensor("idx", idx)
    _require_tensor("codebook", codebook)
    if codebook.dim() != 2:
        raise ValueError(f"vq_embed: argument 'codebook' must be [K, C], got shape "
                         f"{tuple(codebook.shape)}")
    if out is None:
        out = torch.empty(*idx.shape, codebook.shape[1], dtype=codebook.dtype,
                          device=codebook.device)
    _C.vq_embed(_dl(idx.contiguous()), _dl(codebook), _dl(out), bool(validate), _stream(codebook))
    return out


# ---- fused layer ops (CPU) --------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
             residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight * x / rms(x)`` per row of ``x [T, H]`` (fp32 statistics, rounded as
    :func:`cm3rt.model.layers.rms_norm`). With ``residual [T, H]``: first ``residual += x``
    in place (HF's residual add), and the norm is of that sum. CPU only."""
    _require_tensor("x", x)
    _require_tensor("weight", weight)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _C.rms_norm(_dl(x), _dl(weight), _dl_opt(residual), _dl(out), float(eps))
    return out


def qk_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, q_bias: torch.Tensor,
                 k_weight: torch.Tensor, k_bias: torch.Tensor, positions: torch.Tensor,
                 inv_freq: torch.Tensor, eps: float) -> torch.Tensor:
    """In place on the fused projection ``qkv [T, (Hq + 2 Hkv) * D]`` (q heads, k heads, v
    heads): per-head LayerNorm with the ``[H, D]`` affine, then RoPE at ``positions [T]``
    (int64) with ``inv_freq [D/2]`` (float32), on the q and k heads; v is untouched. Same
    rounding as :func:`cm3rt.model.layers.qk_layer_norm` + :func:`apply_rope`. CPU only;
    returns ``qkv``."""
    for name, t in (("qkv", qkv), ("q_weight", q_weight), ("q_bias", q_bias),
                    ("k_weight", k_weight), ("k_bias", k_bias), ("positions", positions),
                    ("inv_freq", inv_freq)):
        _require_tensor(name, t)
    _C.qk_norm_rope(_dl(qkv), _dl(q_weight), _dl(q_bias), _dl(k_weight), _dl(k_bias),
                    _dl(positions), _dl(inv_freq), float(eps))
    return qkv


def swiglu(gate_up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up [T, 2I]`` (gate first) -> ``[T, I]``, rounded as
    :func:`cm3rt.model.layers.swiglu`. CPU only."""
    _require_tensor("gate_up", gate_up)
    if out is None:
        out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype,
                          device=gate_up.device)
    _C.swiglu(_dl(gate_up), _dl(out))
    return out


# ---- linear -------------------------------------------------------------------------------


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ weight [N, K]^T`` (``* scales [N]`` per output channel for int8 weights)
    with fp32 accumulation, streaming every weight row once per call.

    For the few rows of a decode step (M <= 64, one per stream) this is bound by reading the
    weights; activations are float32 or bfloat16 (``out`` has their dtype), weights float32,
    bfloat16 or int8 (weight-only, symmetric per-channel: see :func:`quantize_int8`).
    """
    _require_tensor("x", x)
    _require_tensor("weight", weight)
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"linear: arguments 'x' [M, K] and 'weight' [N, K] must be 2-D, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if out is None:
        out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _C.linear(_dl(x), _dl(weight), _dl_opt(scales), _dl(out), _stream(x))
    return out


PANEL_CHANNELS = 16  # output channels per panel of a packed weight (csrc/linear/linear.h)


def _panel_group(dtype: torch.dtype) -> int:
    return 1 if dtype == torch.float32 else 2


def linear_pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` (float32, bfloat16 or int8) regrouped for :func:`linear_packed`:
    ``[ceil(N / 16), ceil(K / g), 16 g]`` with ``packed[p, kk, c g + i] = weight[16 p + c,
    g kk + i]`` (zero past N and K; g = 1 for float32, 2 for bfloat16 and int8). One vector
    of a panel holds 16 output channels' next g elements of K, so the CPU kernel multiplies
    each weight vector by a broadcast x value of up to 8 rows at once (6 with AVX2). Made
    once at load; :func:`linear_unpack` inverts it."""
    _require_tensor("weight", weight)
    if weight.dim() != 2 or weight.dtype not in (torch.float32, torch.bfloat16, torch.int8):
        raise ValueError(f"linear_pack: argument 'weight' must be a float32 / bfloat16 / int8 "
                         f"[N, K] matrix, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    g = _panel_group(weight.dtype)
    panels, steps = -(-n // PANEL_CHANNELS), -(-k // g)
    padded = torch.zeros(panels * PANEL_CHANNELS, steps * g, dtype=weight.dtype)
    padded[:n, :k] = weight.detach().cpu()
    grouped = padded.view(panels, PANEL_CHANNELS, steps, g).permute(0, 2, 1, 3)
    return grouped.contiguous().view(panels, steps, PANEL_CHANNELS * g)


def linear_unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The ``[n, k]`` weight that :func:`linear_pack` regrouped into ``packed`` (a new
    contiguous tensor)."""
    _require_tensor("packed", packed)
    if packed.dim() != 3 or packed.dtype not in (torch.float32, torch.bfloat16, torch.int8):
        raise ValueError(f"linear_unpack: argument 'packed' must be a float32 / bfloat16 / "
                         f"int8 [panels, steps, 16 g] tensor, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    g = _panel_group(packed.dtype)
    panels, steps = -(-n // PANEL_CHANNELS), -(-k // g)
    if n < 0 or k < 0 or tuple(packed.shape) != (panels, steps, PANEL_CHANNELS * g):
        raise ValueError(f"linear_unpack: packed {tuple(packed.shape)} is not the panels of a "
                         f"[{n}, {k}] {packed.dtype} weight (want {(panels, steps, PANEL_CHANNELS * g)})")
    grouped = packed.view(panels, steps, PANEL_CHANNELS, g).permute(0, 2, 1, 3)
    return grouped.reshape(panels * PANEL_CHANNELS, steps * g)[:n, :k].contiguous()


def linear_packed(x: torch.Tensor, packed: torch.Tensor, n: int,
                  scales: torch.Tensor | None = None, *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linear` with the weight given as ``linear_pack(weight)`` (``n`` = its N rows):
    CPU only. At every row count measured it runs at the weights' read bandwidth where
    :func:`linear` on ``[N, K]`` is bound by streaming x (csrc/linear/linear.h)."""
    _require_tensor("x", x)
    _require_tensor("packed", packed)
    if x.dim() != 2:
        raise ValueError(f"linear_packed: argument 'x' [M, K] must be 2-D, got "
                         f"{tuple(x.shape)}")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2 ** 31:
        raise ValueError(f"linear_packed: argument 'n' (the weight's N rows) = {n!r} out of "
                         f"range")
    if out is None:
        out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    _C.linear_packed(_dl(x), _dl(packed), int(n), _dl_opt(scales), _dl(out))
    return out


def linear_packed_is_fast(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether this CPU runs :func:`linear_packed` on (activation, weight) dtypes with its
    vector kernel (AVX-512: fp32 x fp32; bf16 x bf16 with AVX512_BF16; int8 weights with
    AVX512_VNNI; AVX2 + FMA: every pair, in fp32); elsewhere it takes a portable loop that
    is right but slow."""
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.int8: "int8"}
    pair = f"{name.get(x_dtype)}/{name.get(weight_dtype)}"
    return pair in _C.linear_cpu_packed_fast_pairs()


def linear_cpu_kernels() -> list[str]:
    """The CPU kernels :func:`linear` can run on this machine, best first: ``"amx"`` (bf16
    and int8 weights; AMX tiles), ``"avx512"``, ``"avx2"`` (packed weights; on ``[N, K]``
    weights the same loop as ``"portable"``), ``"portable"`` (always)."""
    return list(_C.linear_cpu_kernels())


@contextlib.contextmanager
def linear_cpu_kernel(name: str) -> Iterator[None]:
    """Within the block, CPU :func:`linear` uses at most kernel ``name`` (one of
    :func:`linear_cpu_kernels`; a better one is skipped), so tests and benchmarks can run
    each kernel on one machine. Process-wide; not for concurrent use."""
    _C.set_linear_cpu_kernel(name)
    try:
        yield
    finally:
        _C.set_linear_cpu_kernel("")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only symmetric int8 per output channel: ``(q int8 [N, K], scales float32 [N])``
    with ``weight ~= q * scales[:, None]``, ``scales = max|row| / 127`` (no calibration data
    needed; an all-zero row gets scale 1)."""
    _require_tensor("weight", weight)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int8: argument 'weight' must be a floating [N, K] matrix, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    w = weight.float()
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


# ---- whole-step CPU decoder -----------------------------------------------------------------


class CpuDecoder:
    """The whole forward step of a Chameleon decoder on the CPU, in one call: embeddings,
    every layer (the kernels of :func:`rms_norm`, :func:`linear`, :func:`qk_norm_rope`,
    :func:`kv_append`, :func:`paged_attention`, :func:`swiglu`) and the logits of some rows.
    It calls the same kernels in the same order as the per-op CPU path, so its logits are
    bit-identical to that path's when that path sends every projection to :func:`linear`;
    what it saves is the ~10 Python calls a layer (the host overhead of a decode step).

    Args:
        config: ``rms_norm_eps``, ``qk_norm_eps``, ``swin_norm``.
        embed: ``[V, H]`` embedding table (float32 or bfloat16: the activation dtype).
        final_norm: ``[H]``; inv_freq: float32 ``[D / 2]`` (RoPE).
        layers: per layer a dict of ``input_layernorm``, ``post_attention_layernorm``,
            ``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj`` (``[N, K]``, the
            activation dtype or int8) with ``<name>_scales`` (float32 ``[N]`` for int8,
            else None) and optionally ``<name>_packed`` (:func:`linear_pack` of the weight,
            which the step then multiplies: as :func:`linear_packed`; the weight may then
            be given as its row count ``N`` alone), ``q_norm_weight`` / ``q_norm_bias``
            ``[Hq, D]``, ``k_norm_weight`` / ``k_norm_bias`` ``[Hkv, D]``.
        caches: per layer ``(k_cache, v_cache)`` ``[NB, BS, Hkv, D]`` (written by steps).
        heads: logit heads ``(weight [N_h, H] or, with panels, N_h, scales or None, packed
            or None)``; a step names one.

    Every tensor must be a contiguous CPU tensor; the object keeps them alive, and the
    caller must not resize or replace them while it exists. Not thread-safe (one scratch).
    """

    def __init__(self, config: dict, embed: torch.Tensor, final_norm: torch.Tensor,
                 inv_freq: torch.Tensor, layers: Sequence[dict],
                 caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 heads: Sequence[tuple[torch.Tensor, torch.Tensor | None,
                                       torch.Tensor | None]]):
        for name, t in (("embed", embed), ("final_norm", final_norm), ("inv_freq", inv_freq)):
            _require_tensor(name, t)
        layer_args = []
        for i, layer in enumerate(layers):
            args = {}
            for name, t in layer.items():
                if isinstance(t, int) and not isinstance(t, bool):  # a packed weight's N
                    args[name] = t
                    continue
                if t is not None:
                    _require_tensor(f"layers[{i}].{name}", t)
                args[name] = _dl_opt(t)
            layer_args.append(args)
        heads = [tuple(h) for h in heads]
        if any(len(h) != 3 for h in heads):
            raise ValueError("CpuDecoder: argument 'heads' must hold (weight, scales or None, "
                             "packed or None) triples")
        def rows_and_arg(i, w):  # (N_h, the native argument): a weight or its row count
            if isinstance(w, int) and not isinstance(w, bool):
                return w, w
            return int(_require_tensor(f"heads[{i}]", w).shape[0]), _dl(w)

        head_args = [rows_and_arg(i, w) for i, (w, _, _) in enumerate(heads)]
        self.head_rows = [n for n, _ in head_args]
        # The native module only (the emulator copies a tensor per call; this keeps them).
        self._impl = _ext._C.CpuDecoder(
            dict(config), _dl(embed), _dl(final_norm), _dl(inv_freq), layer_args,
            [(_dl(k), _dl(v)) for k, v in caches],
            [(arg, _dl_opt(sc), _dl_opt(pk)) for (_, arg), (_, sc, pk) in zip(head_args, heads)])

    def step(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
             block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
             rows: torch.Tensor, max_q_len: int, max_seq_len: int,
             head: int = 0) -> torch.Tensor | None:
        """One step over ``T`` packed tokens (the :func:`paged_attention` layout: int64
        ``ids`` / ``positions`` ``[T]``, int32 ``slots [T]``, ``block_tables [B, MB]``,
        ``seq_lens [B]``, ``cu_seqlens_q [B + 1]``); writes the step's keys and values to
        the caches and returns float32 logits ``[R, N_head]`` of the int64 ``rows [R]``
        (None for R = 0). Every index is range-checked (ValueError naming it)."""
        n = rows.shape[0]
        if not 0 <= head < len(self.head_rows):
            raise ValueError(f"CpuDecoder.step: head {head} does not exist (the decoder has "
                             f"{len(self.head_rows)})")
        logits = torch.empty((n, self.head_rows[head]), dtype=torch.float32) if n else None
        self._impl.step(_dl(ids), _dl(positions), _dl(slots), _dl(block_tables),
                        _dl(seq_lens), _dl(cu_seqlens_q), _dl(rows), int(max_q_len),
                        int(max_seq_len), int(head), _dl_opt(logits))
        return logits

    def step_sample(self, i64: torch.Tensor, i32: torch.Tensor, f32: torch.Tensor,
                    dims: tuple[int, ...], head: int = 0,
                    allowed_bits: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
        """One step from the engine's three packed host buffers
        (:class:`cm3rt.engine.step_inputs.PackedStep`: int64 ids, positions, rows, seed,
        step; int32 slots, seq_lens, cu_seqlens_q, block tables, streams, mode, top_k, cd_k,
        mask_kind; float32 temperature, top_p, cfg_scale, cfg_image_scale, cd_alpha; ``dims``
        = (T, B, R, G, MB, max_q_len, max_seq_len)): the forward of :meth:`step`, then one
        :func:`sample_logits` draw per group from logits that never leave C++.
        ``allowed_bits``: the packed allowed-token table ``[kinds, ceil(N_head / 32)]`` whose
        row ``mask_kind[g]`` group ``g`` reads, or None (every column of the head allowed).
        Returns (tokens as head columns, logprobs), one per group; token -1 as in
        :func:`sample_logits`. Three tensor imports a step instead of about twenty."""
        return self._impl.step_sample(_dl(i64), _dl(i32), _dl(f32), tuple(dims), int(head),
                                      _dl_opt(allowed_bits))
