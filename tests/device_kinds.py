"""The devices the kernel tests run on, and what each implies for a test.

``device`` (conftest.py) is "cpu", "cuda", or an :class:`EmulatedDevice`: the CUDA kernels
under the CPU emulator (cm3rt._emu). An emulated device is the string "cpu" to torch (its
device memory is host memory) but runs the CUDA code paths, so tests ask
:func:`cuda_kernels` rather than comparing with "cuda", and :func:`emulated` where a case
must be trimmed for the emulator's speed.
"""

from __future__ import annotations

EMU = "emu"


class EmulatedDevice(str):
    """The emulated CUDA device: ``"cpu"`` for torch, ``repr`` ``emu`` for test ids."""

    def __new__(cls) -> EmulatedDevice:  # noqa: PYI034 (a str subclass with no state)
        return super().__new__(cls, "cpu")

    def __repr__(self) -> str:
        return EMU


def emulated(device) -> bool:
    return isinstance(device, EmulatedDevice)


def cuda_kernels(device) -> bool:
    """True when the ops run the CUDA kernels: on a GPU, or under the emulator."""
    return device == "cuda" or emulated(device)
