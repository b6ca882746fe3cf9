"""The Chameleon decoder over cm3rt's paged KV cache.

Layout of one layer (HF ``ChameleonDecoderLayer``; ``swin_norm`` moves the norms after the
sublayers, HF ``ChameleonSwinDecoderLayer``):

    plain:  x += attn(rms(x));  x += mlp(rms(x))
    swin:   x += rms(attn(x));  x += rms(mlp(x))

    attn(h): qkv = h @ Wqkv^T (one GEMM; q, k, v rows concatenated at load)
             q, k = qk_layer_norm(q), qk_layer_norm(k); q, k = rope(q), rope(k)
             kv_append(k, v -> cache at meta.slots); o = paged_attention(q, cache)
             return o @ Wo^T
    mlp(h):  (silu(g) * u) @ Wdown^T with [g; u] = h @ Wgate_up^T (one GEMM)

On CUDA the layer runs as the torch ops of :mod:`.layers` (captured in the decode CUDA graph);
on the CPU as the fused ops ``ops.rms_norm`` / ``qk_norm_rope`` / ``swiglu`` with the same
rounding points (:meth:`ChameleonDecoderLayer.forward_cpu`), since a few-row CPU step pays for
every op's dispatch.

Weights are plain tensors in the model dtype (float32 / bfloat16 / float16), never trained
here: every parameter has ``requires_grad=False`` and the forward runs under
``torch.inference_mode()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cm3rt import ops
from cm3rt.devices import resolve_dtype
from cm3rt.model.config import ChameleonConfig
from cm3rt.model.layers import (
    apply_rope,
    qk_layer_norm,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
    swiglu,
)
from cm3rt.model.step import StepMetadata
from cm3rt.model.tensor_parallel import SINGLE_PROCESS, TensorParallel

# Block size of the throw-away cache that ``logits`` builds (any size the kernels accept).
_LOGITS_BLOCK_SIZE = 16


def _weight(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Uninitialised on purpose: the loader copies every element from the checkpoint, so a
    # zero fill would only touch (and on CPU commit) the pages one extra time.
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


# The row counts (fewest, most) for which a CPU projection goes to cm3rt's weight-streaming
# kernel rather than torch's, by weight dtype and by the best CPU kernel the machine has
# (ops.linear_cpu_kernels, and VDPBF16PS in ops.build_info()["simd"]). Measured crossovers
# (bench/bench_linear.py, 2816 x 1024, one thread):
# * AVX2 (no bf16 instructions): torch's bf16 GEMM is 2-4x slower than the kernel at every
#   M up to 64; MKL's fp32 GEMM 1.4-2.2x slower for M = 2..8, faster at M = 1 (its GEMV),
#   level from M = 12.
# * AVX-512 + AMX (Sapphire Rapids class): bf16 (AMX) faster up to M = 64 (752 vs 780 us);
#   fp32 (AVX-512) 2.7x faster at M = 8 and 1.35x at M = 16, slower at M = 32, level at 1.
# * AVX-512 with AVX512_BF16, no AMX (AMD Zen 4): bf16 (VDPBF16PS) faster up to M = 32
#   (1431 vs 1481 us; 306 vs 481 at M = 8), slower at 64 (3212 vs 2391).
# A decode step of 4 CFG pairs is 8 rows.
_KERNELS = ops.linear_cpu_kernels()
_FP32_MOST_ROWS = 16 if "avx512" in _KERNELS else 8
_BF16_MOST_ROWS = 32 if "amx" not in _KERNELS and "bf16" in ops.build_info()["simd"] else 64
KERNEL_ROWS = {torch.bfloat16: (1, _BF16_MOST_ROWS), torch.float32: (2, _FP32_MOST_ROWS)}
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def panels_only(weight: torch.Tensor) -> torch.Tensor:
    """The stand-in a packed model keeps for a ``[N, K]`` weight whose values live only in
    its panels (:meth:`ChameleonModel.pack_weights_`): a meta tensor of the same shape and
    dtype, so code that reads the shape works and code that reads the values fails loudly."""
    return torch.empty(weight.shape, dtype=weight.dtype, device="meta")


def packs_weights(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether a CPU model with activations ``x_dtype`` packs its ``weight_dtype`` projections
    at load (:meth:`ChameleonModel.pack_weights_`): where the CPU runs the pair on the panel
    kernel (:func:`ops.linear_packed_is_fast`), except bf16 / int8 weights on AMX machines,
    whose AMX kernel takes the [N, K] layout (not compared with panels there: no AMX machine
    measured). On AMD Zen 4 (2816 x 1024, one thread) panels beat the [N, K] kernel at every
    M from 2 to 512 (M = 8: fp32 722 -> 415 us, bf16 304 -> 211, int8 382 -> 225; level at
    M = 1) and torch at every M (fp32 M = 512: 26.5 vs MKL 31.7 ms; bf16 M = 1024: 26.5 vs
    27.9 ms), so packed projections take every row count. On AMD Zen 3 (AVX2 + FMA, no
    AVX-512) the AVX2 panel kernel beats the [N, K] loop at every M (M = 8: fp32 872 ->
    580 us, bf16 1066 -> 517, int8 842 -> 366) and torch at every M but fp32 M = 1 (251 vs
    239 us, L3-resident; M = 512: fp32 30.4 vs MKL 31.9 ms, bf16 30.7 vs 281 ms)."""
    if "amx" in _KERNELS and weight_dtype in (torch.bfloat16, torch.int8):
        return False
    return ops.linear_packed_is_fast(x_dtype, weight_dtype)


def uses_linear_kernel(rows: int, weight: torch.Tensor, scales: torch.Tensor | None,
                       packed: torch.Tensor | None = None) -> bool:
    """Whether :func:`project` sends ``rows`` rows times ``weight`` to cm3rt's kernels
    (:func:`ops.linear` or, with panels, :func:`ops.linear_packed`): packed and int8 weights
    (``scales`` per output channel) always, other CPU bfloat16 / float32 weights for few rows
    (:data:`KERNEL_ROWS`); everything else goes to torch."""
    if packed is not None or scales is not None:
        return True
    fewest, most = KERNEL_ROWS.get(weight.dtype, (1, 0))
    return not weight.is_cuda and fewest <= rows <= most


def project(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None,
            packed: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T`` (``weight [N, K]``; ``packed``: its panels, :func:`ops.linear_pack`,
    used instead where given), through cm3rt's kernels or torch (:func:`uses_linear_kernel`)."""
    if packed is not None:
        return ops.linear_packed(x, packed, weight.shape[0], scales)
    if uses_linear_kernel(x.shape[0], weight, scales):
        return ops.linear(x, weight, scales)
    return F.linear(x, weight)


@dataclass(frozen=True)
class LogitHead:
    """Some rows of lm_head (:meth:`ChameleonModel.lm_head_rows`): ``weight [K, hidden]``,
    int8 ``scales [K]`` on int8 models, under tensor parallelism the ``columns`` of the
    gathered logits that hold the requested ids, in their order, and the weight's panels
    (``packed``) on models that pack (:meth:`ChameleonModel.pack_weights_`; ``weight`` is
    then :func:`panels_only`)."""

    weight: torch.Tensor
    scales: torch.Tensor | None = None
    columns: torch.Tensor | None = None
    packed: torch.Tensor | None = None

    @classmethod
    def of(cls, rows: torch.Tensor, int8: bool, columns: torch.Tensor | None = None,
           pack_for: torch.dtype | None = None):
        """``pack_for``: the activation dtype of a model that packs its weights (None:
        it does not)."""
        weight, scales = ops.quantize_int8(rows) if int8 else (rows, None)
        packed = None
        if pack_for is not None and not weight.is_cuda and packs_weights(pack_for, weight.dtype):
            packed = ops.linear_pack(weight)
            weight = panels_only(weight)
        return cls(weight, scales, columns, packed)


class ChameleonDecoderLayer(nn.Module):
    """Weights of one decoder layer (fused QKV and gate/up projections): this rank's share
    of the heads and MLP channels under tensor parallelism (:mod:`.tensor_parallel`). With
    int8 weights (:meth:`ChameleonModel.quantize_int8_`) each projection has a
    ``<name>_scales`` buffer, and packed (:meth:`ChameleonModel.pack_weights_`) a
    ``<name>_packed`` one."""

    def __init__(self, cfg: ChameleonConfig, dtype: torch.dtype, device: torch.device,
                 tp: TensorParallel = SINGLE_PROCESS) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.tp = tp
        # Local head / channel counts (the whole model's with one rank).
        self.num_heads = nq = tp.part(cfg.num_attention_heads)[1]
        self.num_kv_heads = nkv = tp.part(cfg.num_key_value_heads)[1]
        inter = tp.part(cfg.intermediate_size)[1]
        self.input_layernorm = _weight((h,), dtype, device)
        self.post_attention_layernorm = _weight((h,), dtype, device)
        self.qkv_proj = _weight(((nq + 2 * nkv) * d, h), dtype, device)  # rows [q; k; v]
        self.q_norm_weight = _weight((nq, d), dtype, device)
        self.q_norm_bias = _weight((nq, d), dtype, device)
        self.k_norm_weight = _weight((nkv, d), dtype, device)
        self.k_norm_bias = _weight((nkv, d), dtype, device)
        self.o_proj = _weight((h, nq * d), dtype, device)
        self.gate_up_proj = _weight((2 * inter, h), dtype, device)  # [g; u]
        self.down_proj = _weight((h, inter), dtype, device)
        for name in PROJECTIONS:
            self.register_buffer(f"{name}_scales", None, persistent=False)
            self.register_buffer(f"{name}_packed", None, persistent=False)

    def _proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return project(x, getattr(self, name), getattr(self, f"{name}_scales"),
                       getattr(self, f"{name}_packed"))

    def attention(
        self,
        h: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, D/2] float32
        sin: torch.Tensor,  # [T, D/2] float32
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # [NB, BS, Hkv, D] each
        meta: StepMetadata,
        cfg: ChameleonConfig,
        workspace: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = h.shape[0]
        d, nq, nkv = cfg.head_dim, self.num_heads, self.num_kv_heads
        qkv = self._proj("qkv_proj", h)
        q = qkv[:, : nq * d].view(t, nq, d)
        k = qkv[:, nq * d: (nq + nkv) * d].view(t, nkv, d)
        q = apply_rope(qk_layer_norm(q, self.q_norm_weight, self.q_norm_bias, cfg.qk_norm_eps),
                       cos, sin)
        k = apply_rope(qk_layer_norm(k, self.k_norm_weight, self.k_norm_bias, cfg.qk_norm_eps),
                       cos, sin)
        return self._attend(q, k, qkv, kv_cache, meta, cfg, workspace)

    def attention_cpu(self, h: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                      kv_cache: tuple[torch.Tensor, torch.Tensor], meta: StepMetadata,
                      cfg: ChameleonConfig) -> torch.Tensor:
        """:meth:`attention` with the qk norms and RoPE as one fused CPU op, in place."""
        t = h.shape[0]
        d, nq, nkv = cfg.head_dim, self.num_heads, self.num_kv_heads
        qkv = ops.qk_norm_rope(self._proj("qkv_proj", h), self.q_norm_weight, self.q_norm_bias,
                               self.k_norm_weight, self.k_norm_bias, positions, inv_freq,
                               cfg.qk_norm_eps)
        q = qkv[:, : nq * d].view(t, nq, d)
        k = qkv[:, nq * d: (nq + nkv) * d].view(t, nkv, d)
        return self._attend(q, k, qkv, kv_cache, meta, cfg, None)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, qkv: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: StepMetadata,
                cfg: ChameleonConfig, workspace: torch.Tensor | None) -> torch.Tensor:
        """Cache this step's k and v (v read from ``qkv``), attend, project out."""
        t = q.shape[0]
        d, nq, nkv = cfg.head_dim, self.num_heads, self.num_kv_heads
        v = qkv[:, (nq + nkv) * d:].view(t, nkv, d)  # strided view: the kernels take it
        k_cache, v_cache = kv_cache
        ops.kv_append(k, v, k_cache, v_cache, meta.slots)
        o = ops.paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q,
            scale=1.0 / math.sqrt(d), causal=True,
            max_q_len=meta.max_q_len, max_seq_len=meta.max_seq_len, workspace=workspace,
        )
        # Row-parallel: each rank's heads give a partial sum of the output.
        return self.tp.all_reduce(self._proj("o_proj", o.view(t, nq * d)))

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        act = swiglu if h.is_cuda else ops.swiglu  # the fused CPU op rounds as swiglu does
        return self.tp.all_reduce(self._proj("down_proj", act(self._proj("gate_up_proj", h))))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: StepMetadata,
        cfg: ChameleonConfig,
        workspace: torch.Tensor | None = None,
    ) -> torch.Tensor:
        eps = cfg.rms_norm_eps
        if cfg.swin_norm:
            a = self.attention(x, cos, sin, kv_cache, meta, cfg, workspace)
            x = x + rms_norm(a, self.input_layernorm, eps)
            return x + rms_norm(self.mlp(x), self.post_attention_layernorm, eps)
        x = x + self.attention(rms_norm(x, self.input_layernorm, eps), cos, sin, kv_cache,
                               meta, cfg, workspace)
        return x + self.mlp(rms_norm(x, self.post_attention_layernorm, eps))

    def forward_cpu(
        self,
        delta: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: StepMetadata,
        cfg: ChameleonConfig,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` on the fused CPU ops, the same math and rounding. The hidden state
        travels as ``residual + delta`` (the last sublayer's output not added yet; the first
        layer gets the embeddings as ``delta`` and None), so each residual add happens
        inside the next RMSNorm; returns the new ``(delta, residual)``. With ``swin_norm``
        the state is whole: ``(x, None)``."""
        eps = cfg.rms_norm_eps
        if cfg.swin_norm:
            x = delta if residual is None else residual + delta
            a = self.attention_cpu(x, positions, inv_freq, kv_cache, meta, cfg)
            x = x + ops.rms_norm(a, self.input_layernorm, eps)
            return x + ops.rms_norm(self.mlp(x), self.post_attention_layernorm, eps), None
        if residual is None:
            residual = delta
            h = ops.rms_norm(delta, self.input_layernorm, eps)
        else:
            h = ops.rms_norm(delta, self.input_layernorm, eps, residual=residual)
        a = self.attention_cpu(h, positions, inv_freq, kv_cache, meta, cfg)
        h = ops.rms_norm(a, self.post_attention_layernorm, eps, residual=residual)
        return self.mlp(h), residual


class ChameleonModel(nn.Module):
    """Chameleon decoder: ``forward_step`` for the engine, ``logits`` for whole sequences.

    Construct through :func:`cm3rt.model.load_model`; the constructor only allocates
    (uninitialised) weights of the right shapes, dtype and device. With ``tp`` (a
    :class:`TensorParallel` of size N) it holds one rank's share (:mod:`.tensor_parallel`)
    and its forward is SPMD: every rank calls it with the same inputs.
    """

    def __init__(
        self,
        config: ChameleonConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        tp: TensorParallel = SINGLE_PROCESS,
    ) -> None:
        super().__init__()
        dtype = resolve_dtype(dtype, device)
        device = torch.device(device)
        tp.check(config)
        self.config, self.tp = config, tp
        h = config.hidden_size
        self.vocab_start, self.vocab_end, rows = tp.vocab_rows(config.vocab_size)
        self.embed_tokens = _weight((rows, h), dtype, device)
        self.layers = nn.ModuleList(
            ChameleonDecoderLayer(config, dtype, device, tp)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = _weight((h,), dtype, device)
        self.lm_head = self.embed_tokens if config.tie_word_embeddings else _weight(
            (rows, h), dtype, device)
        if rows > self.vocab_end - self.vocab_start and device.type != "meta":
            # Padding rows of the last vocab shard: never looked up, their logits cut off.
            with torch.no_grad():
                for w in {id(self.embed_tokens): self.embed_tokens,
                          id(self.lm_head): self.lm_head}.values():
                    w[self.vocab_end - self.vocab_start:].zero_()
        self.weights_int8 = False  # see quantize_int8_
        self.weights_packed = False  # see pack_weights_
        self.register_buffer(
            "inv_freq", rope_inv_freq(config.head_dim, config.rope_theta).to(device),
            persistent=False,
        )

    # ----------------------------------------------------------------- properties
    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights, activations and KV cache."""
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        """Device the weights live on."""
        return self.embed_tokens.device

    # ----------------------------------------------------------------- KV cache
    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        """Bytes one cache block takes over all layers, K and V together."""
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"argument 'block_size' must be a positive int, got {block_size!r}")
        c = self.config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return c.num_hidden_layers * 2 * block_size * self.num_kv_heads * c.head_dim * elem

    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank caches (all of them with one rank)."""
        return self.tp.part(self.config.num_key_value_heads)[1]

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(k_cache, v_cache)``, each ``[num_blocks, block_size, Hkv, D]`` (this
        rank's kv heads).

        Uninitialised: attention only reads the slots ``kv_append`` wrote.
        """
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"argument '{name}' must be a positive int, got {value!r}")
        c = self.config
        shape = (num_blocks, block_size, self.num_kv_heads, c.head_dim)
        return [
            (torch.empty(shape, dtype=self.dtype, device=self.device),
             torch.empty(shape, dtype=self.dtype, device=self.device))
            for _ in range(c.num_hidden_layers)
        ]

    def attention_workspace(self, num_tokens: int, meta: StepMetadata) -> torch.Tensor | None:
        """Scratch the CUDA attention kernel needs for a step of this shape (None on CPU or
        when the kernel plans no split); pass it to :meth:`forward_step` as ``workspace``."""
        if self.device.type != "cuda":
            return None
        c = self.config
        q = torch.empty((num_tokens, self.layers[0].num_heads, c.head_dim), dtype=self.dtype,
                        device=self.device)
        return ops.paged_attention_workspace(q, meta.num_seqs, meta.max_q_len, meta.max_seq_len)

    # ----------------------------------------------------------------- forward
    def check_token_ids(self, input_ids: torch.Tensor, name: str = "input_ids") -> None:
        """Raise ValueError unless every id lies in ``[0, vocab_size)`` (synchronises)."""
        if input_ids.numel() == 0:
            return
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"argument '{name}' must hold token ids in [0, {self.config.vocab_size}), "
                f"got values in [{lo}, {hi}]"
            )

    @torch.inference_mode()
    def forward_step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: StepMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        validate: bool | None = None,
        workspace: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One batched step over ``T`` packed tokens; returns hidden states ``[T, hidden]``.

        Args:
            input_ids: int64 ``[T]`` token ids (prefill chunks and decode tokens, packed in
                the order of ``meta.cu_seqlens_q``).
            positions: int64 ``[T]`` position of each token in its sequence (RoPE).
            meta: slots / block tables / lengths of the step (see :class:`StepMetadata`).
            kv_caches: from :meth:`allocate_kv_cache`; this step's keys/values are written.
            validate: range-check ``input_ids`` (default: on CPU yes, on CUDA no, since it
                synchronises; the engine checks a request's prompt ids once, when it is
                added, and passes False).
            workspace: CUDA split-KV scratch for the attention kernel, from
                :meth:`attention_workspace` (every layer reuses it, in stream order); keeps a
                decode step free of that allocation, e.g. for CUDA-graph capture.

        The hidden states are *before* the final norm; :meth:`compute_logits` applies it.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
            raise ValueError(f"argument 'input_ids' must be a 1-D tensor [T], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if not isinstance(positions, torch.Tensor) or positions.shape != input_ids.shape:
            raise ValueError(f"argument 'positions' must be a tensor of shape "
                             f"{tuple(input_ids.shape)}, got "
                             f"{getattr(positions, 'shape', type(positions).__name__)}")
        if not isinstance(meta, StepMetadata):
            raise TypeError(f"argument 'meta' must be a StepMetadata, got {type(meta).__name__}")
        if meta.num_tokens != input_ids.shape[0]:
            raise ValueError(f"argument 'meta' describes {meta.num_tokens} tokens (slots) but "
                             f"'input_ids' holds {input_ids.shape[0]}")
        if len(kv_caches) != self.config.num_hidden_layers:
            raise ValueError(f"argument 'kv_caches' must hold {self.config.num_hidden_layers} "
                             f"(k, v) pairs, got {len(kv_caches)}")
        if validate is None:
            validate = not input_ids.is_cuda
        if validate:
            self.check_token_ids(input_ids)
        x = self._embed(input_ids)
        if x.is_cuda:
            cos, sin = rope_cos_sin(positions, self.inv_freq)
            for layer, kv_cache in zip(self.layers, kv_caches):
                x = layer(x, cos, sin, kv_cache, meta, self.config, workspace)
            return x
        # CPU: the fused layer ops (a decode step is ~10 calls a layer instead of ~50 torch
        # ops); the embeddings become the residual stream, updated in place.
        positions = positions.to(torch.int64).contiguous()
        delta, residual = x, None
        for layer, kv_cache in zip(self.layers, kv_caches):
            delta, residual = layer.forward_cpu(delta, residual, positions, self.inv_freq,
                                                kv_cache, meta, self.config)
        return delta if residual is None else residual + delta

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:
            return F.embedding(input_ids, self.embed_tokens)
        # Vocab-parallel: rows outside this rank's shard contribute zeros to the sum.
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_end - self.vocab_start)
        x = F.embedding(local.masked_fill(outside, 0), self.embed_tokens)
        return self.tp.all_reduce(x.masked_fill_(outside[:, None], 0))

    @torch.inference_mode()
    def quantize_int8_(self) -> ChameleonModel:
        """Replace every layer's projection weights by int8 weight-only ones with a float32
        scale per output channel (:func:`ops.quantize_int8`; no calibration data). The
        embeddings, norms and lm_head keep the model's dtype (the image-span copy of the
        image rows, :meth:`lm_head_rows`, is int8 too). In place; returns ``self``."""
        for layer in self.layers:
            for name in PROJECTIONS:
                if getattr(layer, f"{name}_scales") is not None:
                    continue
                weight, packed = getattr(layer, name), getattr(layer, f"{name}_packed")
                if packed is not None:  # the values are in the panels only
                    weight = ops.linear_unpack(packed, *weight.shape)
                    setattr(layer, f"{name}_packed", None)
                q, scales = ops.quantize_int8(weight)
                setattr(layer, name, nn.Parameter(q, requires_grad=False))
                setattr(layer, f"{name}_scales", scales)
        self.weights_int8 = True
        return self.pack_weights_() if self.weights_packed else self

    @torch.inference_mode()
    def pack_weights_(self) -> ChameleonModel:
        """On the CPU, keep every layer projection in panels (:func:`ops.linear_pack`, the
        ``<name>_packed`` buffer), which :func:`project` then multiplies at every row count,
        where :func:`packs_weights` says the CPU's kernel runs them (no-op elsewhere; the
        image-span heads of :meth:`lm_head_rows` are packed too). The panels replace the
        ``[N, K]`` weight, which becomes :func:`panels_only` (its shape, no values), so
        packing costs no memory; :func:`ops.linear_unpack` gives the values back.
        :func:`load_model` packs by default on the CPU. Call again after changing weights
        (:meth:`quantize_int8_` does). In place; returns ``self``."""
        if self.device.type != "cpu":
            return self
        packed_any = False
        for layer in self.layers:
            for name in PROJECTIONS:
                weight, packed = getattr(layer, name), getattr(layer, f"{name}_packed")
                if packed is None and packs_weights(self.dtype, weight.dtype):
                    packed = ops.linear_pack(weight)
                    setattr(layer, f"{name}_packed", packed)
                    setattr(layer, name, nn.Parameter(panels_only(weight), requires_grad=False))
                packed_any |= packed is not None
        self.weights_packed = packed_any
        return self

    def compute_logits(self, hidden: torch.Tensor, head: LogitHead | None = None) -> torch.Tensor:
        """Final RMSNorm + lm_head of ``hidden [N, hidden_size]`` -> float32 ``[N, V]``;
        with ``head`` (rows of lm_head, from :meth:`lm_head_rows`) only those ``[N, K]``.
        Under tensor parallelism every rank gets the whole (gathered) logits."""
        if hidden.dim() != 2 or hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(f"argument 'hidden' must be [N, {self.config.hidden_size}], got "
                             f"{tuple(hidden.shape)}")
        norm = rms_norm if hidden.is_cuda else ops.rms_norm
        h = norm(hidden, self.norm, self.config.rms_norm_eps)
        if head is None:
            logits = self.tp.all_gather_columns(project(h, self.lm_head).float())
            return logits[:, :self.config.vocab_size] if self.tp.enabled else logits
        logits = self.tp.all_gather_columns(
            project(h, head.weight, head.scales, head.packed).float())
        return logits if head.columns is None else logits.index_select(1, head.columns)

    def cpu_decoder(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                    heads: list[LogitHead | None]) -> ops.CpuDecoder | None:
        """The whole-step CPU forward (:class:`ops.CpuDecoder`) over ``kv_caches`` with
        logit ``heads`` (None: the whole lm_head); None where it does not apply: not on the
        CPU, tensor-parallel, or activations neither float32 nor bfloat16. A step may use it
        when :meth:`cpu_decoder_takes` says so; its logits are then :meth:`forward_step` +
        :meth:`compute_logits`'s, bit for bit. Rebuild it after :meth:`quantize_int8_` or
        :meth:`pack_weights_`."""
        if self.device.type != "cpu" or self.tp.enabled or \
                self.dtype not in (torch.float32, torch.bfloat16):
            return None
        c = self.config
        names = ("input_layernorm", "post_attention_layernorm", "q_norm_weight", "q_norm_bias",
                 "k_norm_weight", "k_norm_bias") + PROJECTIONS + tuple(
                     f"{n}_{what}" for n in PROJECTIONS for what in ("scales", "packed"))
        def weight_arg(w):  # a weight kept only as panels goes by its row count
            return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.is_meta else w

        layers = [{n: weight_arg(getattr(layer, n)) for n in names} for layer in self.layers]
        head_args = [(self.lm_head, None, None) if h is None else
                     (weight_arg(h.weight), h.scales, h.packed) for h in heads]
        return ops.CpuDecoder(
            {"rms_norm_eps": c.rms_norm_eps, "qk_norm_eps": c.qk_norm_eps,
             "swin_norm": c.swin_norm},
            self.embed_tokens, self.norm, self.inv_freq, layers, kv_caches, head_args)

    def cpu_decoder_takes(self, num_tokens: int, num_rows: int,
                          head: LogitHead | None) -> bool:
        """Whether a CPU step of ``num_tokens`` tokens and ``num_rows`` logit rows through
        ``head`` runs every projection on :func:`ops.linear` (:func:`uses_linear_kernel`),
        so that :meth:`cpu_decoder`'s step equals the per-op path bit for bit."""
        layer = self.layers[0]
        if not uses_linear_kernel(num_tokens, layer.qkv_proj, layer.qkv_proj_scales,
                                  layer.qkv_proj_packed):
            return False
        if num_rows == 0:
            return True
        if head is None:
            return uses_linear_kernel(num_rows, self.lm_head, None)
        return uses_linear_kernel(num_rows, head.weight, head.scales, head.packed)

    def lm_head_rows(self, token_ids: torch.Tensor) -> LogitHead:
        """A contiguous copy of the lm_head rows of ``token_ids`` (e.g. the image codes:
        inside an image span only they can be sampled, so only they need logits), for
        :meth:`compute_logits` (int8 too on int8 models). Under tensor parallelism each rank
        copies the ids its vocab shard holds, padded to the same count on every rank."""
        token_ids = token_ids.to(torch.int64).cpu()
        if not self.tp.enabled:
            rows = self.lm_head.index_select(0, token_ids.to(self.lm_head.device))
            return LogitHead.of(rows.contiguous(), self.weights_int8,
                                pack_for=self.dtype if self.weights_packed else None)
        # Rank r's shard holds ids [r*P, (r+1)*P): it computes its ids' logits, padded to
        # the largest share, and `columns` picks token_ids' order out of the gathered block.
        padded = self.lm_head.shape[0]
        owner = token_ids // padded
        counts = torch.bincount(owner, minlength=self.tp.size)
        width = int(counts.max())
        mine = token_ids[owner == self.tp.rank] - self.vocab_start
        local = torch.zeros(width, dtype=torch.int64)
        local[:len(mine)] = mine  # padding columns read row 0 and are never selected
        rows = self.lm_head.index_select(0, local.to(self.lm_head.device)).contiguous()
        rank_of = owner.tolist()
        seen = [0] * self.tp.size
        columns = []
        for r in rank_of:  # position of each id inside the gathered [N, size*width] block
            columns.append(r * width + seen[r])
            seen[r] += 1
        return LogitHead.of(rows, self.weights_int8,
                            torch.tensor(columns, dtype=torch.int64, device=self.device),
                            pack_for=self.dtype if self.weights_packed else None)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Causal forward of whole sequences ``[B, L]`` -> float32 logits ``[B, L, V]``.

        Runs :meth:`forward_step` once over a temporary paged cache (one prefill of every
        sequence), so it exercises exactly the engine's code path.
        """
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"argument 'input_ids' must be a torch.Tensor, got "
                            f"{type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"argument 'input_ids' must be [B, L] with L >= 1, got shape "
                             f"{tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"argument 'input_ids' must be int64 or int32, got {input_ids.dtype}")
        ids = input_ids.to(self.device, torch.int64)
        self.check_token_ids(ids)
        b, seq_len = ids.shape
        bs = _LOGITS_BLOCK_SIZE
        blocks_per_seq = -(-seq_len // bs)
        caches = self.allocate_kv_cache(b * blocks_per_seq, bs)
        dev = self.device
        # Sequence i owns blocks i*nb .. (i+1)*nb - 1, so token j sits in slot i*nb*bs + j.
        tok = torch.arange(seq_len, device=dev, dtype=torch.int32)
        seq = torch.arange(b, device=dev, dtype=torch.int32)
        meta = StepMetadata(
            slots=(seq[:, None] * (blocks_per_seq * bs) + tok[None, :]).reshape(-1),
            block_tables=(seq[:, None] * blocks_per_seq
                          + torch.arange(blocks_per_seq, device=dev, dtype=torch.int32)),
            seq_lens=torch.full((b,), seq_len, device=dev, dtype=torch.int32),
            cu_seqlens_q=torch.arange(b + 1, device=dev, dtype=torch.int32) * seq_len,
            max_q_len=seq_len,
            max_seq_len=seq_len,
        )
        positions = tok.long().repeat(b)
        hidden = self.forward_step(ids.reshape(-1), positions, meta, caches, validate=False)
        return self.compute_logits(hidden).view(b, seq_len, -1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # nn.Module protocol
        """Same as :meth:`logits`."""
        return self.logits(input_ids)
