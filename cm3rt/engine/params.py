"""Sampling parameters of one generation request (validated at construction)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

# The guidance modes, in the order of the sampler's combine-mode ids: the C++ kernel keeps
# its own enum (cm3rt.ops.SAMPLE_MODES is read from it) and a test checks the two agree.
# Kept torch-free so the CLI can name the choices without importing torch.
GUIDANCE_MODES: tuple[str, ...] = ("none", "cfg", "cfg3", "cdk")

_SEED_MASK = (1 << 63) - 1


def group_seed(seed: int, sample_index: int) -> int:
    """The sampler seed of sample ``sample_index`` of a request seeded with ``seed``.

    Every sample (group of streams) of a request draws from its own Philox stream; the naive
    reference loop in the tests derives its seeds with this same function. A 64-bit odd
    multiplier spreads consecutive sample indices far apart in seed space.
    """
    return (int(seed) + int(sample_index) * 0x9E3779B97F4A7C15) & _SEED_MASK


def _check_number(name: str, value, *, integer: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "an int" if integer else "a number"
        raise TypeError(
            f"SamplingParams.{name} must be {expected}, got {type(value).__name__} {value!r}"
        )


@dataclass(frozen=True)
class SamplingParams:
    """How a request samples its tokens.

    Attributes:
        temperature: softmax temperature; 0 means greedy (argmax, ties to the lowest id).
        top_k: keep the k most probable tokens (0 = off).
        top_p: nucleus mass (1.0 = off), in (0, 1].
        guidance: "none", "cfg" (classifier-free guidance, streams cond + uncond), "cfg3"
            (text-guided editing: cond, image-cond, uncond) or "cdk" (CM3Leon's contrastive
            decoding top-k, cond + uncond). Guidance applies inside image spans only.
        cfg_scale: text guidance scale s (cfg: l = u + s (c - u); cfg3: s_txt).
        cfg_image_scale: image guidance scale of cfg3 (s_img).
        cd_alpha: CD-K plausibility threshold alpha in [0, 1].
        cd_k: CD-K keeps tokens with p >= alpha * (k-th largest p); k >= 1.
        uncond_docs: with retrieval, put the retrieved documents in the unconditional stream
            too, so guidance amplifies what the prompt adds to the documents rather than
            prompt and documents together (False: documents in the conditional streams only;
            cfg3's image-conditional stream always has them).
        n: number of independent samples of the prompt (they share the prompt's KV blocks).
        seed: base seed; sample i uses ``group_seed(seed, i)``. Same seed -> same tokens.
        max_new_tokens: generated-token limit; None = the task's default (one image plus its
            end-of-image for image tasks).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance: str = "none"
    cfg_scale: float = 3.0
    cfg_image_scale: float = 1.5
    cd_alpha: float = 0.1
    cd_k: int = 1
    uncond_docs: bool = False
    n: int = 1
    seed: int = 0
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "cfg_scale", "cfg_image_scale", "cd_alpha"):
            _check_number(name, getattr(self, name))
        for name in ("top_k", "cd_k", "n", "seed"):
            _check_number(name, getattr(self, name), integer=True)
        if not isinstance(self.uncond_docs, bool):
            raise TypeError(f"SamplingParams.uncond_docs must be a bool, got "
                            f"{type(self.uncond_docs).__name__} {self.uncond_docs!r}")
        if not isinstance(self.guidance, str):
            raise TypeError(
                f"SamplingParams.guidance must be a str, one of {GUIDANCE_MODES}, "
                f"got {type(self.guidance).__name__} {self.guidance!r}"
            )
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(
                f"SamplingParams.guidance must be one of {GUIDANCE_MODES}, got {self.guidance!r}"
            )
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(
                f"SamplingParams.temperature must be a finite number >= 0, got {self.temperature}"
            )
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        for name in ("cfg_scale", "cfg_image_scale"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ValueError(f"SamplingParams.{name} must be finite, got {v}")
        if not (0.0 <= self.cd_alpha <= 1.0):
            raise ValueError(f"SamplingParams.cd_alpha must be in [0, 1], got {self.cd_alpha}")
        if self.cd_k < 1:
            raise ValueError(f"SamplingParams.cd_k must be >= 1, got {self.cd_k}")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.seed < 0 or self.seed > _SEED_MASK:
            raise ValueError(f"SamplingParams.seed must be in [0, 2**63), got {self.seed}")
        if self.max_new_tokens is not None:
            _check_number("max_new_tokens", self.max_new_tokens, integer=True)
            if self.max_new_tokens < 1:
                raise ValueError(
                    f"SamplingParams.max_new_tokens must be >= 1 (or None), "
                    f"got {self.max_new_tokens}"
                )

    @classmethod
    def from_kwargs(cls, **kwargs) -> SamplingParams:
        """Build from keyword arguments, naming any unknown one in the error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"unknown sampling argument(s) {unknown}; expected some of {sorted(known)}"
            )
        return cls(**kwargs)
