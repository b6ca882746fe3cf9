"""Loads the compiled kernel module ``cm3rt._C`` with an actionable error if it is missing."""

from __future__ import annotations

try:
    from cm3rt import _C
except ImportError as exc:  # pragma: no cover - only hit on a broken install
    raise ImportError(
        "cm3rt's compiled kernels (cm3rt._C) are missing or failed to load: "
        f"{exc}. Install with `pip install .` (or `tools/dev_build.sh` in a checkout)."
    ) from exc

__all__ = ["_C"]
