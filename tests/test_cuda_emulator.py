"""The CUDA emulator itself (tools/cuda_emu/, module cm3rt._emu): its PTX / warp-primitive
models against the PTX ISA, and each detector on a deliberately broken kernel (which it must
catch, naming kernel, thread, block and address) and on the fixed twin (which must run clean).

The shipped kernels run under the emulator in the device-parametrised kernel tests
(``device="emu"``: test_attention.py, test_sampling.py, test_vq.py, test_linear.py).
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import EMU_READY

pytestmark = [pytest.mark.emu,
              pytest.mark.skipif(not EMU_READY, reason="cm3rt._emu not built (tools/cuda_emu/build.sh)")]


@pytest.fixture(scope="module")
def emu():
    from cm3rt import _emu
    return _emu


PRIMITIVES = ["shfl_sync_modes", "vote_reduce_atomic", "ldmatrix_x4", "mma_m16n8k16", "cp_async",
              "f16_decode"]

# broken kernel -> (detector, kernel, the thread and block that must be named, more text)
BROKEN = {
    "global_read": ("memcheck", "global_read_past_end", "thread (63,0,0) of block (1,0,0)",
                    r"invalid read of 4 bytes at 0x[0-9a-f]+ .*byte offset 512 of 'in'"),
    "global_write": ("memcheck", "global_write_before_start", "thread (0,0,0) of block (0,0,0)",
                     r"invalid write of 4 bytes at 0x[0-9a-f]+ .*byte offset -16 of 'out'"),
    "misaligned": ("memcheck", "misaligned_vector_load", "thread (0,0,0) of block (0,0,0)",
                   r"misaligned read of 16 bytes"),
    "shared_bounds": ("memcheck", "dynamic_shared_overflow", "thread (63,0,0) of block (0,0,0)",
                      r"dynamic shared memory \+ 256, beyond the 256 bytes the launch gave"),
    "cp_async_source": ("memcheck", "cp_async_source_past_end", "thread (31,0,0) of block (0,0,0)",
                        r"invalid read of 16 bytes .*byte offset 512 of 'in'"),
    "race_raw": ("racecheck", "missing_syncthreads", "thread (32,0,0) of block (0,0,0)",
                 r"read of 4 bytes .* races with a write by thread \(0,0,0\)"),
    "race_war": ("racecheck", "missing_syncwarp", "of block (0,0,0)",
                 r"write of 4 bytes .* races with a read by thread"),
    "race_waw": ("racecheck", "everyone_writes_one_slot", "thread (1,0,0) of block (0,0,0)",
                 r"write of 4 bytes .* races with a write by thread \(0,0,0\)"),
    "cp_async_wait": ("racecheck", "read_before_wait", "thread (0,0,0) of block (0,0,0)",
                      r"reads a cp.async destination .* before its cp.async.wait_group"),
    "uninit": ("initcheck", "uninitialised_shared", "thread (0,0,0) of block (0,0,0)",
               r"reads shared memory this block never wrote"),
    "divergent_barrier": ("synccheck", "divergent_barrier", "thread (32,0,0) of block (0,0,0)",
                          (r"divergent __syncthreads .* waits at broken_kernels.cu:\d+, .* at "
                           r"broken_kernels.cu:\d+")),
    "barrier_exit": ("synccheck", "barrier_after_early_exit", "thread (5,0,0) of block (0,0,0)",
                     r"__syncthreads at broken_kernels.cu:\d+ .* is not reached by"),
    "shuffle_exit": ("synccheck", "shuffle_after_exit", "thread (3,0,0) of block (0,0,0)",
                     r"exited while its warp waits in __shfl_xor_sync"),
}


def test_every_selftest_is_covered(emu):
    names = set(emu.selftest_names())
    want = set(PRIMITIVES) | {f"broken_{b}" for b in BROKEN} | {f"fixed_{b}" for b in BROKEN}
    assert names == want


@pytest.mark.parametrize("name", PRIMITIVES)
def test_primitive_matches_ptx_isa(emu, name):
    report = emu.selftest(name)
    assert report and "fail" not in report


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_detector_catches_broken_kernel(emu, name):
    detector, kernel, who, detail = BROKEN[name]
    with pytest.raises(RuntimeError) as info:
        emu.selftest(f"broken_{name}")
    msg = str(info.value)
    assert msg.startswith("cuda emulator:"), msg
    # the finding of this detector names the kernel, the thread and block, and the address
    findings = [line for line in msg.splitlines() if detector + ":" in line]
    assert findings, msg
    assert any(kernel in f and who in f and re.search(detail, f) for f in findings), msg


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_fixed_twin_runs_clean(emu, name):
    assert emu.selftest(f"fixed_{name}") == "ran clean"


def test_emulated_device_and_the_ops(emu):
    """ops.emulated() routes the ops through cm3rt._emu, which reports one CUDA device of an
    H100 / H200's size to the launch planners; an out-of-range vq_embed index (unchecked on
    CUDA without validate) must give a zero row without any access outside the codebook,
    which the emulator checks."""
    from cm3rt import ops

    cb = torch.randn(10, 8)
    with ops.emulated():
        out = ops.vq_embed(torch.tensor([1, 99, 2]), cb)
        assert torch.equal(out[1], torch.zeros(8)) and torch.equal(out[0], cb[1])
    assert emu.cuda_sm_count(0) == 132 and emu.cuda_device_count() == 1
    assert emu.EMULATED and emu.built_with_cuda()
    assert emu.stats()["checked_accesses"] > 0
