"""Loads the compiled kernel module ``cm3rt._C`` with an actionable error if it is missing."""

from __future__ import annotations

try:
    from cm3rt import _C
except ImportError as exc:  # pragma: no cover - only hit on a broken install
    raise ImportError(
        "cm3rt's compiled kernels (cm3rt._C) are missing or failed to load: "
        f"{exc}. Install with `pip install .` (or `tools/dev_build.sh` in a checkout)."
    ) from exc



def load_emulator():
    """``cm3rt._emu``: the same bindings over the CUDA kernels running under the CPU emulator
    (tools/cuda_emu/; built by ``tools/cuda_emu/build.sh``, never by ``pip install``)."""
    try:
        from cm3rt import _emu
    except ImportError as exc:
        raise ImportError(
            f"cm3rt's CUDA emulator module (cm3rt._emu) is not built: {exc}. Build it with "
            "`tools/cuda_emu/build.sh` in a checkout."
        ) from exc
    return _emu


__all__ = ["_C", "load_emulator"]
