"""The procedural shapes world: renderer <-> analyzer agreement, captions <-> parser, seeds.

The analyzer must read back what the renderer drew on >= 99.5% of fresh random scenes of the
default world and >= 99% of the first (jittered, textured) world (every object's shape,
colour, size and cell, and nothing extra). Set CM3RT_SHAPES_SEED to draw a
different set of scenes than the default one.
"""

from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from cm3rt.demo.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    ObjectSpec,
    PromptSpec,
    Relation,
    Scene,
    SceneObject,
    WorldConfig,
    concept_pairs,
    parse_caption,
    sample_scene,
    scene_at,
    spec_of_scene,
    uses_held_out,
)
from cm3rt.demo.shapes.analyzer import (
    AnalyzerConfig,
    analyze,
    analyze_scene,
    caption_matches,
    matches,
)
from cm3rt.demo.shapes.geometry import coverage, unit_area
from cm3rt.demo.shapes.vocab import CELLS, IMAGE_SIZE, TEXTURES

SEED = int(os.environ.get("CM3RT_SHAPES_SEED", "20250607"))


def _truth(scene: Scene) -> list[tuple]:
    return sorted((o.shape, o.colour, o.size, o.cell) for o in scene.objects)


def _read(objs) -> list[tuple]:
    return sorted((o.shape, o.colour, o.size, o.cell) for o in objs)


# ------------------------------------------------------------------ renderer <-> analyzer


_FIRST_WORLD = WorldConfig(backgrounds=tuple(BACKGROUNDS), textures=TEXTURES, jitter=1.0)


@pytest.mark.parametrize(
    ("world", "size", "gate"),
    [(WorldConfig(), IMAGE_SIZE, 0.995),  # the default world: aligned, flat, 48 px
     (_FIRST_WORLD, 64, 0.99)],  # the first world: sub-cell jitter, textures, 64 px
    ids=["default-world", "jittered-textured-world"])
def test_analyzer_agrees_with_renderer_on_1000_fresh_scenes(world, size, gate):
    n = 1000
    agree = bg_agree = 0
    wrong: Counter = Counter()
    seen: dict[str, set] = {k: set() for k in
                            ("shape", "colour", "size", "cell", "bg", "texture", "count")}
    for i in range(n):
        scene = scene_at(SEED, i, world)
        for o in scene.objects:
            seen["shape"].add(o.shape)
            seen["colour"].add(o.colour)
            seen["size"].add(o.size)
            seen["cell"].add(o.cell)
        seen["bg"].add(scene.background)
        seen["texture"].add(scene.texture)
        seen["count"].add(len(scene.objects))
        found = analyze_scene(scene.render(size))
        truth, got = _truth(scene), _read(found.objects)
        agree += truth == got
        bg_agree += found.background == scene.background
        if truth != got:
            wrong[f"{sorted(set(truth) - set(got))} -> {sorted(set(got) - set(truth))}"] += 1
    # The sample must exercise the whole vocabulary for the rate to mean anything.
    assert seen["shape"] == set(SHAPES) and seen["colour"] == set(COLOURS)
    assert seen["size"] == {"small", "large"} and seen["cell"] == set(CELLS)
    assert seen["bg"] == set(world.backgrounds) and seen["texture"] == set(world.textures)
    assert seen["count"] == {1, 2}
    rate = agree / n
    print(f"\nanalyzer/renderer agreement {rate:.4f} on {n} scenes (seed {SEED}); "
          f"background {bg_agree / n:.4f}")
    assert rate >= gate, f"agreement {rate:.4f} < {gate} (seed {SEED}); {wrong.most_common(5)}"
    assert bg_agree / n >= 0.99


def test_default_world_is_aligned_to_the_code_grid():
    # Objects centred in 16 px cells of a 48 px image: an object drawn in any cell is the
    # same pixels shifted by a multiple of 8 (the image tokenizer's stride).
    cfg = WorldConfig()
    assert cfg.jitter == 0.0 and cfg.textures == ("plain",) and IMAGE_SIZE % (3 * 8) == 0
    for i in range(20):
        scene = scene_at(SEED + 9, i, WorldConfig(p_two=0.0))
        (o,) = scene.objects
        here = np.asarray(scene.render())
        moved = Scene((SceneObject(o.shape, o.colour, o.size, (0, 0)),), scene.background)
        r, c = o.cell
        cell = IMAGE_SIZE // 3
        assert np.array_equal(here[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell],
                              np.asarray(moved.render())[:cell, :cell])


def test_analyzer_tolerates_blur_noise_and_colour_drift():
    # What a VQ autoencoder does to an image, roughly: the analyzer scores generations.
    rng = np.random.default_rng(SEED)
    n, agree = 100, 0
    for i in range(n):
        scene = scene_at(SEED + 1, i)
        img = scene.render().filter(ImageFilter.GaussianBlur(0.8))
        arr = np.asarray(img, dtype=np.float64)
        arr = arr + rng.normal(0, 6, arr.shape) + rng.uniform(-15, 15, 3)
        img = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        agree += _truth(scene) == _read(analyze(img))
    assert agree / n >= 0.95, f"agreement under degradation {agree / n:.3f}"


def test_analyzer_reads_other_image_sizes():
    n, agree = 30, 0
    for i in range(n):
        scene = scene_at(SEED + 2, i)
        agree += _truth(scene) == _read(analyze(scene.render(128)))
    assert agree / n >= 0.98


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.45 * r
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


def test_analyzer_reads_shapes_drawn_independently_of_the_renderer():
    # Plain aliased PIL primitives, none of cm3rt's geometry: the analyzer must not depend
    # on the renderer's exact antialiasing.
    rgb = COLOURS["blue"]
    draws = {
        "circle": lambda d: d.ellipse([22, 22, 41, 41], fill=rgb),
        "square": lambda d: d.rectangle([24, 24, 39, 39], fill=rgb),
        "triangle": lambda d: d.regular_polygon((32, 33, 10), 3, fill=rgb),
        "diamond": lambda d: d.polygon([(32, 22), (42, 32), (32, 42), (22, 32)], fill=rgb),
        "cross": lambda d: (d.rectangle([22, 29, 41, 34], fill=rgb),
                            d.rectangle([29, 22, 34, 41], fill=rgb)),
        "star": lambda d: d.polygon(_star(32, 33, 10.5), fill=rgb),
    }
    for shape, draw in draws.items():
        img = Image.new("RGB", (64, 64), BACKGROUNDS["grey"])
        draw(ImageDraw.Draw(img))
        found = analyze_scene(img)
        assert [(o.shape, o.colour, o.size, o.cell) for o in found.objects] == [
            (shape, "blue", "large", (1, 1))
        ], shape
        assert found.background == "grey"


def test_analyzer_reports_non_shapes_as_unknown_and_empty_images_as_empty():
    red = COLOURS["red"]
    for draw in (
        lambda d: d.ellipse([8, 26, 48, 36], fill=red),  # long ellipse
        lambda d: d.ellipse([18, 18, 44, 44], outline=red, width=3),  # ring
        lambda d: d.line([8, 8, 52, 52], fill=red, width=3),  # line
    ):
        img = Image.new("RGB", (64, 64), BACKGROUNDS["white"])
        draw(ImageDraw.Draw(img))
        (obj,) = analyze(img)
        assert obj.shape == "unknown" and obj.colour == "red"
    for bg in BACKGROUNDS.values():
        assert analyze(Image.new("RGB", (64, 64), bg)) == []


def test_analyzer_rejects_bad_input():
    with pytest.raises(TypeError, match="image"):
        analyze([[0, 0, 0]])
    with pytest.raises(TypeError, match="uint8"):
        analyze(np.zeros((64, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        analyze(np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match="16"):
        analyze(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="core_alpha"):
        AnalyzerConfig(core_alpha=1.5)
    with pytest.raises(TypeError, match="config"):
        analyze(np.zeros((64, 64, 3), dtype=np.uint8), config={"halo": 2})


def test_objects_never_touch_and_coverage_has_the_ideal_area():
    for i in range(200):
        scene = sample_scene(np.random.default_rng([SEED, 3, i]), WorldConfig(p_two=1.0))
        a, b = (coverage(o.shape, o.center(64), o.extent(64), 64) for o in scene.objects)
        assert float((a * b).max()) == 0.0  # >= 1 px of background between objects
    for shape in SHAPES:
        for extent in (10.9, 17.9, 40.0):
            area = float(coverage(shape, (31.3, 32.6), extent, 64).sum())
            assert area == pytest.approx(unit_area(shape) * extent**2, rel=0.06), shape


# ----------------------------------------------------------------------------- captions


def test_describe_round_trips_through_parse_caption():
    for i in range(300):
        scene = scene_at(SEED + 4, i)
        spec = parse_caption(scene.describe())
        want = spec_of_scene(scene)
        assert Counter(spec.objects) == Counter(want.objects), scene.describe()
        assert spec.background == scene.background and spec.relation is None


def _perturbed(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same scene with one object's colour changed."""
    objs = list(scene.objects)
    k = int(rng.integers(len(objs)))
    o = objs[k]
    other = [c for c in COLOURS if c != o.colour]
    objs[k] = SceneObject(o.shape, other[int(rng.integers(len(other)))], o.size, o.cell,
                          o.offset)
    return Scene(tuple(objs), scene.background, scene.texture, scene.texture_seed)


def test_random_captions_are_true_of_their_scene_and_false_of_a_changed_one():
    rng = np.random.default_rng(SEED)
    kinds: Counter = Counter()
    for i in range(1500):
        scene = scene_at(SEED + 5, i)
        caption = scene.caption(rng)
        spec = parse_caption(caption)
        assert matches(spec, scene.objects, background=scene.background), caption
        assert not matches(spec, _perturbed(scene, rng).objects,
                           background=scene.background), caption
        kinds["relation"] += spec.relation is not None
        kinds["cell"] += any(o.cell is not None for o in spec.objects)
        kinds["size"] += any(o.size is not None for o in spec.objects)
        kinds["background"] += spec.background is not None
        kinds["prefix"] += caption.startswith(("a picture", "an image", "a drawing",
                                               "a simple", "there is"))
        kinds["bare"] += caption.split()[0] in COLOURS
        kinds["with"] += " with " in caption
        if spec.relation is not None and spec.objects[0] != spec.objects[1]:
            # Mirroring the scene makes the relation false ("above" <-> "below"), unless
            # the two objects are described alike (then the relation is symmetric).
            flipped = [SceneObject(o.shape, o.colour, o.size, (2 - o.cell[0], 2 - o.cell[1]))
                       for o in scene.objects]
            assert not matches(spec, flipped), caption
    for kind in ("relation", "cell", "size", "background", "prefix", "bare", "with"):
        assert kinds[kind] >= 10, (kind, kinds)


def test_two_alike_objects_get_the_plural_template():
    rng = np.random.default_rng(SEED)
    plural = 0
    for i in range(40):
        shape, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[i % len(COLOURS)]
        cells = rng.choice(len(CELLS), size=2, replace=False)
        scene = Scene(tuple(SceneObject(shape, colour, "small", CELLS[int(c)]) for c in cells))
        caption = scene.caption(rng)
        spec = parse_caption(caption)
        assert len(spec.objects) == 2 and matches(spec, scene.objects), caption
        if caption.split()[-1] == ("crosses" if shape == "cross" else shape + "s"):
            plural += 1
            assert " two " in f" {caption} "
            # One object of the pair is not "two".
            assert not matches(spec, scene.objects[:1])
    assert plural >= 5


def test_parse_caption_on_hand_written_prompts():
    star = ObjectSpec("star", "red")
    circle = ObjectSpec("circle", "blue")
    assert parse_caption("a red star above a blue circle") == PromptSpec(
        (star, circle), Relation("above", 0, 1))
    assert parse_caption("A blue circle, below a red star.") == PromptSpec(
        (circle, star), Relation("above", 1, 0))
    assert parse_caption("a small blue star in the top left") == PromptSpec(
        (ObjectSpec("star", "blue", "small", (0, 0)),))
    assert parse_caption("a yellow cross to the right of an orange circle").relation == \
        Relation("left of", 1, 0)
    assert parse_caption("two green squares").objects == (ObjectSpec("square", "green"),) * 2
    spec = parse_caption("an image of a big purple diamond at the bottom on a black background")
    assert spec == PromptSpec((ObjectSpec("diamond", "purple", "large", (2, 1)),), None, "black")
    assert parse_caption("a pink circle in the middle right").objects[0].cell == (1, 2)
    with pytest.raises(ValueError, match="text"):
        parse_caption("a photo of a dog")
    with pytest.raises(TypeError, match="text"):
        parse_caption(3)


def test_matches_checks_count_relation_and_background():
    red_star = SceneObject("star", "red", "small", (0, 1))
    blue_circle = SceneObject("circle", "blue", "large", (2, 1))
    spec = parse_caption("a red star above a blue circle")
    assert matches(spec, [red_star, blue_circle])
    assert matches(spec, [blue_circle, red_star])  # order of detections is free
    assert not matches(spec, [red_star])  # missing object
    extra = SceneObject("square", "green", "small", (1, 0))
    assert not matches(spec, [red_star, blue_circle, extra])  # extra object
    side = SceneObject("circle", "blue", "large", (2, 2))  # below, but another column
    assert not matches(spec, [red_star, side])
    on_black = parse_caption("a red star on a black background")
    assert matches(on_black, [red_star], background="black")
    assert not matches(on_black, [red_star], background="white")
    with pytest.raises(TypeError, match="spec"):
        matches("a red star", [red_star])


def test_caption_matches_end_to_end_on_renders():
    rng = np.random.default_rng(SEED + 6)
    hits = misses = 0
    for i in range(60):
        scene = scene_at(SEED + 6, i)
        img = scene.render()
        hits += caption_matches(scene.caption(rng), img)
        misses += caption_matches(_perturbed(scene, rng).describe(), img)
    assert hits >= 59 and misses == 0


# ------------------------------------------------------------------ seeds and concepts


def test_scenes_and_renders_are_deterministic_by_seed():
    a, b = scene_at(SEED, 17), scene_at(SEED, 17)
    assert a == b
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
    assert a.caption(5) == b.caption(5)
    assert sample_scene(123) == sample_scene(123)
    distinct = {scene_at(SEED, i) for i in range(50)} | {scene_at(SEED + 1, 17)}
    assert len(distinct) == 51
    # JSON form round-trips to the same pixels.
    c = Scene.from_dict(a.to_dict())
    assert c == a and np.array_equal(np.asarray(c.render()), np.asarray(a.render()))


def test_held_out_concept_split():
    assert len(HELD_OUT_PAIRS) == 8
    train = concept_pairs("train")
    # Every colour and every shape is still seen in training, only the pairs are new.
    assert {c for c, _ in train} == set(COLOURS) and {s for _, s in train} == set(SHAPES)
    assert {s for _, s in HELD_OUT_PAIRS} == set(SHAPES)
    assert {c for c, _ in HELD_OUT_PAIRS} == set(COLOURS)
    train_cfg, held_cfg = WorldConfig(concepts="train"), WorldConfig(concepts="held_out")
    held_seen = set()
    for i in range(400):
        assert not uses_held_out(scene_at(SEED, i, train_cfg))
        s = scene_at(SEED, i, held_cfg)
        assert uses_held_out(s)
        held_seen |= {(o.colour, o.shape) for o in s.objects} & HELD_OUT_PAIRS
    assert held_seen == HELD_OUT_PAIRS
    assert uses_held_out(parse_caption("a red diamond").objects)


def test_scene_validation_names_the_field():
    with pytest.raises(ValueError, match="shape"):
        SceneObject("hexagon", "red", "small", (0, 0))
    with pytest.raises(ValueError, match="colour"):
        SceneObject("circle", "teal", "small", (0, 0))
    with pytest.raises(ValueError, match="cell"):
        SceneObject("circle", "red", "small", (3, 0))
    with pytest.raises(ValueError, match="offset"):
        SceneObject("circle", "red", "large", (0, 0), (0.2, 0.0))
    obj = SceneObject("circle", "red", "small", (0, 0))
    with pytest.raises(ValueError, match="distinct cells"):
        Scene((obj, SceneObject("star", "blue", "small", (0, 0))))
    with pytest.raises(ValueError, match="background"):
        Scene((obj,), background="green")
    with pytest.raises(ValueError, match="concepts"):
        WorldConfig(concepts="some")
    with pytest.raises(ValueError, match="image_size"):
        Scene((obj,)).render(8)


# ------------------------------------------------------------------ dataset writer


def _load_make_dataset():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "train" / "make_dataset.py"
    spec = importlib.util.spec_from_file_location("make_dataset", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def test_make_dataset_respects_the_split_and_is_reproducible(tmp_path):
    import json

    md = _load_make_dataset()
    args = ["--seed", "3", "--train", "60", "--bank", "16", "--eval", "6", "--captions", "2"]
    assert md.main(["--out", str(tmp_path / "a"), *args]) == 0
    assert md.main(["--out", str(tmp_path / "b"), *args]) == 0
    for split, count in (("train", 60), ("bank", 16), ("eval", 6)):
        text_a = (tmp_path / "a" / f"{split}.jsonl").read_text()
        assert text_a == (tmp_path / "b" / f"{split}.jsonl").read_text()
        records = [json.loads(line) for line in text_a.splitlines()]
        assert [r["index"] for r in records] == list(range(count))
        for r in records:
            scene = Scene.from_dict(r["scene"])
            png = tmp_path / "a" / r["image"]
            assert png.read_bytes() == (tmp_path / "b" / r["image"]).read_bytes()
            assert np.array_equal(np.asarray(Image.open(png)), np.asarray(scene.render()))
            assert len(r["captions"]) == 2 and r["text"] == r["captions"][0]
            for caption in r["captions"]:
                assert matches(parse_caption(caption), scene.objects,
                               background=scene.background)
            if split == "train":
                assert not uses_held_out(scene)
            if split == "eval" or (split == "bank" and r["index"] % 4 == 0):
                assert uses_held_out(scene)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["splits"]["train"].get("held_out_objects", 0) == 0
    assert manifest["splits"]["bank"]["held_out_objects"] >= 4
    # Splits draw from distinct seed streams.
    train = (tmp_path / "a" / "train.jsonl").read_text().splitlines()
    bank = (tmp_path / "a" / "bank.jsonl").read_text().splitlines()
    assert json.loads(train[0])["scene"] != json.loads(bank[0])["scene"]
    with pytest.raises(ValueError, match="captions"):
        md.DatasetOptions(tmp_path, captions=0)


def test_cell_codes_name_each_cell_content_once():
    from cm3rt.demo.shapes.cells import (
        CODES_PER_IMAGE,
        NUM_CELL_CODES,
        cell_code,
        describe_code,
        scene_codes,
    )
    from cm3rt.demo.shapes.vocab import SIZES, WORLD_BACKGROUNDS

    assert NUM_CELL_CODES == 194 and CODES_PER_IMAGE == 9
    names = [describe_code(c) for c in range(NUM_CELL_CODES)]
    assert len(set(names)) == NUM_CELL_CODES  # one content per code
    objs = [SceneObject(s, c, z, (0, 0)) for s in SHAPES for c in COLOURS for z in SIZES]
    codes = {cell_code(bg, o) for bg in WORLD_BACKGROUNDS for o in [None, *objs]}
    assert codes == set(range(NUM_CELL_CODES))  # and every content has its code
    scene = Scene((SceneObject("star", "red", "small", (0, 2)),
                   SceneObject("circle", "blue", "large", (2, 0))), "black")
    got = scene_codes(scene)
    assert len(got) == 9 and got[0] == cell_code("black") and got.count(got[0]) == 7
    assert describe_code(got[2]) == "small red star on black"
    assert describe_code(got[6]) == "large blue circle on black"
    # the same object gives the same code in every cell
    moved = Scene((SceneObject("star", "red", "small", (1, 1)),), "black")
    assert scene_codes(moved)[4] == got[2]
    with pytest.raises(ValueError, match="backgrounds"):
        cell_code("grey")
    with pytest.raises(ValueError, match="offset"):
        cell_code("white", SceneObject("star", "red", "small", (0, 0), (0.01, 0.0)))
    with pytest.raises(ValueError, match="flat"):
        scene_codes(Scene(scene.objects, "black", texture="noise"))
    with pytest.raises(ValueError, match="code must be"):
        describe_code(NUM_CELL_CODES)
