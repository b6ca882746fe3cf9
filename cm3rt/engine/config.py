"""EngineConfig: the knobs of an :class:`~cm3rt.engine.Engine`, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass

from cm3rt.engine.kv_cache import num_blocks_for_budget


def _positive_int(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"argument '{name}' must be an int >= 1, got {v!r}")


@dataclass(frozen=True)
class EngineConfig:
    """How an engine batches and caches.

    Attributes:
        block_size: tokens per KV-cache block.
        num_blocks: KV-cache blocks (overrides the memory budget).
        kv_cache_bytes / kv_cache_fraction: KV-cache budget in bytes, or as a fraction of
            the device's free memory (default 0.5, capped at what ``max_num_seqs``
            full-length streams could use).
        max_num_seqs: most streams (cond / uncond / image-cond) running at once.
        max_num_batched_tokens: token budget of one step (raised to max_num_seqs if lower,
            so every decoding stream fits one step).
        enable_prefix_caching: reuse cached full blocks of equal prefixes.
        use_cuda_graphs: replay pure decode steps from CUDA graphs (CUDA only).
        max_model_len: context length (default the model's max_position_embeddings).
        tokens_per_image: image codes per image (default the image tokenizer's).
        image_span_logits: in a step where every group is inside an image span, compute
            only the image-code rows of lm_head (8192 of 65536 for Chameleon) and sample
            among them; the tokens are those of the full computation.
        cpu_decoder: on the CPU, run each step whose projections all go to cm3rt's linear
            kernel (decode steps) as one C++ call (:class:`cm3rt.ops.CpuDecoder`) instead of
            ~10 Python-level kernel calls a layer; the logits are the same bit for bit.
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    use_cuda_graphs: bool = True
    max_model_len: int | None = None
    tokens_per_image: int | None = None
    image_span_logits: bool = True
    cpu_decoder: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _positive_int(name, getattr(self, name))
        if self.num_blocks is not None:
            _positive_int("num_blocks", self.num_blocks)

    def context_length(self, model) -> int:
        """``max_model_len``, checked against the model's position limit."""
        ctx = int(model.config.max_position_embeddings)
        if self.max_model_len is None:
            return ctx
        if isinstance(self.max_model_len, bool) or not isinstance(self.max_model_len, int) \
                or not (2 <= self.max_model_len <= ctx):
            raise ValueError(f"argument 'max_model_len' must be an int in [2, {ctx}], got "
                             f"{self.max_model_len!r}")
        return self.max_model_len

    def blocks_for(self, model, context_length: int) -> int:
        """KV-cache blocks: ``num_blocks``, or as many as the memory budget holds."""
        if self.num_blocks is not None:
            return self.num_blocks
        return num_blocks_for_budget(
            model.kv_cache_bytes_per_block(self.block_size), model.device,
            budget_bytes=self.kv_cache_bytes, fraction=self.kv_cache_fraction,
            max_useful_blocks=self.max_num_seqs * -(-context_length // self.block_size))

    @property
    def step_token_budget(self) -> int:
        return max(self.max_num_batched_tokens, 3, self.max_num_seqs)
