"""The embedded default assets: packaging (tools/train/package_default.py) and the no-flag
defaults of ``cm3rt.generate`` / ``cm3rt generate`` / ``cm3rt caption``.

A tiny fake default directory (random tiny Chameleon + VQGAN + tokenizer, a random tiny
CLIP, a 5-document bank) is packaged by the real packaging code into a temporary folder,
and the runtime's default directory is pointed at it. Defaults are checked by comparing
against the same generation with every setting passed explicitly (so they are really read
from defaults.json), and against the bank searched directly (the documents in context).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import make_tiny_model_dir
from PIL import Image
from retrieval_fixtures import TINY_CLIP_CFG, random_image

from cm3rt import cli
from cm3rt.api import defaults as dflt
from cm3rt.api import generate
from cm3rt.retrieval import clip as clip_mod

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "train"))

import package_default

PROMPT = "a red circle"
CFG_SCALE = 2.5  # not the CLI's built-in 3.0: equality below proves defaults.json is read
K_DOCS = 2


def make_local_clip(folder: Path, seed: int) -> Path:
    """A random tiny CLIP in open_clip's local-dir layout (config + safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    cfg = json.loads(json.dumps(TINY_CLIP_CFG))
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg,
        "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(tmp, decoder dir, clip dir, other clip dir, bank dir, bank source folder)."""
    from cm3rt.retrieval.bank import MemoryBank
    from cm3rt.retrieval.clip import ClipEncoder
    from cm3rt.tokenizer import ImageTokenizer

    tmp = tmp_path_factory.mktemp("default_assets")
    decoder = make_tiny_model_dir(tmp, use_hf=False, name="decoder")
    clip = make_local_clip(tmp / "clip", seed=5)
    other_clip = make_local_clip(tmp / "clip_other", seed=6)
    src = tmp / "src"
    src.mkdir()
    rng = np.random.default_rng(2)
    for i, cap in enumerate(["a red circle on white", "a blue square", "a green star",
                             "a yellow triangle", "a red square"]):
        random_image(rng, (16, 16)).save(src / f"doc{i}.png")
        (src / f"doc{i}.txt").write_text(cap)
    MemoryBank.build(src, tmp / "bank", ClipEncoder(f"local-dir:{clip}"),
                     ImageTokenizer.from_pretrained(decoder), progress=False).close()
    runs = tmp / "runs"
    (runs / "clip").mkdir(parents=True)
    (runs / "run_all.log").write_text(  # as run_all.sh writes it, train_clip resumed once
        "== train_clip: python train_clip.py\n== train_clip: resumed after 100 s in earlier runs\n"
        "== train_clip: 123 s\n== build_banks: python build_banks.py\n== build_banks: 9 s\n")
    (runs / "clip" / "options.json").write_text(json.dumps({"seed": 7}))
    return tmp, decoder, clip, other_clip, tmp / "bank", runs


def options(parts, **kw) -> package_default.PackageOptions:
    tmp, decoder, clip, _, bank, runs = parts
    base = {"decoder": decoder, "tokenizer": decoder, "vqgan": decoder, "clip": clip,
            "bank": bank, "out": tmp / "default", "runs": runs, "cfg_scale": CFG_SCALE,
            "k_docs": K_DOCS}
    return package_default.PackageOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def packaged(parts):
    opts = options(parts)
    info = package_default.package(opts)
    return opts.out, info


@pytest.fixture
def default_dir(packaged, monkeypatch):
    """Point the runtime's default model (and embedded CLIP) at the packaged folder."""
    root, _ = packaged
    monkeypatch.setattr(dflt, "DEFAULT_DIR", root)
    monkeypatch.setattr(clip_mod, "EMBEDDED_CLIP_DIR", root / "clip")
    return root


# ---------------------------------------------------------------------- packaging
def test_package_layout_and_manifest(parts, packaged):
    from safetensors.torch import load_file

    from cm3rt.retrieval.clip import ClipEncoder
    from cm3rt.retrieval.manifest import Manifest

    root, info = packaged
    names = {p.name for p in root.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vqgan.safetensors",
            "vqgan_config.json", "clip", "bank", "defaults.json", "TRAINING.md"} <= names
    # decoder weights are the originals rounded to bf16
    orig = load_file(str(parts[1] / "model.safetensors"))
    shipped = load_file(str(root / "model.safetensors"))
    assert shipped.keys() == orig.keys()
    for k, v in orig.items():
        assert shipped[k].dtype == torch.bfloat16 and torch.equal(shipped[k], v.bfloat16()), k
    # the VQGAN and CLIP files are the very ones the bank was built with
    assert (root / "vqgan.safetensors").read_bytes() == (parts[1] / "vqgan.safetensors") \
        .read_bytes()
    m = Manifest.read(root / "bank")
    assert m.encoder.arch == "embedded" and m.encoder.weights is None
    assert m.encoder.digest == ClipEncoder(f"local-dir:{root / 'clip'}").identity.digest
    d = json.loads((root / "defaults.json").read_text())
    assert (d["guidance"], d["cfg_scale"], d["k_docs"], d["bank"]) == ("cfg", CFG_SCALE,
                                                                        K_DOCS, "bank")
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6
    assert info["total_mb"] == pytest.approx(size) and info["bank_docs"] == 5
    md = (root / "TRAINING.md").read_text()
    assert "| train_clip | 123 s (resumed after 100 s) |\n| build_banks | 9 s |" in md
    assert "`clip`: seed 7" in md


def test_package_refuses_a_bank_of_another_clip(parts, tmp_path):
    out = tmp_path / "default"
    with pytest.raises(ValueError, match="encoder"):
        package_default.package(options(parts, clip=parts[3], out=out))
    assert not out.exists() and not out.with_name("default.tmp").exists()


def test_package_size_limit(parts, tmp_path):
    out = tmp_path / "default"
    with pytest.raises(ValueError, match=r"above the 0\.5 MB limit \(largest: "):
        package_default.package(options(parts, out=out, max_mb=0.5))
    assert not out.exists()


# ---------------------------------------------------------------------- defaults
def test_generate_no_flags_uses_retrieval_and_cfg(default_dir):
    from cm3rt.retrieval.bank import MemoryBank
    from cm3rt.retrieval.clip import ClipEncoder
    from cm3rt.tokenizer import TextTokenizer

    out = generate(PROMPT, seed=0)
    with MemoryBank.open(default_dir / "bank",
                         encoder=ClipEncoder(f"local-dir:{default_dir / 'clip'}")) as bank:
        chosen = bank.search(text=PROMPT, k=K_DOCS)
    assert len(chosen) == K_DOCS
    assert [d.id for d in out.docs] == [d.id for d in chosen]
    tok = TextTokenizer.from_file(default_dir)
    body = [*tok.encode(PROMPT), tok.boi_id]
    assert out.prompt_token_ids[-len(body):] == body
    assert len(out.prompt_token_ids) > 1 + len(body)  # documents stand before the prompt
    assert out.image is not None

    explicit = generate(PROMPT, model=str(default_dir), bank=default_dir / "bank",
                        k_docs=K_DOCS, guidance="cfg", cfg_scale=CFG_SCALE, temperature=1.0,
                        top_k=0, seed=0)
    assert explicit.prompt_token_ids == out.prompt_token_ids
    assert explicit.samples[0].token_ids == out.samples[0].token_ids
    no_cfg = generate(PROMPT, guidance="none", seed=0)
    assert no_cfg.prompt_token_ids == out.prompt_token_ids  # retrieval still on
    assert no_cfg.samples[0].token_ids != out.samples[0].token_ids


def test_explicit_k_docs_zero_turns_retrieval_off(default_dir):
    from cm3rt.tokenizer import TextTokenizer

    tok = TextTokenizer.from_file(default_dir)
    out = generate(PROMPT, k_docs=0, seed=0)
    assert out.docs == []
    assert out.prompt_token_ids == [tok.bos_id, *tok.encode(PROMPT), tok.boi_id]
    # A model given: defaults.json does not apply (no documents); the built-in defaults do
    # (cm3rt.api.BUILTIN_SAMPLING: text -> image with CFG at SamplingParams' scale).
    with_model = generate(PROMPT, model=str(default_dir), seed=0)
    assert with_model.docs == []
    builtin = generate(PROMPT, model=str(default_dir), guidance="cfg", cfg_scale=3.0, seed=0)
    assert with_model.samples[0].token_ids == builtin.samples[0].token_ids


def test_cli_generate_no_flags(default_dir, tmp_path, capsys):
    png = tmp_path / "x.png"
    assert cli.main(["generate", PROMPT, "-o", str(png), "--no-progress"]) == 0
    with Image.open(png) as im:
        got = np.asarray(im.convert("RGB"))
    want = np.asarray(generate(PROMPT, seed=0).image.convert("RGB"))
    assert np.array_equal(got, want)  # same retrieval + CFG defaults as the Python API
    assert cli.main(["generate", PROMPT, "-o", str(png), "--no-progress", "--k-docs", "0",
                     "--guidance", "none"]) == 0
    with Image.open(png) as im:
        plain = np.asarray(im.convert("RGB"))
    want = np.asarray(generate(PROMPT, k_docs=0, guidance="none", seed=0).image.convert("RGB"))
    assert np.array_equal(plain, want)


def test_cli_caption_no_flags(default_dir, tmp_path, capsys):
    png = tmp_path / "in.png"
    random_image(np.random.default_rng(9), (16, 16)).save(png)
    capsys.readouterr()
    assert cli.main(["caption", str(png), "--no-progress", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out.strip()
    with Image.open(png) as im:
        image = im.convert("RGB")
    out = generate([image], seed=0, max_new_tokens=8)  # caption defaults: greedy, no docs
    assert out.docs == []
    assert printed == out.samples[0].text.strip()
    greedy = generate([image], seed=1, temperature=0.0, guidance="none", max_new_tokens=8)
    assert greedy.samples[0].token_ids == out.samples[0].token_ids


def install_as_default(root, monkeypatch, tmp_path):
    """Make the packaged ``root`` the embedded default; -> (a PNG's path, its RGB image)."""
    monkeypatch.setattr(dflt, "DEFAULT_DIR", root)
    monkeypatch.setattr(clip_mod, "EMBEDDED_CLIP_DIR", root / "clip")
    png = tmp_path / "in.png"
    random_image(np.random.default_rng(9), (16, 16)).save(png)
    with Image.open(png) as im:
        return png, im.convert("RGB")


def test_caption_k_docs_retrieves_by_the_image(parts, monkeypatch, tmp_path, capsys):
    """defaults.json's caption.k_docs: a caption with no flags retrieves that many documents
    with the image as the query; k_docs=0 / -k 0 turns it off; text -> image keeps k_docs."""
    from cm3rt.retrieval.bank import MemoryBank
    from cm3rt.retrieval.clip import ClipEncoder

    root = tmp_path / "default_captions"
    package_default.package(options(parts, out=root, caption_k_docs=1))
    d = json.loads((root / "defaults.json").read_text())
    assert d["caption"]["k_docs"] == 1 and d["k_docs"] == K_DOCS
    assert dflt.load_defaults(root).k_docs_for("image_to_text") == 1
    png, image = install_as_default(root, monkeypatch, tmp_path)
    out = generate([image], seed=0, max_new_tokens=8)
    with MemoryBank.open(root / "bank", encoder=ClipEncoder(f"local-dir:{root / 'clip'}")) as b:
        chosen = b.search(image=[image], k=1)
    assert [x.id for x in out.docs] == [x.id for x in chosen] and len(chosen) == 1
    plain = generate([image], seed=0, max_new_tokens=8, k_docs=0)
    assert plain.docs == [] and len(plain.prompt_token_ids) < len(out.prompt_token_ids)
    capsys.readouterr()
    assert cli.main(["caption", str(png), "--no-progress", "--max-new-tokens", "8",
                     "-k", "0"]) == 0
    assert capsys.readouterr().out.strip() == plain.samples[0].text.strip()
    assert len(generate(PROMPT, seed=0).docs) == K_DOCS
    with pytest.raises(ValueError, match="caption.k_docs must be an int >= 0"):
        (root / "defaults.json").write_text(json.dumps({**d, "caption": {"k_docs": -2}}))
        dflt.load_defaults(root)


def test_caption_doc_sweep_from_defaults(parts, monkeypatch, tmp_path, capsys):
    """defaults.json's caption.doc_sweep: a caption with no flags is a document sweep over
    0..caption.k_docs documents (the CLI, the API and resolve_request agree); --no-doc-sweep
    / doc_sweep=False and k_docs=0 turn it off; text -> image never sweeps."""
    from cm3rt.api import resolve_request

    root = tmp_path / "default_sweep"
    package_default.package(options(parts, out=root, caption_k_docs=2, caption_doc_sweep=True))
    d = json.loads((root / "defaults.json").read_text())
    assert d["caption"]["doc_sweep"] is True and d["caption"]["k_docs"] == 2
    assert dflt.load_defaults(root).caption_doc_sweep is True
    png, image = install_as_default(root, monkeypatch, tmp_path)
    _, req = resolve_request([image])
    assert req.doc_sweep is True and req.k_docs == 2 and req.task == "image_to_text"
    assert resolve_request([image], k_docs=0)[1].doc_sweep is False
    assert resolve_request([image], doc_sweep=False)[1].doc_sweep is False
    assert resolve_request(PROMPT)[1].doc_sweep is False
    out = generate([image], seed=0, max_new_tokens=8)
    assert out.ok and out.samples[0].score is not None  # ranked by the bank's CLIP
    capsys.readouterr()
    assert cli.main(["caption", str(png), "--no-progress", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == out.samples[0].text.strip()
    plain = generate([image], seed=0, max_new_tokens=8, doc_sweep=False)
    assert plain.samples[0].score is None and len(plain.docs) == 2
    assert cli.main(["caption", str(png), "--no-progress", "--max-new-tokens", "8",
                     "--no-doc-sweep"]) == 0
    assert capsys.readouterr().out.strip() == plain.samples[0].text.strip()
    (root / "defaults.json").write_text(json.dumps({**d, "caption": {"doc_sweep": "yes"}}))
    with pytest.raises(TypeError, match="caption.doc_sweep must be true or false"):
        dflt.load_defaults(root)


def test_package_refuses_a_doc_sweep_without_documents(parts, tmp_path, capsys):
    with pytest.raises(SystemExit):
        package_default.main(["--decoder", str(tmp_path), "--caption-doc-sweep",
                              "--caption-k-docs", "0", "--out", str(tmp_path / "x")])
    assert "--caption-doc-sweep needs --caption-k-docs >= 1" in capsys.readouterr().err


def test_missing_default_assets_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(dflt, "DEFAULT_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="default model is not installed.*"
                                                "package_default.py"):
        generate(PROMPT)
    assert cli.main(["generate", PROMPT, "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "not installed" in err and "--model" in err
    assert cli.main(["caption", str(tmp_path / "x.png")]) == 1


def test_malformed_defaults_rejected(packaged, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(packaged[0], root)
    d = json.loads((root / "defaults.json").read_text())
    (root / "defaults.json").write_text(json.dumps({**d, "k_docs": -1}))
    with pytest.raises(ValueError, match="k_docs must be an int >= 0"):
        dflt.load_defaults(root)
    (root / "defaults.json").write_text(json.dumps({**d, "cfg": 3}))
    dflt.load_defaults(root)  # unknown top-level keys are ignored ...
    (root / "defaults.json").write_text(json.dumps({**d, "caption": {"beam": 3}}))
    with pytest.raises(ValueError, match="unknown sampling settings"):
        dflt.load_defaults(root)  # ... but not unknown sampling settings
    (root / "defaults.json").write_text(json.dumps({**d, "max_doc_score": "off"}))
    with pytest.raises(ValueError, match=r"defaults\.json: argument 'max_doc_score'"):
        dflt.load_defaults(root)


def test_max_doc_score_from_defaults(parts, monkeypatch, tmp_path):
    """defaults.json's max_doc_score (package_default --max-doc-score): null turns the
    retrieval rule off for requests that do not set it; absent means RA-CM3's 0.9; an
    explicit max_doc_score (API or CLI flag) wins."""
    from cm3rt.api import resolve_request
    from cm3rt.cli.generate import score_or_none

    root = tmp_path / "default_max_score"
    package_default.package(options(parts, out=root, max_doc_score=None))
    d = json.loads((root / "defaults.json").read_text())
    assert "max_doc_score" in d and d["max_doc_score"] is None
    assert dflt.load_defaults(root).max_doc_score is None
    monkeypatch.setattr(dflt, "DEFAULT_DIR", root)
    monkeypatch.setattr(clip_mod, "EMBEDDED_CLIP_DIR", root / "clip")
    assert resolve_request(PROMPT)[1].max_doc_score is None
    assert resolve_request(PROMPT, max_doc_score=0.8)[1].max_doc_score == 0.8
    assert score_or_none("none") is None and score_or_none("0.95") == 0.95
    assert score_or_none("defaults") == "defaults"  # the CLI's default: this file's value
    del d["max_doc_score"]
    (root / "defaults.json").write_text(json.dumps(d))
    assert dflt.load_defaults(root).max_doc_score == 0.9


# ---------------------------------------------------------------------- the real assets
REAL = REPO / "cm3rt" / "assets" / "default"


@pytest.mark.skipif(not (REAL / "config.json").is_file(), reason="no packaged default model")
def test_real_default_assets(tmp_path):
    size = sum(p.stat().st_size for p in REAL.rglob("*") if p.is_file())
    assert size <= 40e6, f"cm3rt/assets/default is {size / 1e6:.1f} MB (limit 40 MB)"
    png = tmp_path / "out.png"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run([sys.executable, "-m", "cm3rt", "generate", "a red circle", "-o",
                        str(png), "--no-progress"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    with Image.open(png) as im:
        assert im.size[0] > 0
