"""Engine-internal state of requests: streams, sample groups and their output grammar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cm3rt.engine.kv_cache import KVSeq
from cm3rt.engine.params import SamplingParams, group_seed
from cm3rt.engine.request import Request, RequestOutput, TokenPrompt
from cm3rt.ops import SAMPLE_MODES
from cm3rt.tokenizer.processor import Processor

if TYPE_CHECKING:
    from cm3rt.engine.sequence import BuiltPrompt

# Allowed-token classes a group samples from (rows of VocabInfo.allowed_table()).
MASK_IMAGE = 0  # inside an image span: image codes only
MASK_TEXT = 1  # text, may open an image span
MASK_TEXT_ONLY = 2  # text, no image output

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(frozen=True)
class VocabInfo:
    """The special ids and image vocabulary the engine's grammar needs.

    Attributes:
        vocab_size: rows of the model's lm_head.
        bos_id, eos_id: begin / end of sequence.
        boi_id, eoi_id: begin-image (``<racm3:break>``) and end-image (``<eoss>``).
        image_token_ids: vocab id of each image code (index = code).
        tokens_per_image: image codes per image span.
        pad_id, mask_id, infill_id: optional specials (None when the vocab lacks them).
        num_spelled: ids below this are tokens the tokenizer spells; lm_head rows past it
            (vocab padded to a multiple of 64, say) are never sampled. None: all are.
    """

    vocab_size: int
    bos_id: int
    eos_id: int
    boi_id: int
    eoi_id: int
    image_token_ids: tuple[int, ...]
    tokens_per_image: int
    pad_id: int | None = None
    mask_id: int | None = None
    infill_id: int | None = None
    num_spelled: int | None = None

    def __post_init__(self) -> None:
        V = self.vocab_size
        for name in ("bos_id", "eos_id", "boi_id", "eoi_id", "pad_id", "mask_id", "infill_id"):
            v = getattr(self, name)
            if v is not None and not (0 <= v < V):
                raise ValueError(f"VocabInfo.{name} must be in [0, {V}), got {v}")
        if not self.image_token_ids:
            raise ValueError("VocabInfo.image_token_ids is empty: the model has no image codes")
        bad = [i for i in self.image_token_ids if not (0 <= i < V)]
        if bad:
            raise ValueError(f"VocabInfo.image_token_ids must be in [0, {V}), got e.g. {bad[0]}")
        if self.tokens_per_image < 1:
            raise ValueError(
                f"VocabInfo.tokens_per_image must be >= 1, got {self.tokens_per_image}"
            )

    @classmethod
    def for_model(cls, model, processor: Processor | None, tokens_per_image: int | None = None,
                  vocab: VocabInfo | None = None) -> VocabInfo:
        """The ids of ``model``'s vocabulary: ``vocab`` if given (checked against the
        model), else from the processor, else from the model config."""
        cfg = model.config
        if vocab is None:
            vocab = (cls.from_processor(processor, cfg.vocab_size, tokens_per_image)
                     if processor is not None else cls.from_model_config(cfg, tokens_per_image))
        if vocab.vocab_size != cfg.vocab_size:
            raise ValueError(f"vocab.vocab_size {vocab.vocab_size} != model vocab_size "
                             f"{cfg.vocab_size}")
        return vocab

    @classmethod
    def from_processor(cls, processor: Processor, vocab_size: int,
                       tokens_per_image: int | None = None) -> VocabInfo:
        """Read the ids from a cm3rt Processor (text + image tokenizer)."""
        if not isinstance(processor, Processor):
            raise TypeError(f"argument 'processor' must be a cm3rt Processor (text + image "
                            f"tokenizer), got {type(processor).__name__}")
        tt = processor.text
        n = tokens_per_image if tokens_per_image is not None else processor.num_image_tokens
        return cls(
            vocab_size=int(vocab_size), bos_id=int(tt.bos_id), eos_id=int(tt.eos_id),
            boi_id=int(tt.boi_id), eoi_id=int(tt.eoi_id),
            image_token_ids=tuple(int(i) for i in tt.image_token_ids.tolist()),
            tokens_per_image=int(n), pad_id=_opt_int(tt.pad_id), mask_id=_opt_int(tt.mask_id),
            infill_id=_opt_int(tt.infill_id), num_spelled=int(tt.vocab_size),
        )

    @classmethod
    def from_model_config(cls, cfg, tokens_per_image: int | None = None):
        """Read the ids from a ChameleonConfig (its ``vocabulary_map`` and ``vq_config``)."""
        if cfg.boi_token_id is None or cfg.eoi_token_id is None or not cfg.image_token_ids:
            raise ValueError("the model config has no image vocabulary (vocabulary_map with "
                             "<racm3:break>, <eoss> and IMGIMG tokens); pass a processor or "
                             "vocab=VocabInfo(...)")
        n = tokens_per_image if tokens_per_image is not None else tokens_per_image_of(cfg)
        vmap = cfg.vocabulary_map or {}
        return cls(
            vocab_size=int(cfg.vocab_size), bos_id=int(cfg.bos_token_id),
            eos_id=int(cfg.eos_token_id), boi_id=int(cfg.boi_token_id),
            eoi_id=int(cfg.eoi_token_id), image_token_ids=tuple(cfg.image_token_ids),
            tokens_per_image=n, pad_id=_opt_int(cfg.pad_token_id),
            mask_id=_opt_int(vmap.get("<mask>")), infill_id=_opt_int(vmap.get("<infill>")),
        )

    def allowed_table(self, device) -> torch.Tensor:
        """bool [3, V]: the allowed tokens of MASK_IMAGE, MASK_TEXT, MASK_TEXT_ONLY."""
        V = self.vocab_size
        table = torch.zeros(3, V, dtype=torch.bool)
        img = torch.tensor(self.image_token_ids, dtype=torch.long)
        table[MASK_IMAGE, img] = True
        text = torch.ones(V, dtype=torch.bool)
        text[img] = False
        text[self.eoi_id] = False
        if self.pad_id is not None and self.pad_id != self.eos_id:
            text[self.pad_id] = False
        if self.num_spelled is not None and self.num_spelled < V:
            text[self.num_spelled:] = False
        table[MASK_TEXT] = text
        table[MASK_TEXT_ONLY] = text
        table[MASK_TEXT_ONLY, self.boi_id] = False
        return table.to(device)


def tokens_per_image_of(cfg) -> int:
    """Image tokens per image from a config's ``vq_config``: the VQGAN downsamples by
    2^(levels - 1), so a ``resolution`` px image gives ``(resolution / 2^(L-1))^2`` codes
    (Chameleon: 512 px, 5 levels -> 32 x 32 = 1024)."""
    vq = cfg.vq_config or {}
    res = int(vq.get("resolution", 512))
    levels = len(vq.get("channel_multiplier", (1, 1, 2, 2, 4)))
    side = res // (2 ** (levels - 1))
    if side < 1:
        raise ValueError(f"vq_config: resolution {res} with {levels} levels leaves no tokens")
    return side * side


def _opt_int(v) -> int | None:
    return None if v is None else int(v)


class Stream(KVSeq):
    """One token stream of a group: role "cond", "image_cond" or "uncond"."""

    def __init__(self, role: str, tokens: list[int], content_keys=None):
        super().__init__(tokens=list(tokens), content_keys=list(content_keys or []))
        self.role = role

    @property
    def remaining(self) -> int:
        """Tokens not yet in the cache (>= 1 while the group is live)."""
        return len(self.tokens) - self.num_computed


class Group:
    """One sample of a request: its streams advance in lockstep, each receiving every token
    the group samples. Tracks the output grammar (text / image span) of the sample."""

    def __init__(self, req: RequestState, index: int, streams: list[Stream], seed: int,
                 in_image: bool):
        self.req = req
        self.index = index
        self.streams = streams
        self.seed = seed
        self.leader: Group | None = None  # set while this sample waits to fork the leader
        self.generated: list[int] = []
        self.logprobs: list[float] = []
        self.in_image = in_image
        self.image_pos = 0
        self.images_done = 0
        self.finished = False
        self.finish_reason: str | None = None
        self._sampler_args: dict[bool, tuple[tuple[int, ...], tuple[float, ...]]] = {}

    @property
    def active(self) -> bool:
        return not self.finished and self.leader is None

    def mask_kind(self) -> int:
        if self.in_image:
            return MASK_IMAGE
        return MASK_TEXT if self.req.spec.allow_images else MASK_TEXT_ONLY

    def guided(self) -> bool:
        """CFG / CD-K applies: inside an image span and the group has guidance streams."""
        return self.in_image and len(self.streams) > 1

    def sampler_args(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """This sample's arguments to the sampler, as a step packs them (``step_inputs``):
        (streams, mode, top_k, cd_k, mask_kind) and (temperature, top_p, cfg_scale,
        cfg_image_scale, cd_alpha). They change only when the sample enters or leaves an
        image span, so they are built once per state: every decode step packs them."""
        args = self._sampler_args.get(self.in_image)
        if args is None:
            p, guided = self.req.params, self.guided()
            ints = (len(self.streams) if guided else 1,
                    SAMPLE_MODES[p.guidance] if guided else 0, p.top_k, p.cd_k,
                    self.mask_kind())
            floats = (p.temperature, p.top_p, p.cfg_scale, p.cfg_image_scale, p.cd_alpha)
            args = self._sampler_args[self.in_image] = (ints, floats)
        return args

    def _push(self, token: int, logprob: float) -> None:
        for s in self.streams:
            s.tokens.append(token)
        self.generated.append(token)
        self.logprobs.append(logprob)

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.finish_reason = reason

    def accept(self, token: int, logprob: float, vocab: VocabInfo, max_new: int,
               max_len: int) -> list[tuple[int, float, int | None, int | None]]:
        """Append a sampled token (plus a forced end-of-image after the last code) and
        update the grammar. Returns (token, logprob, image_index, image_pos) per token."""
        events = []
        if self.in_image:
            events.append((token, logprob, self.images_done, self.image_pos))
            self._push(token, logprob)
            self.image_pos += 1
            if self.image_pos == vocab.tokens_per_image and self._room(max_new, max_len):
                # The span is complete: end-of-image is forced, not sampled.
                events.append((vocab.eoi_id, 0.0, self.images_done, None))
                self._push(vocab.eoi_id, 0.0)
                self.in_image = False
                self.image_pos = 0
                self.images_done += 1
                stop = self.req.spec.stop_after_images
                if stop is not None and self.images_done >= stop:
                    self._finish("stop")
        else:
            events.append((token, logprob, None, None))
            self._push(token, logprob)
            if token == vocab.boi_id:
                self.in_image = True
                self.image_pos = 0
            elif token == vocab.eos_id:
                self._finish("stop")
        if not self.finished and not self._room(max_new, max_len):
            self._finish("length")
        return events

    def _room(self, max_new: int, max_len: int) -> bool:
        return len(self.generated) < max_new and len(self.streams[0].tokens) < max_len


class RequestState:
    """A request inside the engine: its prompt streams, sample groups and status."""

    def __init__(self, request_id: str, arrival: int, request: Request, spec: TokenPrompt,
                 params: SamplingParams, max_new_tokens: int, starts_in_image: bool,
                 prompt_text: str = "", docs: list[Any] | None = None):
        self.request_id = request_id
        self.arrival = arrival
        self.request = request
        self.spec = spec
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.starts_in_image = starts_in_image
        self.prompt_text = prompt_text
        self.docs = docs or []
        self.status = WAITING
        self.error: Exception | None = None
        self.num_preemptions = 0
        self.groups: list[Group] = []
        self.output: RequestOutput | None = None

    @property
    def live_groups(self) -> list[Group]:
        return [g for g in self.groups if not g.finished]

    @property
    def num_live_streams(self) -> int:
        return sum(len(g.streams) for g in self.groups if not g.finished)

    @property
    def finished(self) -> bool:
        return all(g.finished for g in self.groups)


def new_request_state(request_id: str, arrival: int, request: Request,
                      built: BuiltPrompt) -> RequestState:
    """A request's state with its ``params.n`` groups of streams (cond [, image-cond],
    uncond per the guidance). Samples 1..n-1 wait to fork sample 0's computed prompt."""
    params, spec = request.params, built.spec
    req = RequestState(request_id, arrival, request, spec, params, built.max_new_tokens,
                       built.starts_in_image, prompt_text=built.prompt_text, docs=built.docs)
    roles = stream_roles(spec, params)
    for i in range(params.n):
        streams = [Stream(role, ids, spec.content_keys.get(role)) for role, ids in roles]
        req.groups.append(Group(req, i, streams, group_seed(params.seed, i),
                                built.starts_in_image))
    for g in req.groups[1:]:
        g.leader = req.groups[0]
    return req


def stream_roles(spec: TokenPrompt, params: SamplingParams) -> list[tuple[str, list[int]]]:
    """(role, prompt ids) of each stream of a group, in sampler row order."""
    roles = [("cond", spec.cond)]
    if params.guidance == "cfg3" and spec.image_cond is not None:
        roles.append(("image_cond", spec.image_cond))
    if params.guidance != "none" and spec.uncond is not None:
        roles.append(("uncond", spec.uncond))
    return roles
