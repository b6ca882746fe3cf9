"""Every front door resolves settings alike and validates alike (tests/door_cases.py):
``cm3rt.generate`` and the ``cm3rt`` CLI give the same output for the same inputs, and
reject the same bad inputs with an error that names the argument."""

from __future__ import annotations

import re

import numpy as np
import pytest
from door_cases import BAD, GOOD, IMAGE, PROMPT
from model_fixtures import make_tiny_model_dir
from PIL import Image
from retrieval_fixtures import make_tiny_clip, random_image

import cm3rt
from cm3rt import cli
from cm3rt.api import load_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """{tiny, bank, image, out}: a tiny model directory, a bank built for it, an input
    image file and an output path prefix."""
    from cm3rt.retrieval.bank import MemoryBank
    from cm3rt.retrieval.clip import ClipEncoder
    from cm3rt.tokenizer import ImageTokenizer

    tmp = tmp_path_factory.mktemp("doors")
    model_dir = make_tiny_model_dir(tmp, use_hf=False, seed=5)
    cfg, w = make_tiny_clip(tmp / "clip", seed=3)
    rng = np.random.default_rng(8)
    src = tmp / "src"
    src.mkdir()
    for i, cap in enumerate(["a red star above a blue circle", "a blue square", "a star"]):
        random_image(rng, (16, 16)).save(src / f"d{i}.png")
        (src / f"d{i}.txt").write_text(cap)
    MemoryBank.build(src, tmp / "bank", ClipEncoder(str(cfg), weights=w),
                     ImageTokenizer.from_pretrained(model_dir), progress=False).close()
    random_image(rng, (16, 16)).save(tmp / "in.png")
    return {"tiny": str(model_dir), "bank": str(tmp / "bank"), "image": str(tmp / "in.png"),
            "out": str(tmp / "out")}


def _fill(value, places, image):
    if value is IMAGE:
        return image
    if isinstance(value, str):
        return value.format(**places)
    if isinstance(value, list):
        return [_fill(v, places, image) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, places, image) for k, v in value.items()}
    return value


@pytest.mark.parametrize("name,model,api_kwargs,cli_args", GOOD, ids=[c[0] for c in GOOD])
def test_same_inputs_same_output_through_api_and_cli(name, model, api_kwargs, cli_args,
                                                     places, tmp_path, capsys):
    with Image.open(places["image"]) as im:
        image = im.convert("RGB")
    kwargs = _fill(api_kwargs, places, image)
    if model == "tiny":
        kwargs["model"] = places["tiny"]
    captioning = api_kwargs.get("task") == "image_to_text"
    out = cm3rt.generate([] if captioning else PROMPT, **kwargs)

    argv = _fill(list(cli_args), places, image)
    if model == "tiny":
        argv += ["--model", places["tiny"]]
    capsys.readouterr()
    if captioning:
        extra = [a for k, v in api_kwargs.items() if k in ("max_new_tokens", "temperature")
                 for a in (f"--{k.replace('_', '-')}", str(v))]
        assert cli.main(["caption", places["image"], "--no-progress", *argv, *extra]) == 0
        printed = capsys.readouterr().out.strip().splitlines()
        assert printed == [s.text.strip() for s in out.samples]
        return
    png = tmp_path / "cli.png"
    assert cli.main(["generate", PROMPT, "-o", str(png), "--no-progress", *argv]) == 0
    with Image.open(png) as im:
        got = np.asarray(im.convert("RGB"))
    assert np.array_equal(got, np.asarray(out.image.convert("RGB")))


def _bad_api_kwargs(api_kwargs, places):
    kwargs = _fill(api_kwargs, places, None)
    if kwargs.get("images") == ["EMPTY"]:
        kwargs["images"] = [Image.new("RGB", (0, 0))]
    if kwargs.get("images") == ["IMAGE"]:
        kwargs["images"] = [random_image(np.random.default_rng(0), (16, 16))]
    return kwargs


@pytest.mark.parametrize("name,api_kwargs,cli_args,error,pattern",
                         [c for c in BAD if c[1] is not None],
                         ids=[c[0] for c in BAD if c[1] is not None])
def test_api_rejects_bad_input_naming_it(name, api_kwargs, cli_args, error, pattern, places):
    kwargs = _bad_api_kwargs(api_kwargs, places)
    prompt = kwargs.pop("prompt", PROMPT)
    with pytest.raises(error, match=pattern):
        cm3rt.generate(prompt, **kwargs)
    engine = load_engine()  # the shared default engine queued nothing and holds no blocks
    assert not engine.has_unfinished() and engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.parametrize("name,api_kwargs,cli_args,error,pattern",
                         [c for c in BAD if c[2] is not None],
                         ids=[c[0] for c in BAD if c[2] is not None])
def test_cli_rejects_bad_input_in_one_line(name, api_kwargs, cli_args, error, pattern,
                                           places, tmp_path, capsys):
    argv = _fill(list(cli_args), places, None)
    prompt = argv.pop(0) if argv and not argv[0].startswith("-") else PROMPT
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "x.png")]
    capsys.readouterr()
    assert cli.main(["generate", prompt, "--no-progress", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    assert err.startswith("cm3rt generate: error: ") and re.search(pattern, err), err
    assert not (tmp_path / "x.png").exists()


def test_bad_input_table_is_broad():
    assert len(BAD) >= 25
    assert sum(c[1] is not None and c[2] is not None for c in BAD) >= 20  # both doors


def test_cli_internal_error_prints_the_traceback(monkeypatch, capsys, tmp_path):
    import cm3rt.api

    # --debug shows the traceback of a user error too
    assert cli.main(["--debug", "generate", PROMPT, "--seed", "-1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "seed must be in" in err

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(cm3rt.api, "resolve_request", broken)
    assert cli.main(["generate", PROMPT, "-o", str(tmp_path / "x.png")]) == \
        cli.EXIT_INTERNAL_ERROR
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'a bug'" in err
    assert "internal error (KeyError)" in err
