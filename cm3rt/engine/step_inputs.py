"""The device inputs of one engine step, packed into three host->device copies.

A step needs, for T packed tokens of B sequences and G sampling groups (R logit rows):
token ids and positions, cache slots, block tables, lengths, the rows each group samples
from and every group's sampling parameters. They are laid out in one int64, one int32 and
one float32 host buffer, copied once each, and handed out as views.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import chain

import torch

from cm3rt.engine.scheduler import SchedulerOutput
from cm3rt.model.step import StepMetadata


@dataclass
class StepInputs:
    """Views into the packed device buffers (see the module docstring)."""

    ids: torch.Tensor  # int64 [T]
    pos: torch.Tensor  # int64 [T]
    meta: StepMetadata
    rows: torch.Tensor  # int64 [R]: logit rows of the sampling groups, group rows adjacent
    # Sampler arguments, one entry per group.
    streams: torch.Tensor  # int32 [G]
    mode: torch.Tensor  # int32 [G]
    top_k: torch.Tensor  # int32 [G]
    cd_k: torch.Tensor  # int32 [G]
    mask_kind: torch.Tensor  # int32 [G]: row of the engine's allowed-token table
    seed: torch.Tensor  # int64 [G]
    step: torch.Tensor  # int64 [G]
    temperature: torch.Tensor  # float32 [G]
    top_p: torch.Tensor
    cfg_scale: torch.Tensor
    cfg_image_scale: torch.Tensor
    cd_alpha: torch.Tensor


@dataclass
class PackedStep:
    """The host side of a step: the three buffers and the sizes that cut them into views.
    Under tensor parallelism the driver broadcasts exactly this (``dims`` + buffers)."""

    i64: torch.Tensor  # ids, pos, rows, seed, step
    i32: torch.Tensor  # slots, seq_lens, cu_seqlens_q, block tables, group ints
    f32: torch.Tensor  # group floats
    dims: tuple[int, ...]  # T, B, R, G, MB, max_q_len, max_seq_len

    def to_device(self, device: torch.device) -> StepInputs:
        """Copy the buffers to ``device`` (one copy each) and cut them into views."""
        T, B, R, G, mb, max_q_len, max_seq_len = self.dims
        i64, i32, f32 = (_to_device(b, device) for b in (self.i64, self.i32, self.f32))
        # One split a buffer (the sizes add up to its length): a view each, in one torch call.
        v_ids, v_pos, v_rows, v_seed, v_step = i64.split_with_sizes((T, T, R, G, G))
        v_slots, v_lens, v_cu, v_tab, v_str, v_mode, v_topk, v_cdk, v_kind = \
            i32.split_with_sizes((T, B, B + 1, B * mb, G, G, G, G, G))
        v_temp, v_topp, v_cfg, v_cfgi, v_cda = f32.split_with_sizes((G,) * 5)
        meta = StepMetadata(slots=v_slots, block_tables=v_tab.view(B, mb), seq_lens=v_lens,
                            cu_seqlens_q=v_cu, max_q_len=max_q_len, max_seq_len=max_seq_len)
        return StepInputs(ids=v_ids, pos=v_pos, meta=meta, rows=v_rows, streams=v_str,
                          mode=v_mode, top_k=v_topk, cd_k=v_cdk, mask_kind=v_kind, seed=v_seed,
                          step=v_step, temperature=v_temp, top_p=v_topp, cfg_scale=v_cfg,
                          cfg_image_scale=v_cfgi, cd_alpha=v_cda)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def pack_step(out: SchedulerOutput, block_size: int) -> PackedStep:
    """Pack ``out``'s chunks and sampling groups into the three host buffers."""
    chunks = out.chunks
    bs = block_size
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    seq_lens: list[int] = []
    cu = [0]
    row_of: dict[int, int] = {}
    mb = max(len(c.stream.blocks) for c in chunks)
    tables: list[int] = []
    total = 0  # tokens packed so far
    for c in chunks:
        s, start, n = c.stream, c.start, c.n
        end = start + n
        blocks = s.blocks
        if n == 1:  # a decode step's chunk: the fast path of every step
            ids.append(s.tokens[start])
            pos.append(start)
            slots.append(blocks[start // bs] * bs + start % bs)
        else:
            ids.extend(s.tokens[start:end])
            pos.extend(range(start, end))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
        seq_lens.append(end)
        total += n
        cu.append(total)
        row_of[id(s)] = total - 1  # the stream's last token this step
        tables.extend(blocks)
        if len(blocks) < mb:
            tables.extend([0] * (mb - len(blocks)))

    rows: list[int] = []
    seeds: list[int] = []
    steps: list[int] = []
    g_ints: list[tuple[int, ...]] = []  # per group: streams, mode, top_k, cd_k, mask_kind
    g_floats: list[tuple[float, ...]] = []
    for g in out.samples:
        ints, floats = g.sampler_args()
        src = g.leader if g.leader is not None else g  # a fork samples its leader's rows
        rows.extend(row_of[id(s)] for s in src.streams[:ints[0]])
        seeds.append(g.seed)
        steps.append(len(g.generated))
        g_ints.append(ints)
        g_floats.append(floats)

    dims = (len(ids), len(seq_lens), len(rows), len(out.samples), mb,
            max(c.n for c in chunks), max(seq_lens))
    # The group arguments field by field ([G] each): the transposes of g_ints and g_floats.
    return PackedStep(
        i64=_host_tensor("q", chain(ids, pos, rows, seeds, steps), torch.int64),
        i32=_host_tensor("i", chain(slots, seq_lens, cu, tables, *zip(*g_ints)), torch.int32),
        f32=_host_tensor("f", chain(*zip(*g_floats)), torch.float32),
        dims=dims)


def _host_tensor(typecode: str, values, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D CPU tensor of ``values``: packed by ``array`` and wrapped without a copy (the
    tensor keeps the array alive), about 3x cheaper per step than ``torch.tensor(list)``."""
    buf = array(typecode, values)
    if not buf:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype)


def build_step_inputs(out: SchedulerOutput, block_size: int,
                      device: torch.device) -> StepInputs:
    """Pack ``out``'s chunks and sampling groups into device tensors."""
    return pack_step(out, block_size).to_device(device)
