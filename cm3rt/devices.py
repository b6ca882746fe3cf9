"""Where and in what precision cm3rt runs: the one place that names devices and dtypes.

Every front door (``cm3rt.generate``, the CLI, the server) and every loader resolves its
``device`` / ``dtype`` arguments here, so a name means the same everywhere and a bad one
gets the same clear error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's parser stays torch-free
    import torch

# Weight / activation dtypes the model and the kernels support (torch attribute names) ...
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
# ... and the other names they go by.
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16",
                 "fp16": "float16", "half": "float16"}


# Weight formats beyond the activation dtypes: int8 weight-only (per-channel scales, quantised
# at load; activations in :func:`int8_activation_dtype`).
WEIGHT_ONLY = ("int8",)


def resolve_weight_dtype(dtype: torch.dtype | str | None, device: torch.device | str = "cpu",
                         name: str = "dtype") -> tuple[torch.dtype, bool]:
    """(activation dtype, int8 weights?) of a model's ``dtype`` argument: one of
    :func:`resolve_dtype`'s, or ``"int8"`` (weight-only int8, activations in
    :func:`int8_activation_dtype`)."""
    if isinstance(dtype, str) and dtype.lower() in WEIGHT_ONLY:
        resolve_dtype(None, device, name)  # the same checks of the device
        return int8_activation_dtype(device), True
    return resolve_dtype(dtype, device, name), False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512_BF16, which AMX CPUs have)."""
    import torch

    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def int8_activation_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """Activations (and KV cache) of an int8 weight-only model: bfloat16 on CUDA and on CPUs
    with native bf16 (:func:`cpu_has_native_bf16`), float32 on other CPUs. A decode step
    reads the KV cache as well as the weights, so an fp32 cache would cap int8's gain: on the
    mid-size benchmark model it is ~40% of an int8 step's bytes."""
    import torch

    if torch.device(device).type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def supported_dtypes() -> tuple[torch.dtype, ...]:
    import torch

    return tuple(getattr(torch, name) for name in DTYPE_CHOICES)


def cuda_usable() -> bool:
    """True when torch sees a CUDA device and cm3rt's CUDA kernels are compiled in."""
    import torch

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
    import torch

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
    """A supported dtype from a torch dtype, a name (:data:`DTYPE_CHOICES`, :data:`DTYPE_ALIASES`), or None (bfloat16
    on CUDA, float32 on the CPU)."""
    import torch

    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in supported_dtypes():
            raise TypeError(f"argument '{name}' must be one of {list(DTYPE_CHOICES)}, got "
                            f"{dtype}")
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"argument '{name}' must be a str or a torch.dtype, got "
                        f"{type(dtype).__name__}")
    canonical = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if canonical not in DTYPE_CHOICES:
        raise ValueError(f"argument '{name}' must be one of {list(DTYPE_CHOICES)} (or "
                         f"{sorted(DTYPE_ALIASES)}; weights also {list(WEIGHT_ONLY)}), got "
                         f"{dtype!r}")
    return getattr(torch, canonical)
