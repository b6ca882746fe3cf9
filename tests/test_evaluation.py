"""`cm3rt eval`: prompt sets, the caption-accuracy rule, the adherence metric against a
perfect and a wrong generator, the targets, and an end-to-end --quick run on a tiny random
model with a tiny memory bank."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
from model_fixtures import make_tiny_model_dir

from cm3rt.demo.evaluation import (
    QualityConfig,
    adheres,
    caption_correct,
    caption_scenes,
    evaluate_targets,
    held_out_prompts,
    names_held_out,
    run_quality,
    train_prompts,
)
from cm3rt.demo.evaluation.prompts import edit_items, infill_items
from cm3rt.demo.evaluation.quality import Row, Score, Setting, format_report
from cm3rt.demo.shapes import (
    COLOURS,
    HELD_OUT_PAIRS,
    Scene,
    SceneObject,
    describe,
    parse_caption,
    random_caption,
    uses_held_out,
)
from cm3rt.engine.request import RequestOutput, SampleOutput, TokenEvent

# ------------------------------------------------------------------------ prompt sets


def test_held_out_prompts_name_a_held_out_pair_and_are_deterministic() -> None:
    prompts = held_out_prompts(60, seed=0)
    assert len(prompts) == 60
    for p in prompts:
        pairs = {(o.colour, o.shape) for o in parse_caption(p.text).objects}
        assert pairs & HELD_OUT_PAIRS, p.text  # the text itself asks for an unseen pair
        assert p.held_out and names_held_out(p.text) and uses_held_out(p.scene)
    # Every held-out pair is exercised, with several templates.
    seen = {pr for p in prompts for o in parse_caption(p.text).objects
            for pr in [(o.colour, o.shape)] if pr in HELD_OUT_PAIRS}
    assert seen == set(HELD_OUT_PAIRS)
    assert len({p.text for p in prompts}) > 50
    # Deterministic, and item i does not depend on N.
    assert held_out_prompts(60, seed=0) == prompts
    assert held_out_prompts(7, seed=0) == prompts[:7]
    assert [p.text for p in held_out_prompts(20, seed=1)] != [p.text for p in prompts[:20]]


def test_train_prompts_avoid_held_out_pairs() -> None:
    prompts = train_prompts(60, seed=0)
    for p in prompts:
        assert not names_held_out(p.text) and not uses_held_out(p.scene), p.text
        assert not p.held_out
    assert train_prompts(60, seed=0) == prompts
    assert {p.text for p in prompts}.isdisjoint({p.text for p in held_out_prompts(60, 0)})


def test_caption_scenes_are_fresh_and_deterministic() -> None:
    scenes = caption_scenes(40, seed=3)
    assert caption_scenes(40, seed=3) == scenes
    assert len({describe(s) for s in scenes}) == 40
    assert any(uses_held_out(s) for s in scenes) and not all(uses_held_out(s) for s in scenes)


def test_prompt_set_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="'n'"):
        held_out_prompts(-1)
    with pytest.raises(ValueError, match="'seed'"):
        train_prompts(3, seed=-2)


# ------------------------------------------------------------------- caption accuracy

SCENE = Scene(
    objects=(SceneObject("circle", "red", "small", (0, 0)),
             SceneObject("square", "blue", "large", (2, 0))),
    background="white",
)


@pytest.mark.parametrize("caption", [
    "a red circle and a blue square",
    "a blue square with a red circle",
    "a picture of a small red circle in the top left and a large blue square",
    "a red circle above a blue square",
    "a blue square below a red circle on a white background",
    describe(SCENE),
])
def test_caption_correct_accepts_true_complete_captions(caption: str) -> None:
    assert caption_correct(caption, SCENE)


@pytest.mark.parametrize("caption", [
    "a green circle and a blue square",           # wrong colour
    "a red circle and a blue star",               # wrong shape
    "a red circle",                               # missing object
    "a red circle and a blue square and a pink star",  # extra object
    "two red circles and a blue square",          # "two" counts two
    "a large red circle and a blue square",       # wrong size
    "a red circle on the right and a blue square",  # wrong position
    "a red circle below a blue square",           # wrong relation
    "a red circle and a blue square on a black background",  # wrong background
    "",                                           # unparsable
    "circles and squares",                        # unparsable (no colour + shape)
    "\x04\x17hit",                                # garbage from an untrained model
])
def test_caption_correct_rejects_wrong_or_unparsable(caption: str) -> None:
    assert not caption_correct(caption, SCENE)


def test_caption_correct_checks_types() -> None:
    with pytest.raises(TypeError, match="caption"):
        caption_correct(None, SCENE)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scene"):
        caption_correct("a red circle", "a red circle")  # type: ignore[arg-type]


# ------------------------------------------- the metric on a perfect and a wrong generator


def _recoloured(scene: Scene) -> Scene:
    """The scene with every object in another colour: never what its caption asks for."""
    names = list(COLOURS)
    objs = tuple(replace(o, colour=names[(names.index(o.colour) + 3) % len(names)])
                 for o in scene.objects)
    return replace(scene, objects=objs)


class FakeEngine:
    """Stands in for the Engine: draws each prompt's own scene (``wrong``: recoloured),
    captions an image with a template caption of the scene it was rendered from, infills
    the masked words of a render's canonical caption and applies "make the <shape>
    <colour>" to a render (``wrong``: another word / the scene unedited)."""

    processor = None  # image size unknown -> the evaluation renders 64 px

    def __init__(self, scenes: dict[str, Scene], wrong: bool = False) -> None:
        self.scenes, self.wrong = scenes, wrong
        self.requests: list = []

    def _segment(self, r):
        if r.task == "text_to_image":
            scene = self.scenes[r.prompt]
            return (_recoloured(scene) if self.wrong else scene).render(64)
        image, *text = r.prompt
        scene = self.scenes[image.tobytes()]
        if r.task == "infill":
            full, pre, post = describe(scene), "".join(text), r.suffix or ""
            return "wrong" if self.wrong else full[len(pre):len(full) - len(post)]
        if r.task == "edit":
            *_, shape, colour = text[0].split(" ")
            if self.wrong:
                return scene.render(64)
            objs = tuple(replace(o, colour=colour) if o.shape == shape else o
                         for o in scene.objects)
            return replace(scene, objects=objs).render(64)
        return random_caption(_recoloured(scene) if self.wrong else scene, r.params.seed)

    def stream(self, requests):
        requests = list(requests)
        self.requests += requests
        for r in requests:
            samples = [SampleOutput(i, [], [], "stop", [self._segment(r)])
                       for i in range(r.params.n)]
            out = RequestOutput(r.request_id, [], samples)
            yield TokenEvent(r.request_id, 0, 5, 0.0)
            yield TokenEvent(r.request_id, -1, -1, 0.0, output=out)


def _fake_scenes(cfg: QualityConfig) -> dict:
    scenes: dict = {p.text: p.scene for p in held_out_prompts(cfg.prompts, cfg.seed)}
    scenes.update({p.text: p.scene for p in train_prompts(cfg.n_train, cfg.seed)})
    scenes.update({s.render(64).tobytes(): s for s in caption_scenes(cfg.captions, cfg.seed)})
    scenes.update({it.scene.render(64).tobytes(): it.scene
                   for it in infill_items(cfg.infill, cfg.seed)})
    scenes.update({it.scene.render(64).tobytes(): it.scene
                   for it in edit_items(cfg.edits, cfg.seed)})
    return scenes


def _first_sample_best(text, images):  # a scorer that always keeps sample 0
    return [1.0] + [0.0] * (len(images) - 1)


def test_perfect_generator_scores_one_and_wrong_generator_zero() -> None:
    cfg = QualityConfig(prompts=16, captions=16, seed=5, best_of=4, infill=12, edits=12)
    perfect = FakeEngine(_fake_scenes(cfg))
    report = run_quality(perfect, bank="unused-by-the-fake", config=cfg,
                         scorer=_first_sample_best, progress=False)
    assert len(report.rows) == 10
    for row in report.rows:
        assert (row.held_out.n, row.held_out.passed) == (16, 16), row.setting
        assert (row.train.n, row.train.passed) == (16, 16), row.setting
        assert row.train_two.n == row.train_two.passed > 0
    assert (report.captions.n, report.captions.passed) == (16, 16)
    assert {k: (v.n, v.passed) for k, v in report.best_of.items()} == {1: (16, 16),
                                                                     4: (16, 16)}
    assert (report.infill.n, report.infill.passed) == (12, 12)
    assert (report.edits.n, report.edits.passed) == (12, 12)
    status = {t.name.split(" (")[0].split(" >=")[0]: t.status for t in report.targets}
    assert status["adherence with the default settings"] == "PASS"
    assert status["held-out adherence with retrieval"] == "PASS"
    assert status["caption accuracy"] == "PASS"
    # Equal rows: CFG is not above none, retrieval adds nothing, best-of-4 = best-of-1.
    assert status["CFG"] == "MISS"
    assert status["retrieval adds"] == "MISS"
    assert status["best-of-n above best-of-1"] == "MISS"

    # The requests: one per prompt and setting, with the setting's sampling and retrieval,
    # and the same sampler seed for a prompt in every setting.
    t2i = [r for r in perfect.requests if r.task == "text_to_image" and r.params.n == 1]
    assert len(t2i) == 10 * 16 * 2
    first = [r for r in t2i if r.request_id.endswith("-0") and "eval-1-" in r.request_id]
    assert len(first) == 10 and len({r.params.seed for r in first}) == 1
    assert {(r.params.guidance, r.params.cfg_scale, r.k_docs) for r in first} == {
        ("none", 1.0, 0), ("cfg", 1.5, 0), ("cfg", 3.0, 0), ("cfg", 5.0, 0), ("cdk", 1.0, 0),
        ("none", 1.0, 2), ("cfg", 1.5, 2), ("cfg", 3.0, 2), ("cfg", 5.0, 2), ("cdk", 1.0, 2)}
    assert all((r.bank is None) == (r.k_docs == 0) for r in t2i)
    best = [r for r in perfect.requests if r.params.n == 4]
    assert len(best) == 16 and all(r.params.guidance == "cdk" and r.k_docs == 2 for r in best)
    edits = [r for r in perfect.requests if r.task == "edit"]
    assert len(edits) == 12 and {r.params.guidance for r in edits} == {"cfg3"}

    wrong = run_quality(FakeEngine(_fake_scenes(cfg), wrong=True), bank="x", config=cfg,
                        scorer=_first_sample_best, progress=False)
    assert all(r.held_out.passed == 0 and r.train.passed == 0 for r in wrong.rows)
    assert wrong.captions.passed == 0 and wrong.infill.passed == 0
    assert wrong.edits.passed == 0
    assert {t.status for t in wrong.targets} == {"MISS"}


def test_captions_with_retrieval_are_scored_with_and_without_documents() -> None:
    """caption_k_docs > 0: every render is captioned twice, without documents and with
    caption_k_docs retrieved by the image; the target reads the retrieval row, and each row
    is split into renders with a held-out pair and the others."""
    cfg = QualityConfig(prompts=2, captions=40, seed=3, best_of=0, infill=0, edits=0,
                        caption_k_docs=1)
    engine = FakeEngine(_fake_scenes(cfg))
    report = run_quality(engine, bank="a-bank", config=cfg, progress=False)
    caps = [r for r in engine.requests if r.task == "image_to_text"]
    assert len(caps) == 80
    assert sorted((r.k_docs, r.bank) for r in caps) == [(0, None)] * 40 + [(1, "a-bank")] * 40
    assert set(report.caption_rows) == {"off", "on"}
    assert report.captions is report.caption_rows["on"]["all"]
    held = sum(any((o.colour, o.shape) in HELD_OUT_PAIRS for o in s.objects)
               for s in caption_scenes(40, 3))
    for split in report.caption_rows.values():
        assert (split["held_out"].n, split["others"].n) == (held, 40 - held)
        assert split["held_out"].passed + split["others"].passed == split["all"].passed == 40
    assert "| on (1 docs) (default) |" in format_report(report)
    off = run_quality(FakeEngine(_fake_scenes(cfg)), bank=None,
                      config=QualityConfig(**{**asdict(cfg), "retrieval": False}),
                      progress=False)
    assert set(off.caption_rows) == {"off"} and off.captions is off.caption_rows["off"]["all"]
    with pytest.raises(ValueError, match="caption_k_docs"):
        QualityConfig(caption_k_docs=-1)


def test_a_caption_doc_sweep_is_one_more_row_and_the_default() -> None:
    """caption_doc_sweep: the renders are captioned a third time as document sweeps
    (Request.doc_sweep, 0..caption_k_docs documents), and the target reads that row."""
    cfg = QualityConfig(prompts=2, captions=40, seed=3, best_of=0, infill=0, edits=0,
                        caption_k_docs=2, caption_doc_sweep=True)
    engine = FakeEngine(_fake_scenes(cfg))
    report = run_quality(engine, bank="a-bank", config=cfg, progress=False)
    caps = [r for r in engine.requests if r.task == "image_to_text"]
    assert sorted((r.k_docs, r.doc_sweep) for r in caps) == (
        [(0, False)] * 40 + [(2, False)] * 40 + [(2, True)] * 40)
    assert set(report.caption_rows) == {"off", "on", "sweep"}
    assert report.captions is report.caption_rows["sweep"]["all"]
    text = format_report(report)
    assert "| on (0..2 docs, the bank's CLIP picks) (default) |" in text
    assert "| on (2 docs) |" in text
    with pytest.raises(TypeError, match="caption_doc_sweep must be a bool"):
        QualityConfig(caption_doc_sweep="yes")


def test_adheres_on_own_renders_and_failures() -> None:
    prompts = held_out_prompts(30, seed=9)
    assert all(adheres(p.text, p.scene.render(64)) for p in prompts)
    assert not any(adheres(p.text, _recoloured(p.scene).render(64)) for p in prompts)
    assert not adheres(prompts[0].text, None)  # a failed generation counts as a miss


# ------------------------------------------------------------------------- targets


def _row(guidance: str, retrieval: bool, held: int, train: int | None = None,
         two: int | None = None, scale: float | None = None) -> Row:
    return Row(Setting(guidance, retrieval, scale), held_out=Score(100, held),
               train=None if train is None else Score(100, train),
               train_two=None if two is None else Score(50, two))


def test_targets_pass_and_miss_on_hand_made_rows() -> None:
    rows = [_row("none", False, 20, 70, 30), _row("cfg", False, 25, 80, 40, 3.0),
            _row("cdk", False, 30, 85, 40),
            _row("none", True, 60, 80, 35), _row("cfg", True, 65, 86, 39, 3.0),
            _row("cdk", True, 61, 86, 41)]
    t = {x.name: x for x in evaluate_targets(rows, Score(200, 181),
                                             {1: Score(100, 80), 8: Score(100, 90)})}
    names = list(t)
    assert t[names[0]].status == "PASS" and "86.0%" in t[names[0]].value  # cdk r+ train
    assert t[names[1]].status == "PASS" and "+8.0 points" in t[names[1]].value  # 78% - 70%
    assert t[names[2]].status == "PASS"  # held-out cdk: 61 - 30 = 31 points
    assert t[names[3]].status == "PASS"  # 61% >= 60%
    assert t[names[4]].status == "PASS"  # best of 8 90% > best of 1 80%
    assert t[names[5]].status == "PASS"  # 181/200 captions

    rows[5] = _row("cdk", True, 59, 84, 41)  # 84 < 85; 59 - 30 = 29 < 30; 59 < 60
    rows[3] = _row("none", True, 60, 80, 38)  # CFG two-object: 39 vs 38 of 50 = +2 points
    t = {x.name: x for x in evaluate_targets(rows, Score(200, 179),
                                             {1: Score(100, 80), 8: Score(100, 80)})}
    assert {x.status for x in t.values()} == {"MISS"}

    t = {x.name: x for x in evaluate_targets(rows[:3], None, None, Setting("cdk", False))}
    statuses = [x.status for x in t.values()]
    assert statuses == ["PASS", "PASS", "SKIP", "SKIP", "SKIP", "SKIP"], statuses


def test_quality_config_is_validated() -> None:
    with pytest.raises(ValueError, match="prompts"):
        QualityConfig(prompts=-1)
    with pytest.raises(ValueError, match="cfg_scales"):
        QualityConfig(cfg_scales=())
    with pytest.raises(ValueError, match="train_settings"):
        QualityConfig(train_settings="some")
    with pytest.raises(ValueError, match="temperature"):
        QualityConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="bank"):
        run_quality(FakeEngine({}), None, QualityConfig(prompts=1, captions=0),
                    progress=False)


# --------------------------------------------------------- end to end on a tiny model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random model drawing 32 px images (8 x 8 codes) and a 10-document bank of
    rendered scenes (half with a held-out pair)."""
    from retrieval_fixtures import make_tiny_clip

    from cm3rt.demo.shapes import WorldConfig, scene_at
    from cm3rt.retrieval.bank import MemoryBank
    from cm3rt.retrieval.clip import ClipEncoder
    from cm3rt.tokenizer import ImageTokenizer

    tmp = tmp_path_factory.mktemp("eval")
    model_dir = make_tiny_model_dir(tmp, use_hf=False, vq={"resolution": 32})
    cfg, weights = make_tiny_clip(tmp / "clip", seed=3)
    src = tmp / "src"
    src.mkdir()
    for i in range(10):
        scene = scene_at(7, i, WorldConfig(concepts="held_out" if i % 2 else "all"))
        scene.render(32).save(src / f"d{i}.png")
        (src / f"d{i}.txt").write_text(describe(scene))
    MemoryBank.build(src, model_dir / "bank", ClipEncoder(str(cfg), weights=weights),
                     ImageTokenizer.from_pretrained(model_dir), progress=False).close()
    return model_dir


@pytest.mark.usefixtures("one_torch_thread")
def test_quick_eval_end_to_end(tiny_model, tmp_path, capsys) -> None:
    from cm3rt.cli import main

    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(tiny_model), "--quick", "--prompts", "2",
               "--captions", "2", "--device", "cpu", "--json", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = "| setting | retrieval | held-out adherence | train-concept adherence " \
             "| train-concept, two objects | docs show the held-out pair |"
    start = lines.index(header)
    table = lines[start + 2:start + 12]
    # The tiny model has no defaults.json: its own setting is the built-in cfg 3.
    assert [tuple(c.strip() for c in r.split("|")[1:3]) for r in table] == [
        (name, mode) for mode in ("off", "on")
        for name in ("none", "cfg 1.5", "cfg 3" + " (default)" * (mode == "on"), "cfg 5",
                     "cdk")]
    assert lines[start + 12] == ""
    assert "caption accuracy:" in text
    assert "| CM3 infill" in text and "| text-guided edit" in text
    targets = lines[lines.index("| target | measured | result |") + 2:][:6]
    assert len(targets) == 6
    # No CLIP in the tiny model's directory: best-of-n is not measured.
    assert [r.rstrip().endswith(("| PASS |", "| MISS |")) for r in targets] == [
        True, True, True, True, False, True]
    assert targets[4].rstrip().endswith("| SKIP |")
    assert "wall time" in text

    data = json.loads(out.read_text())
    assert len(data["rows"]) == 10
    assert all(r["held_out"]["n"] == 2 and r["held_out"]["errors"] == 0 for r in data["rows"])
    assert all(r["train"]["n"] == 2 for r in data["rows"])  # every row (default "all")
    assert all(r["docs_with_held_out_pair"] is not None for r in data["rows"] if r["retrieval"])
    assert data["captions"]["n"] == 2 and data["captions"]["errors"] == 0
    assert data["held_out_prompts"] == [p.text for p in held_out_prompts(2, 0)]
    assert data["infill"]["n"] == 4 and data["edits"]["n"] == 4 and data["best_of"] == {}
    assert data["images"] == 10 * 2 + 10 * 2 + 4


def test_eval_cli_errors_name_the_problem(tiny_model, tmp_path, capsys) -> None:
    from cm3rt.cli import main

    assert main(["eval", "--model", str(tmp_path), "--quick"]) == 1
    assert "--model" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model), "--bank", str(tmp_path / "nope"),
                 "--quick"]) == 1
    err = capsys.readouterr().err
    assert "--bank" in err and "nope" in err
    assert main(["eval", "--model", str(tiny_model), "--quick", "--cfg-scales", "nan"]) == 1
    assert "cfg_scales" in capsys.readouterr().err


def test_scores_are_numbers() -> None:
    s = Score(200, 150)
    d = s.to_dict()
    assert d["rate"] == 0.75 and d["ci95"][0] < 0.75 < d["ci95"][1]
    assert np.isclose(d["ci95"][0], 0.6858, atol=1e-3)  # Wilson, n = 200, p = 0.75
