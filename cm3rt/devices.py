"""Where and in what precision cm3rt runs: the one place that names devices and dtypes.

Every front door (``cm3rt.generate``, the CLI, the server) and every loader resolves its
``device`` / ``dtype`` arguments here, so a name means the same everywhere and a bad one
gets the same clear error.
"""

from __future__ import annotations

import torch

# Weight / activation dtypes the model and the kernels support, by every accepted name.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The canonical names, for command-line choices and messages.
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def cuda_usable() -> bool:
    """True when torch sees a CUDA device and cm3rt's CUDA kernels are compiled in."""
    if not torch.cuda.is_available():
        return False
    from cm3rt import ops

    return ops.cuda_available()


def default_device() -> str:
    """"cuda" when :func:`cuda_usable`, else "cpu"."""
    return "cuda" if cuda_usable() else "cpu"


def resolve_device(device: torch.device | str | None, name: str = "device", *,
                   need_kernels: bool = True) -> torch.device:
    """A usable torch device from ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a torch.device or
    None (:func:`default_device`). ValueError naming argument ``name`` for anything else,
    and for CUDA where torch sees no CUDA device or (``need_kernels``: code that runs
    cm3rt's own kernels) cm3rt was built without them."""
    if device is None:
        return torch.device(default_device())
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"argument '{name}' must be a str such as 'cpu' or 'cuda', got "
                        f"{type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"argument '{name}' must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"argument '{name}' is {device!r} but no CUDA device is available "
                             "(use 'cpu')")
        from cm3rt import ops

        if need_kernels and not ops.cuda_available():
            raise ValueError(f"argument '{name}' is {device!r} but cm3rt was built without "
                             "CUDA kernels (use 'cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"argument '{name}' is {device!r} but only "
                             f"{torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str = "cpu",
                  name: str = "dtype") -> torch.dtype:
    """A supported dtype from a torch dtype, one of :data:`DTYPE_NAMES`, or None (bfloat16
    on CUDA, float32 on the CPU)."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"argument '{name}' must be one of {list(DTYPE_CHOICES)}, got "
                             f"{dtype}")
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"argument '{name}' must be a str or a torch.dtype, got "
                        f"{type(dtype).__name__}")
    found = DTYPE_NAMES.get(dtype.lower())
    if found is None:
        raise ValueError(f"argument '{name}' must be one of {list(DTYPE_CHOICES)} (or "
                         f"{sorted(set(DTYPE_NAMES) - set(DTYPE_CHOICES))}), got {dtype!r}")
    return found
