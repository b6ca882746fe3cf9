"""Quality evaluation of a shapes-world model: prompt adherence per sampling setting, with
and without retrieval, best-of-n reranked by CLIP, captioning, CM3 infilling and
text-guided edits, checked against the default model's quality targets (see
:func:`evaluate_targets`).

    engine = cm3rt.api.load_engine("cm3rt/assets/default")
    report = run_quality(engine, bank, QualityConfig(prompts=200, captions=200))
    print(format_report(report))

Adherence: for each setting (guidance none / cfg at each scale / cdk, retrieval off and
on) every prompt of a set draws one image (one request each, all of a setting submitted
at once so the engine batches them); the score is the share of images the analyzer reads
as exactly what the prompt asks for (``metrics.adheres``). Every setting uses the same
per-prompt seeds, so settings differ by their guidance and retrieval, not by luck of the
draw. Train-concept prompts are fresh combinations of concepts seen in training;
held-out prompts name a colour x shape pair the decoder never saw (only the bank has it).
Best-of-n: n samples of each train-concept prompt under the default setting, the one whose
CLIP image embedding is closest to the prompt's kept (of the first k, k = 1, 4, n).
Captioning: fresh renders -> ``image_to_text`` (guidance none) -> the share of captions
that are true and complete (``metrics.caption_correct``). Infill: a render and its
canonical caption with 1-3 words masked -> the span written (exact words). Edits: a
one-object render + "make the <shape> <colour>" (cfg3) -> the image must show the edited
scene, everything else unchanged.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cm3rt.demo.evaluation.metrics import adheres, caption_correct, wilson_interval
from cm3rt.demo.evaluation.prompts import (
    EditItem,
    EvalPrompt,
    InfillItem,
    caption_scenes,
    edit_items,
    held_out_prompts,
    infill_items,
    train_prompts,
)
from cm3rt.demo.shapes import HELD_OUT_PAIRS, Scene, describe, parse_caption
from cm3rt.retrieval.select import DEFAULT_MAX_SCORE

TRAIN_SETTINGS = ("best", "all", "none")

# The default model's quality targets.
TARGET_DEFAULT_ADHERENCE = 0.85  # train-concept prompts, the default setting
TARGET_CFG_TWO_OBJECT_GAIN = 0.05  # best CFG scale over no guidance, two-object prompts
TARGET_RETRIEVAL_GAIN = 0.30  # held-out prompts, default guidance, retrieval on - off
TARGET_HELD_OUT_WITH_RETRIEVAL = 0.60
TARGET_CAPTIONS = 0.90

_SEED_MASK = (1 << 63) - 1
_HELD_TAG, _TRAIN_TAG, _CAPTION_TAG, _BEST_TAG, _INFILL_TAG, _EDIT_TAG = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class Setting:
    """One row of the table: a guidance mode (and scale), retrieval off or on."""

    guidance: str
    retrieval: bool
    cfg_scale: float | None = None

    @property
    def name(self) -> str:
        return f"cfg {self.cfg_scale:g}" if self.guidance == "cfg" else self.guidance


@dataclass
class QualityConfig:
    """What ``run_quality`` evaluates.

    Attributes:
        prompts: held-out prompts per setting.
        train_prompts: train-concept prompts per train row (None: same as ``prompts``).
        captions: fresh renders to caption (0: skip captioning).
        seed: seeds the prompt sets, the scenes to caption and the samplers.
        cfg_scales: CFG scales to evaluate.
        retrieval: also run every setting with retrieval on (needs a bank).
        k_docs: documents retrieved per prompt when retrieval is on.
        train_settings: settings the train-concept prompts run under: "all" (default),
            "best" (the CFG scale with the highest held-out adherence, averaged over
            retrieval off and on, both retrieval modes; and the default setting), or "none".
        default_guidance, default_cfg_scale: the model's own setting (its defaults.json):
            the targets on "the default settings" read that row (retrieval on when run).
        best_of: samples per train-concept prompt for the best-of-n rows (0: skip; needs
            a CLIP ``scorer``).
        infill, edits: items of the infill and edit rows (0: skip).
        temperature, top_k, top_p: image sampling (applied after the guidance combine).
        cd_alpha, cd_k: CD-K parameters.
        uncond_docs: retrieval-on rows put the documents in the unconditional stream too
            (``SamplingParams.uncond_docs``).
        max_doc_score: the retrieval rule dropping documents more similar to the query than
            this (``Request.max_doc_score``; None: off).
        caption_temperature: captioning temperature (0 = greedy).
        caption_max_tokens: most tokens a caption may take.
        caption_k_docs: documents retrieved per caption (the image is the query) in the
            model's own captioning setting; with retrieval on and > 0, captions are scored
            with and without them, and the caption target reads the retrieval row.
        caption_doc_sweep: the model's captioning setting chooses among the captions with
            0..caption_k_docs documents by the bank's CLIP (``Request.doc_sweep``); the
            sweep is then one more caption row, and the default one.
    """

    prompts: int = 200
    train_prompts: int | None = None
    captions: int = 200
    seed: int = 0
    cfg_scales: tuple[float, ...] = (1.5, 3.0, 5.0)
    retrieval: bool = True
    k_docs: int = 2
    train_settings: str = "all"
    default_guidance: str = "cdk"
    default_cfg_scale: float = 3.0
    best_of: int = 8
    infill: int = 200
    edits: int = 200
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cd_alpha: float = 0.1
    cd_k: int = 1
    uncond_docs: bool = False
    max_doc_score: float | None = DEFAULT_MAX_SCORE
    caption_temperature: float = 0.0
    caption_max_tokens: int = 48
    caption_k_docs: int = 0
    caption_doc_sweep: bool = False

    def __post_init__(self) -> None:
        for name in ("prompts", "captions", "seed", "k_docs", "caption_max_tokens", "best_of",
                     "infill", "edits", "caption_k_docs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"QualityConfig.{name} must be an int >= 0, got {v!r}")
        if not isinstance(self.caption_doc_sweep, bool):
            raise TypeError(f"QualityConfig.caption_doc_sweep must be a bool, got "
                            f"{self.caption_doc_sweep!r}")
        if self.caption_max_tokens < 1:
            raise ValueError(f"QualityConfig.caption_max_tokens must be >= 1, got "
                             f"{self.caption_max_tokens}")
        tp = self.train_prompts
        if tp is not None and (isinstance(tp, bool) or not isinstance(tp, int) or tp < 0):
            raise ValueError(f"QualityConfig.train_prompts must be an int >= 0 or None, "
                             f"got {tp!r}")
        scales = tuple(self.cfg_scales)
        if not scales or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                 and np.isfinite(s) for s in scales):
            raise ValueError(f"QualityConfig.cfg_scales must be one or more finite numbers, "
                             f"got {self.cfg_scales!r}")
        self.cfg_scales = tuple(float(s) for s in scales)
        if self.train_settings not in TRAIN_SETTINGS:
            raise ValueError(f"QualityConfig.train_settings must be one of {TRAIN_SETTINGS}, "
                             f"got {self.train_settings!r}")
        if self.retrieval and self.k_docs < 1:
            raise ValueError(f"QualityConfig.k_docs must be >= 1 with retrieval on, "
                             f"got {self.k_docs}")
        if self.default_guidance not in ("none", "cfg", "cdk"):
            raise ValueError(f"QualityConfig.default_guidance must be 'none', 'cfg' or 'cdk', "
                             f"got {self.default_guidance!r}")
        if self.default_setting() not in self.settings():
            raise ValueError(f"QualityConfig.default_cfg_scale {self.default_cfg_scale:g} must "
                             f"be one of cfg_scales {self.cfg_scales}")
        # Fail here, not after an hour of generation: the sampling fields must be valid.
        self.sampling(Setting("cfg", False, self.cfg_scales[0]), 0)

    def default_setting(self, retrieval: bool | None = None) -> Setting:
        """The model's own setting (retrieval on when the run has retrieval)."""
        r = self.retrieval if retrieval is None else retrieval
        scale = float(self.default_cfg_scale) if self.default_guidance == "cfg" else None
        return Setting(self.default_guidance, r, scale)

    @property
    def caption_retrieval(self) -> bool:
        """Whether captions are also scored with retrieved documents (the default then)."""
        return self.retrieval and self.caption_k_docs > 0

    @property
    def caption_default_row(self) -> str:
        """The caption row of the model's own setting: "off", "on" or "sweep"."""
        if not self.caption_retrieval:
            return "off"
        return "sweep" if self.caption_doc_sweep else "on"

    @property
    def n_train(self) -> int:
        return self.prompts if self.train_prompts is None else self.train_prompts

    def settings(self) -> list[Setting]:
        """The table's rows: none, cfg at each scale, cdk; each retrieval off [and on]."""
        modes = (False, True) if self.retrieval else (False,)
        rows = []
        for r in modes:
            rows.append(Setting("none", r))
            rows.extend(Setting("cfg", r, s) for s in self.cfg_scales)
            rows.append(Setting("cdk", r))
        return rows

    def sampling(self, setting: Setting, seed: int, n: int = 1):
        """The SamplingParams of one image (``n`` samples) of ``setting``."""
        from cm3rt.engine.params import SamplingParams

        return SamplingParams(
            guidance=setting.guidance, cfg_scale=setting.cfg_scale or 1.0,
            cd_alpha=self.cd_alpha, cd_k=self.cd_k, uncond_docs=self.uncond_docs,
            temperature=self.temperature,
            top_k=self.top_k, top_p=self.top_p, seed=seed, n=n)


@dataclass
class Score:
    """Successes out of n, with its 95% Wilson interval."""

    n: int
    passed: int
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.passed / self.n if self.n else float("nan")

    def to_dict(self) -> dict[str, Any]:
        lo, hi = wilson_interval(self.passed, self.n)
        return {"n": self.n, "passed": self.passed, "rate": self.rate, "ci95": [lo, hi],
                "errors": self.errors}


@dataclass
class Row:
    """Results of one setting."""

    setting: Setting
    held_out: Score | None = None
    train: Score | None = None
    train_two: Score | None = None  # the two-object train-concept prompts only
    docs_hit: float | None = None  # share of held-out prompts whose docs show the pair
    held_out_results: list[bool] = field(default_factory=list)
    train_results: list[bool] = field(default_factory=list)


@dataclass
class Target:
    """One of the quality targets and how the run did on it."""

    name: str
    value: str
    status: str  # "PASS", "MISS" or "SKIP"


@dataclass
class QualityReport:
    """Everything ``run_quality`` measured."""

    config: QualityConfig
    rows: list[Row]
    captions: Score | None  # the model's captioning setting (with documents when it has)
    caption_examples: list[dict[str, Any]]
    best_of: dict[int, Score]
    infill: Score | None
    edits: Score | None
    task_examples: dict[str, list[dict[str, Any]]]
    targets: list[Target]
    held_out_prompts: list[str]
    train_prompts: list[str]
    wall_s: float
    phase_s: dict[str, float]
    images: int
    info: dict[str, Any] = field(default_factory=dict)
    # Captions by retrieval ("off", and "on" with config.caption_k_docs documents), each
    # split into all scenes / scenes showing a held-out pair ("held_out") / the others.
    caption_rows: dict[str, dict[str, Score]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            rows.append({
                "setting": r.setting.name, "guidance": r.setting.guidance,
                "cfg_scale": r.setting.cfg_scale, "retrieval": r.setting.retrieval,
                "held_out": r.held_out.to_dict() if r.held_out else None,
                "train": r.train.to_dict() if r.train else None,
                "train_two_objects": r.train_two.to_dict() if r.train_two else None,
                "docs_with_held_out_pair": r.docs_hit,
                "held_out_results": r.held_out_results, "train_results": r.train_results,
            })
        return {
            "config": asdict(self.config), "info": self.info, "rows": rows,
            "captions": self.captions.to_dict() if self.captions else None,
            "caption_examples": self.caption_examples,
            "caption_rows": {mode: {k: v.to_dict() for k, v in split.items()}
                             for mode, split in self.caption_rows.items()},
            "best_of": {str(k): v.to_dict() for k, v in self.best_of.items()},
            "infill": self.infill.to_dict() if self.infill else None,
            "edits": self.edits.to_dict() if self.edits else None,
            "task_examples": self.task_examples,
            "targets": [asdict(t) for t in self.targets],
            "held_out_prompts": self.held_out_prompts, "train_prompts": self.train_prompts,
            "wall_s": self.wall_s, "phase_s": self.phase_s, "images": self.images,
        }


# ------------------------------------------------------------------------- running


def _seed(base: int, tag: int, index: int) -> int:
    """Sampler seed of item ``index`` of a set: same for every setting (common numbers)."""
    state = np.random.SeedSequence([base, tag, index]).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & _SEED_MASK


def image_size_of(engine: Any) -> int:
    """The side in pixels of the model's images (its image tokenizer's), 64 if unknown."""
    proc = getattr(engine, "processor", None)
    image_tok = getattr(proc, "image", None) or getattr(proc, "image_tokenizer", None)
    size = getattr(image_tok, "image_size", None)
    return int(size) if size else 64


def _run_requests(engine: Any, requests: list, bar) -> dict[str, Any]:
    """Submit ``requests`` together (one batch for the engine); outputs by request id."""
    outs: dict[str, Any] = {}
    for ev in engine.stream(requests):
        if ev.output is not None:
            outs[ev.request_id] = ev.output
            bar.update(1)
    return outs


def _pairs_in(text: str) -> set[tuple[str, str]]:
    try:
        return {(o.colour, o.shape) for o in parse_caption(text).objects}
    except ValueError:
        return set()


def _image_request(p: EvalPrompt, setting: Setting, cfg: QualityConfig, bank: Any, tag: int,
                   request_id: str, n: int = 1):
    """The text -> image request of prompt ``p`` under ``setting`` (``n`` samples)."""
    from cm3rt.engine.request import Request

    return Request(prompt=p.text, task="text_to_image",
                   params=cfg.sampling(setting, _seed(cfg.seed, tag, p.index), n=n),
                   bank=bank if setting.retrieval else None,
                   k_docs=cfg.k_docs if setting.retrieval else 0,
                   max_doc_score=cfg.max_doc_score, request_id=request_id)


def _adherence(engine: Any, prompts: list[EvalPrompt], setting: Setting,
               cfg: QualityConfig, bank: Any, tag: int, bar) -> tuple[Score, list[bool],
                                                                       float | None]:
    prefix = f"eval-{tag}-{setting.name}-{int(setting.retrieval)}"
    reqs = [_image_request(p, setting, cfg, bank, tag, f"{prefix}-{p.index}") for p in prompts]
    outs = _run_requests(engine, reqs, bar)
    results, errors, hits = [], 0, 0
    for p, r in zip(prompts, reqs):
        out = outs[r.request_id]
        if out.error is not None or out.image is None:
            errors += 1
            results.append(False)
            continue
        results.append(bool(adheres(p.text, out.image)))
        wanted = _pairs_in(p.text) & HELD_OUT_PAIRS
        if wanted and any(_pairs_in(getattr(d, "caption", None) or "") & wanted
                          for d in out.docs):
            hits += 1
    held = any(p.held_out for p in prompts)
    docs_hit = hits / len(prompts) if (setting.retrieval and held and prompts) else None
    return Score(len(prompts), sum(results), errors), results, docs_hit


def _render_size(engine: Any) -> int:
    size = image_size_of(engine)
    return size if size >= 24 else 64  # the renderer's minimum; the processor resizes


def _judge(engine: Any, items: list, reqs: list, bar, judge, keep: int = 10
           ) -> tuple[Score, list[dict[str, Any]]]:
    """Run ``reqs`` (one per item) and score each output: ``judge(item, out) -> (correct,
    example fields)``; the first ``keep`` examples are returned with the score."""
    outs = _run_requests(engine, reqs, bar)
    ok, errors, examples = 0, 0, []
    for item, r in zip(items, reqs):
        out = outs[r.request_id]
        errors += out.error is not None
        good, example = judge(item, out)
        ok += good
        if len(examples) < keep:
            examples.append({**example, "correct": good})
    return Score(len(items), ok, errors), examples


def _text_of(out) -> str:
    return out.text.strip() if out.error is None else ""


def _captioning(engine: Any, scenes: list[Scene], cfg: QualityConfig, bar, bank: Any = None,
                k_docs: int = 0, doc_sweep: bool = False
                ) -> tuple[dict[str, Score], list[dict[str, Any]]]:
    """Caption ``scenes`` (with ``k_docs`` documents from ``bank``, the image the query;
    ``doc_sweep``: the best by the bank's CLIP of the captions with 0..k_docs documents):
    scores over all scenes, those showing a held-out pair, and the others."""
    from cm3rt.engine.params import SamplingParams
    from cm3rt.engine.request import Request

    render = _render_size(engine)
    reqs = [Request(prompt=[scene.render(render)], task="image_to_text",
                    params=SamplingParams(guidance="none", temperature=cfg.caption_temperature,
                                          max_new_tokens=cfg.caption_max_tokens,
                                          seed=_seed(cfg.seed, _CAPTION_TAG, i)),
                    bank=bank if k_docs else None, k_docs=k_docs,
                    max_doc_score=cfg.max_doc_score, doc_sweep=doc_sweep,
                    request_id=f"eval-caption-{k_docs}{'-sweep' if doc_sweep else ''}-{i}")
            for i, scene in enumerate(scenes)]
    results: list[bool] = []

    def judge(scene: Scene, out) -> tuple[bool, dict[str, Any]]:
        text = _text_of(out)
        results.append(caption_correct(text, scene))
        return results[-1], {"caption": text, "scene": scene.describe(),
                             "docs": [getattr(d, "caption", None) for d in out.docs]}

    score, examples = _judge(engine, scenes, reqs, bar, judge, keep=20)
    held = [any((o.colour, o.shape) in HELD_OUT_PAIRS for o in s.objects) for s in scenes]
    split = {"all": score,
             "held_out": Score(sum(held), sum(ok for ok, h in zip(results, held) if h)),
             "others": Score(len(held) - sum(held),
                             sum(ok for ok, h in zip(results, held) if not h))}
    return split, examples


def _image_of(sample) -> Any:
    return next((seg for seg in sample.segments if not isinstance(seg, str)), None)


def _best_of(engine: Any, prompts: list[EvalPrompt], setting: Setting, cfg: QualityConfig,
             bank: Any, scorer, bar) -> dict[int, Score]:
    """Best-of-k (k = 1, 4, n) by ``scorer(prompt, images) -> scores`` (the model's CLIP):
    ``cfg.best_of`` samples per prompt, of the first k the best-scored one is checked."""
    n = cfg.best_of
    ks = sorted({1, 4, n} & set(range(1, n + 1)))
    reqs = [_image_request(p, setting, cfg, bank, _BEST_TAG, f"eval-best-{p.index}", n=n)
            for p in prompts]
    outs = _run_requests(engine, reqs, bar)
    passed, errors = dict.fromkeys(ks, 0), 0
    for p, r in zip(prompts, reqs):
        out = outs[r.request_id]
        images = [] if out.error is not None else [_image_of(x) for x in out.samples]
        if len(images) != n or any(im is None for im in images):
            errors += 1
            continue
        ok = [bool(adheres(p.text, im)) for im in images]
        scores = [float(x) for x in scorer(p.text, images)]
        for k in ks:
            passed[k] += ok[max(range(k), key=lambda j: scores[j])]
    return {k: Score(len(prompts), passed[k], errors) for k in ks}


def _infill(engine: Any, items: list[InfillItem], cfg: QualityConfig,
            bar) -> tuple[Score, list[dict[str, Any]]]:
    from cm3rt.engine.params import SamplingParams
    from cm3rt.engine.request import Request

    render = _render_size(engine)
    reqs = [Request(prompt=[it.scene.render(render), *([it.pre] if it.pre else [])],
                    task="infill", suffix=it.post or None,
                    params=SamplingParams(guidance="none", temperature=0.0,
                                          max_new_tokens=16,
                                          seed=_seed(cfg.seed, _INFILL_TAG, i)),
                    request_id=f"eval-infill-{i}")
            for i, it in enumerate(items)]

    def judge(it: InfillItem, out) -> tuple[bool, dict[str, Any]]:
        text = _text_of(out)
        return text == it.span, {"masked": f"{it.pre}<mask>{it.post}", "want": it.span,
                                 "got": text}

    return _judge(engine, items, reqs, bar, judge)


def _edits(engine: Any, items: list[EditItem], cfg: QualityConfig,
           bar) -> tuple[Score, list[dict[str, Any]]]:
    from cm3rt.engine.params import SamplingParams
    from cm3rt.engine.request import Request

    render = _render_size(engine)
    reqs = [Request(prompt=[it.scene.render(render), it.instruction], task="edit",
                    params=SamplingParams(guidance="cfg3", temperature=cfg.temperature,
                                          top_k=cfg.top_k, top_p=cfg.top_p,
                                          seed=_seed(cfg.seed, _EDIT_TAG, i)),
                    request_id=f"eval-edit-{i}")
            for i, it in enumerate(items)]

    def judge(it: EditItem, out) -> tuple[bool, dict[str, Any]]:
        want = describe(it.target)
        good = out.error is None and bool(adheres(want, out.image))
        return good, {"scene": describe(it.scene), "instruction": it.instruction,
                      "want": want}

    return _judge(engine, items, reqs, bar, judge)


def _best_scale(rows: list[Row], scales: tuple[float, ...]) -> float:
    def mean_rate(s: float) -> float:
        rates = [r.held_out.rate for r in rows
                 if r.setting.guidance == "cfg" and r.setting.cfg_scale == s and r.held_out]
        return float(np.mean(rates)) if rates else -1.0

    return max(scales, key=mean_rate)  # first of equals: max keeps the earliest


def run_quality(engine: Any, bank: Any = None, config: QualityConfig | None = None, *,
                scorer=None, progress: bool = True) -> QualityReport:
    """Run the evaluation on ``engine`` (an :class:`cm3rt.engine.Engine`).

    Args:
        engine: the engine (with a processor: prompts are text, outputs images).
        bank: the memory bank (a MemoryBank or its path) for the retrieval-on rows;
            required when ``config.retrieval``.
        config: what to evaluate (default ``QualityConfig()``).
        scorer: ``scorer(prompt, images) -> scores`` for the best-of-n rows (e.g. the
            model's CLIP, ``ClipEncoder.score``); None skips them.
        progress: show a tqdm bar (on stderr).
    """
    from tqdm import tqdm

    cfg = QualityConfig() if config is None else config
    if not isinstance(cfg, QualityConfig):
        raise TypeError(f"argument 'config' must be a QualityConfig, got {type(cfg).__name__}")
    if cfg.retrieval and bank is None:
        raise ValueError("argument 'bank' is required with retrieval on "
                         "(QualityConfig.retrieval=True); pass a memory bank or turn it off")
    t0 = time.perf_counter()
    held = held_out_prompts(cfg.prompts, cfg.seed)
    train = train_prompts(cfg.n_train, cfg.seed)
    scenes = caption_scenes(cfg.captions, cfg.seed)
    infills = infill_items(cfg.infill, cfg.seed)
    edits = edit_items(cfg.edits, cfg.seed)
    best_n = cfg.best_of if scorer is not None else 0
    rows = [Row(s) for s in cfg.settings()]
    n_train_rows = {"best": 4 if cfg.retrieval else 2, "all": len(rows), "none": 0}
    total = (len(rows) * len(held) + n_train_rows[cfg.train_settings] * len(train)
             + len(scenes) * (2 if cfg.caption_retrieval else 1)
             + (len(train) if best_n else 0) + len(infills) + len(edits))
    bar = tqdm(total=total, unit="req", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    phase: dict[str, float] = {}
    images = 0
    try:
        t = time.perf_counter()
        for row in rows:
            bar.set_description(f"held-out {row.setting.name} "
                                f"r{'+' if row.setting.retrieval else '-'}")
            row.held_out, row.held_out_results, row.docs_hit = _adherence(
                engine, held, row.setting, cfg, bank, _HELD_TAG, bar)
            images += len(held)
        phase["held_out"] = time.perf_counter() - t

        t = time.perf_counter()
        if cfg.train_settings == "all":
            train_rows = rows
        elif cfg.train_settings == "best":
            best = _best_scale(rows, cfg.cfg_scales)
            defaults = {cfg.default_setting(r) for r in (False, True)}
            train_rows = [r for r in rows if r.setting in defaults or (
                r.setting.guidance == "cfg" and r.setting.cfg_scale == best)]
        else:
            train_rows = []
        two = [len(parse_caption(p.text).objects) == 2 for p in train]
        for row in train_rows:
            bar.set_description(f"train {row.setting.name} "
                                f"r{'+' if row.setting.retrieval else '-'}")
            row.train, row.train_results, _ = _adherence(engine, train, row.setting, cfg,
                                                         bank, _TRAIN_TAG, bar)
            row.train_two = Score(sum(two), sum(ok for ok, t in zip(row.train_results, two)
                                                if t))
            images += len(train)
        phase["train"] = time.perf_counter() - t

        t = time.perf_counter()
        best_of: dict[int, Score] = {}
        if best_n and train:
            bar.set_description(f"best of {best_n}")
            best_of = _best_of(engine, train, cfg.default_setting(), cfg, bank, scorer, bar)
            images += best_n * len(train)
        phase["best_of"] = time.perf_counter() - t

        t = time.perf_counter()
        captions, examples, caption_rows = None, [], {}
        if scenes:
            bar.set_description("captions")
            caption_rows["off"], examples = _captioning(engine, scenes, cfg, bar)
            if cfg.caption_retrieval:
                bar.set_description("captions r+")
                caption_rows["on"], examples = _captioning(engine, scenes, cfg, bar, bank,
                                                           cfg.caption_k_docs)
            if cfg.caption_retrieval and cfg.caption_doc_sweep:
                bar.set_description("captions sweep")
                caption_rows["sweep"], examples = _captioning(engine, scenes, cfg, bar, bank,
                                                              cfg.caption_k_docs, True)
            captions = caption_rows[cfg.caption_default_row]["all"]
        phase["captions"] = time.perf_counter() - t

        t = time.perf_counter()
        task_examples: dict[str, list[dict[str, Any]]] = {}
        infill = edit = None
        if infills:
            bar.set_description("infill")
            infill, task_examples["infill"] = _infill(engine, infills, cfg, bar)
        phase["infill"] = time.perf_counter() - t
        t = time.perf_counter()
        if edits:
            bar.set_description("edits")
            edit, task_examples["edits"] = _edits(engine, edits, cfg, bar)
            images += len(edits)
        phase["edits"] = time.perf_counter() - t
    finally:
        bar.close()
    return QualityReport(
        config=cfg, rows=rows, captions=captions, caption_examples=examples,
        caption_rows=caption_rows,
        best_of=best_of, infill=infill, edits=edit, task_examples=task_examples,
        targets=evaluate_targets(rows, captions, best_of, cfg.default_setting()),
        held_out_prompts=[p.text for p in held], train_prompts=[p.text for p in train],
        wall_s=time.perf_counter() - t0, phase_s=phase, images=images)


# ------------------------------------------------------------------------- targets


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def evaluate_targets(rows: list[Row], captions: Score | None,
                     best_of: dict[int, Score] | None = None,
                     default: Setting | None = None) -> list[Target]:
    """The default model's quality targets, each PASS / MISS (SKIP when the run did not
    measure it). ``default``: the model's own setting (retrieval on when run; default
    ``Setting("cdk", True)``).

    * Adherence with the default settings >= 85%: the default row's train-concept prompts
      (fresh combinations of seen concepts).
    * CFG above no guidance by >= 5 points on two-object prompts: the best CFG scale's
      two-object train-concept adherence minus guidance none's, in the default retrieval
      mode.
    * Retrieval adds >= 30 points on held-out concepts: the default guidance's held-out
      adherence with retrieval on minus off.
    * Held-out adherence with retrieval >= 60%: the default guidance, retrieval on.
    * Best-of-n above best-of-1 (CLIP reranking), n the largest measured.
    * Captions >= 90% correct.
    """
    default = default or Setting("cdk", True)

    def row(guidance: str, retrieval: bool, scale: float | None = None) -> Row | None:
        return next((r for r in rows if r.setting == Setting(guidance, retrieval, scale)),
                    None)

    def rate(score: Score | None) -> float | None:
        return score.rate if score is not None and score.n else None

    targets = []
    d = row(default.guidance, default.retrieval, default.cfg_scale)
    name = f"adherence with the default settings ({default.name}, retrieval " \
           f"{'on' if default.retrieval else 'off'}) >= 85%"
    v = rate(d.train) if d else None
    targets.append(Target(name, "not measured", "SKIP") if v is None else Target(
        name, f"{_pct(v)} ({d.train.passed}/{d.train.n}, train concepts)",
        "PASS" if v >= TARGET_DEFAULT_ADHERENCE else "MISS"))

    name = "CFG (best scale) above no guidance by >= 5 points (two-object prompts)"
    cfg_two = [(r.setting.cfg_scale, rate(r.train_two)) for r in rows
               if r.setting.guidance == "cfg" and r.setting.retrieval == default.retrieval
               and rate(r.train_two) is not None]
    none = row("none", default.retrieval)
    n2 = rate(none.train_two) if none else None
    if not cfg_two or n2 is None:
        targets.append(Target(name, "not measured", "SKIP"))
    else:
        scale, best = max(cfg_two, key=lambda x: x[1])
        gain = best - n2
        targets.append(Target(name, f"{100 * gain:+.1f} points (cfg {scale:g} {_pct(best)} vs "
                                    f"none {_pct(n2)}, n = {none.train_two.n})",
                              "PASS" if gain >= TARGET_CFG_TWO_OBJECT_GAIN - 1e-12 else "MISS"))

    on = row(default.guidance, True, default.cfg_scale)
    off = row(default.guidance, False, default.cfg_scale)
    r_on = rate(on.held_out) if on else None
    r_off = rate(off.held_out) if off else None
    name = f"retrieval adds >= 30 points on held-out concepts ({default.name})"
    if r_on is None or r_off is None:
        targets.append(Target(name, "not measured", "SKIP"))
    else:
        gain = r_on - r_off
        targets.append(Target(name, f"{100 * gain:+.1f} points ({_pct(r_on)} vs {_pct(r_off)})",
                              "PASS" if gain >= TARGET_RETRIEVAL_GAIN - 1e-12 else "MISS"))
    name = f"held-out adherence with retrieval >= 60% ({default.name})"
    targets.append(Target(name, "not measured", "SKIP") if r_on is None else Target(
        name, f"{_pct(r_on)} ({on.held_out.passed}/{on.held_out.n})",
        "PASS" if r_on >= TARGET_HELD_OUT_WITH_RETRIEVAL else "MISS"))

    best_of = best_of or {}
    n = max(best_of, default=1)
    name = "best-of-n above best-of-1 (CLIP reranking)"
    if n <= 1 or 1 not in best_of:
        targets.append(Target(name, "not measured", "SKIP"))
    else:
        b1, bn = best_of[1].rate, best_of[n].rate
        targets.append(Target(name, f"best of {n} {_pct(bn)} vs best of 1 {_pct(b1)}",
                              "PASS" if bn > b1 else "MISS"))

    if captions is None or not captions.n:
        targets.append(Target("caption accuracy >= 90%", "not measured", "SKIP"))
    else:
        targets.append(Target("caption accuracy >= 90%",
                              f"{_pct(captions.rate)} ({captions.passed}/{captions.n})",
                              "PASS" if captions.rate >= TARGET_CAPTIONS else "MISS"))
    return targets


# ------------------------------------------------------------------------- printing


def _cell(score: Score | None) -> str:
    if score is None:
        return "—"
    lo, hi = wilson_interval(score.passed, score.n)
    err = f", {score.errors} failed" if score.errors else ""
    return f"{_pct(score.rate)} ({score.passed}/{score.n}; {100 * lo:.0f}–{100 * hi:.0f}{err})"


def format_report(report: QualityReport) -> str:
    """The report as markdown: adherence table, captions, targets, wall time."""
    c = report.config
    lines = [
        (f"## Prompt adherence (held-out: {c.prompts} prompts naming a colour x shape pair "
        f"unseen in training; train-concept: {c.n_train} prompts, fresh combinations of "
        f"seen concepts)"),
        "",
        ("| setting | retrieval | held-out adherence | train-concept adherence "
        "| train-concept, two objects | docs show the held-out pair |"),
        "| --- | --- | --- | --- | --- | --- |",
    ]
    default = c.default_setting()
    for r in report.rows:
        hit = "—" if r.docs_hit is None else _pct(r.docs_hit)
        mark = " (default)" if r.setting == default else ""
        lines.append(f"| {r.setting.name}{mark} | {'on' if r.setting.retrieval else 'off'} | "
                     f"{_cell(r.held_out)} | {_cell(r.train)} | {_cell(r.train_two)} | {hit} |")
    lines += ["", ("Cells: share (passed/n; 95% Wilson interval in %). "
              f"Sampling: temperature {c.temperature:g}, top-k {c.top_k}, top-p {c.top_p:g}, "
              f"CD-K alpha {c.cd_alpha:g} k {c.cd_k}, k_docs {c.k_docs}, documents in the "
              f"unconditional stream: {'yes' if c.uncond_docs else 'no'}, seed {c.seed}."), ""]
    if report.best_of:
        n = max(report.best_of)
        lines += [(f"## Best-of-n ({c.n_train} train-concept prompts, {n} samples each, "
                   f"{default.name} retrieval {'on' if default.retrieval else 'off'}, "
                   "reranked by the model's CLIP)"), "", "| kept | adherence |", "| --- | --- |"]
        lines += [f"| best of {k} | {_cell(v)} |" for k, v in sorted(report.best_of.items())]
        lines.append("")
    if report.caption_rows:
        lines += [(f"## Captioning ({report.captions.n} fresh renders, image -> text, "
                   f"temperature {c.caption_temperature:g}; documents retrieved by the image)"),
                  "", ("| retrieval | all renders | renders showing a held-out pair "
                       "| the other renders |"), "| --- | --- | --- | --- |"]
        for mode, split in report.caption_rows.items():
            name = {"off": "off", "on": f"on ({c.caption_k_docs} docs)",
                    "sweep": f"on (0..{c.caption_k_docs} docs, the bank's CLIP picks)"}[mode]
            mark = " (default)" if mode == c.caption_default_row else ""
            lines.append(f"| {name}{mark} | {_cell(split['all'])} | "
                         f"{_cell(split['held_out'])} | {_cell(split['others'])} |")
        lines += ["", f"caption accuracy: {_cell(report.captions)} (the default row)", ""]
    if report.infill is not None or report.edits is not None:
        lines += ["## Other tasks", "", "| task | correct |", "| --- | --- |"]
        if report.infill is not None:
            lines.append(f"| CM3 infill: 1-3 masked words of a render's canonical caption, "
                         f"exact ({report.infill.n} renders, greedy) | {_cell(report.infill)} |")
        if report.edits is not None:
            lines.append(f"| text-guided edit: \"make the <shape> <colour>\" on a one-object "
                         f"render, cfg3 ({report.edits.n}) | {_cell(report.edits)} |")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | result |", "| --- | --- | --- |"]
    lines += [f"| {t.name} | {t.value} | {t.status} |" for t in report.targets]
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in report.phase_s.items())
    gen_s = sum(report.phase_s.get(k, 0.0) for k in ("held_out", "train", "best_of", "edits"))
    rate = report.images / gen_s if gen_s > 0 else float("nan")
    lines += ["", (f"wall time {report.wall_s:.1f} s ({phases}); {report.images} images, "
              f"{rate:.2f} images/s")]
    return "\n".join(lines)
