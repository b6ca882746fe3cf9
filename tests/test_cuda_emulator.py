"""The CUDA emulator itself (tools/cuda_emu/, module cm3rt._emu): its PTX / warp-primitive
models against the PTX ISA, and each detector on a deliberately broken kernel (which it must
catch, naming kernel, thread, block and address) and on the fixed twin (which must run clean).

The shipped kernels run under the emulator in the device-parametrised kernel tests
(``device="emu"``: test_attention.py, test_sampling.py, test_vq.py, test_linear.py).
"""

from __future__ import annotations

import re
from pathlib import Path

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
    "static_shared_bounds": ("memcheck", "static_shared_overflow", "thread (0,0,0) of block (0,0,0)",
                             (r"static shared memory outside every __shared__ variable, byte "
                              r"offset 256 of .*static_shared_overflow.*::s \(256 bytes\)")),
    "cp_async_source": ("memcheck", "cp_async_source_past_end", "thread (31,0,0) of block (0,0,0)",
                        r"invalid read of 16 bytes .*byte offset 512 of 'in'"),
    "race_raw": ("racecheck", "missing_syncthreads", "thread (32,0,0) of block (0,0,0)",
                 r"read of 4 bytes .* races with a write by thread \(0,0,0\)"),
    "race_war": ("racecheck", "missing_syncwarp", "of block (0,0,0)",
                 r"write of 4 bytes .* races with a read by thread"),
    "race_waw": ("racecheck", "everyone_writes_one_slot", "thread (1,0,0) of block (0,0,0)",
                 r"write of 4 bytes .* races with a write by thread \(0,0,0\)"),
    "cp_async_wait": ("racecheck", "read_before_wait", "thread (0,0,0) of block (0,0,0)",
                      (r"reads a cp.async destination .* before its cp.async.wait_group "
                       r"\(dynamic shared memory \+ 256")),
    "global_race": ("racecheck", "blocks_write_the_same_output", "thread (0,0,0) of block (1,0,0)",
                    (r"write of 4 bytes .*byte offset 0 of 'out'\) touches a byte that block "
                     r"\(0,0,0\) wrote in the same launch")),
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


def _global_kernels_in_sources() -> set[str]:
    """The names of every __global__ function in csrc/."""
    root = Path(__file__).resolve().parents[1] / "csrc"
    pattern = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(")
    names = set()
    for path in list(root.rglob("*.cu")) + list(root.rglob("*.cuh")):
        names |= set(pattern.findall(path.read_text()))
    return names


def test_every_kernel_runs_under_the_emulator(emu):
    """Every __global__ kernel of csrc/, and every instantiation the launchers can pick, runs
    through its production launcher under the emulator (with zero findings): one small call
    per path. The device-parametrised tests check the results against the CPU twins."""
    from cm3rt import ops

    g = torch.Generator().manual_seed(0)
    with ops.emulated():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            # kv_append: 16-byte rows, then rows that are not 16-byte aligned (2-byte path)
            kc = torch.zeros(4, 16, 2, 8, dtype=dtype)
            vc = torch.zeros_like(kc)
            k = torch.randn(3, 2, 9, generator=g).to(dtype)
            slots = torch.tensor([0, 17, 40], dtype=torch.int32)
            k8 = k[:, :, :8].contiguous()
            ops.kv_append(k8, k8, kc, vc, slots)
            ops.kv_append(k[:, :, 1:], k[:, :, 1:], kc, vc, slots)
            assert torch.equal(kc[1, 1], k[1, :, 1:])
            # attention: prefill (tensor-core for 16-bit, SIMT for float32) and split-KV decode
            ws_kc = torch.randn(40, 16, 1, 64, generator=g).to(dtype)
            table = torch.arange(40, dtype=torch.int32)[None]
            q = torch.randn(2, 2, 64, generator=g).to(dtype)
            for T, mq in ((2, None), (1, 1)):
                ops.paged_attention(q[:T], ws_kc, ws_kc, table,
                                    torch.tensor([600], dtype=torch.int32),
                                    torch.tensor([0, T], dtype=torch.int32), max_q_len=mq)
            # vq: nearest with and without given norms, embed on 16-byte and 2-byte rows
            cb = torch.randn(70, 8, generator=g).to(dtype)
            z = torch.randn(5, 8, generator=g).to(dtype)
            ops.vq_nearest(z, cb)
            ops.vq_nearest(z, cb, (cb.double() ** 2).sum(1).float())
            ops.vq_embed(torch.tensor([1, 2]), cb)
            ops.vq_embed(torch.tensor([1, 2]), cb[:, :3])
            # sample_logits: vector loads (V a multiple of 16 bytes) and scalar loads
            for V in (64, 37):
                ops.sample_logits(torch.randn(2, V, generator=g).to(dtype), 2, mode="cfg",
                                  top_k=5, top_p=0.9, seed=1, step=0)
        for x_dtype in (torch.float32, torch.bfloat16):
            for w_dtype in (torch.float32, torch.bfloat16, torch.int8):
                x = torch.randn(3, 40, generator=g).to(x_dtype)
                w = torch.randn(5, 40, generator=g)
                scales = None
                if w_dtype == torch.int8:
                    w, scales = ops.quantize_int8(w)
                ops.linear(x, w.to(w_dtype), scales)
    launched = set(emu.launched_kernels())
    base = {re.sub(r"<.*", "", name).split("::")[-1] for name in launched}
    in_sources = _global_kernels_in_sources()
    assert len(in_sources) == 11, in_sources
    assert in_sources <= base, f"never launched: {sorted(in_sources - base)}"
    # the instantiations, by the launchers' choices (names as g++ spells them)
    for want in ("prefill_mma_kernel<cm3rt::half_t", "prefill_mma_kernel<cm3rt::bf16_t",
                 "kv_append_kernel<int4>", "kv_append_kernel<short unsigned int>",
                 "vq_nearest_kernel<float, true>", "vq_nearest_kernel<float, false>",
                 "vq_nearest_kernel<cm3rt::half_t, true>", "vq_nearest_kernel<cm3rt::bf16_t, true>",
                 "vq_embed_kernel<int4>", "vq_embed_kernel<short unsigned int>",
                 "sample_logits_kernel<float, 4>", "sample_logits_kernel<float, 1>",
                 "sample_logits_kernel<cm3rt::half_t, 8>", "sample_logits_kernel<cm3rt::bf16_t, 1>",
                 "linear_kernel<float, signed char>", "linear_kernel<cm3rt::bf16_t, cm3rt::bf16_t>"):
        assert any(want in name for name in launched), (want, sorted(launched))
