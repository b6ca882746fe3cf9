"""Smoke tests of the training scripts (tools/train): tiny data, a few steps each.

They prove that each script runs end to end in its ``--quick`` mode, that what it writes
loads through cm3rt's own loaders (TextTokenizer, ImageTokenizer, ClipEncoder), that the
codes of step 3 are what the loaded VQGAN computes, and that an interrupted run resumed
from its checkpoint ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TRAIN_DIR = Path(__file__).resolve().parents[1] / "tools" / "train"
sys.path.insert(0, str(TRAIN_DIR))

import encode_images
import make_dataset
import measure_autocast
import train_clip
import train_tokenizer
import train_vqgan

from cm3rt.demo.shapes.cells import NUM_CELL_CODES


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A tiny dataset plus the outputs of steps 1-3 (each script run once)."""
    root = tmp_path_factory.mktemp("train")
    make_dataset.make_dataset(make_dataset.DatasetOptions(root / "shapes", seed=3, train=64,
                                                          bank=40, eval=4, novel=8))
    assert train_tokenizer.main(["--data", str(root / "shapes"), "--out", str(root / "tok"),
                                 "--quick"]) == 0
    assert train_vqgan.main(["--out", str(root / "vq"), "--quick"]) == 0
    assert encode_images.main(["--data", str(root / "shapes"), "--vqgan",
                               str(root / "vq" / "vqgan"), "--out", str(root / "codes"),
                               "--quick"]) == 0
    return root


def test_tokenizer_layout_and_loading(runs):
    from cm3rt.tokenizer import TextTokenizer

    tok = TextTokenizer.from_file(runs / "tok")
    specials = ["<s>", "</s>", "<pad>", "<unk>", "<mask>", "<infill>", "<racm3:break>", "<eoss>"]
    assert [tok.token_to_id(s) for s in specials] == list(range(8))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.boi_id, tok.eoi_id) == (0, 1, 2, 6, 7)
    assert (tok.mask_id, tok.infill_id) == (4, 5)
    assert tok.num_image_codes == NUM_CELL_CODES == 194
    ids = tok.image_token_ids
    # image tokens come after every text token, in code order
    assert ids.tolist() == list(range(tok.vocab_size - NUM_CELL_CODES, tok.vocab_size))
    assert tok.id_to_token(int(ids[123])) == "IMGIMGBCDZ"
    caption = json.loads((runs / "shapes" / "train.jsonl").open().readline())["text"]
    enc = tok.encode(caption)
    assert tok.decode(enc) == caption
    assert all(i < tok.vocab_size - NUM_CELL_CODES and i >= 8 for i in enc)
    # the world's words are whole tokens: far fewer tokens than characters
    assert len(enc) <= len(caption.split()) + 2


def test_vqgan_export_loads_and_round_trips(runs):
    from cm3rt.tokenizer import ImageTokenizer

    tok = ImageTokenizer.from_pretrained(runs / "vq" / "vqgan")
    assert (tok.image_size, tok.num_tokens, tok.codebook_size) == (48, 9, 194)  # f = 16
    assert tok.has_decoder
    info = json.loads((runs / "vq" / "checkpoint.json").read_text())
    assert info["step"] == 6  # quick: 6 steps of 4 scenes
    with Image.open(runs / "shapes" / "train" / "00000" / "0000000.png") as im:
        codes = tok.encode([im.convert("RGB")])
    assert codes.shape == (1, 9) and int(codes.min()) >= 0 and int(codes.max()) < 194
    (out,) = tok.decode(codes)
    assert out.size == (48, 48)


def test_vqgan_resume_is_exact(runs, tmp_path):
    opts = train_vqgan.VQGANOptions(tmp_path / "a", images=4 * 4, decoder_images=2 * 4,
                                    batch=4, ckpt_every=3)  # what --quick runs
    train_vqgan.train(opts, quiet=True, max_steps=5)  # interrupted in phase 2, step 5 of 6
    assert json.loads((tmp_path / "a" / "checkpoint.json").read_text())["step"] == 5
    train_vqgan.train(opts, quiet=True)  # resumed
    from safetensors.torch import load_file

    resumed = load_file(str(tmp_path / "a" / "vqgan" / "vqgan.safetensors"))
    straight = load_file(str(runs / "vq" / "vqgan" / "vqgan.safetensors"))  # seed 0, same opts
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k


def test_vqgan_decoder_phase_keeps_the_codes(tmp_path):
    """Phase 2 trains only the pixel decoder: a run extended by it (resumed from the end of
    phase 1) has phase 1's encoder and code book, bit for bit, and a new decoder."""
    from safetensors.torch import load_file

    joint = train_vqgan.VQGANOptions(tmp_path / "a", images=4 * 4, batch=4, ckpt_every=3)
    train_vqgan.train(joint, quiet=True)
    first = load_file(str(tmp_path / "a" / "vqgan" / "vqgan.safetensors"))
    both = train_vqgan.VQGANOptions(tmp_path / "a", images=4 * 4, decoder_images=3 * 4,
                                    batch=4, ckpt_every=3)
    assert both.total_steps == 7
    train_vqgan.train(both, quiet=True)
    after = load_file(str(tmp_path / "a" / "vqgan" / "vqgan.safetensors"))
    assert first.keys() == after.keys()
    changed = {k for k in first if not torch.equal(first[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").open()]
    assert log[-1]["step"] == 7 and log[-1]["phase"] == 2


def test_vqgan_eval_gate_runs(runs, capsys):
    r = train_vqgan.evaluate(runs / "vq" / "vqgan", n=12)
    # the analyzer reads the raw renders (the harness is right); a 6-step VQGAN is not
    assert r["raw_agreement"] >= 0.9
    assert 0.0 <= r["roundtrip_agreement"] <= 1.0 and r["passed"] is (
        r["roundtrip_agreement"] >= train_vqgan.GATE)


def test_encoded_codes_match_the_loaded_tokenizer(runs):
    from cm3rt.tokenizer import ImageTokenizer

    meta = json.loads((runs / "codes" / "codes.json").read_text())
    tok = ImageTokenizer.from_pretrained(runs / "vq" / "vqgan")
    assert meta["identity"] == tok.identity()
    for split in ("train", "bank"):
        codes = np.load(runs / "codes" / f"{split}_codes.npy")
        assert codes.dtype == np.uint16 and codes.shape == (40, 9)
        recs = [json.loads(line) for line in (runs / "shapes" / f"{split}.jsonl").open()][:40]
        pick = [0, 17, 39]
        images = []
        for i in pick:
            with Image.open(runs / "shapes" / recs[i]["image"]) as im:
                images.append(im.convert("RGB"))
        assert np.array_equal(codes[pick], tok.encode(images).numpy())


def test_clip_trains_exports_and_loads(runs, tmp_path):
    pytest.importorskip("open_clip")
    from cm3rt.retrieval.clip import ClipEncoder
    from cm3rt.tokenizer import TextTokenizer

    out = tmp_path / "clip"
    assert train_clip.main(["--data", str(runs / "shapes"), "--tokenizer", str(runs / "tok"),
                            "--out", str(out), "--quick"]) == 0
    enc = ClipEncoder(f"local-dir:{out / 'clip'}")
    assert enc.embed_dim == 96
    # open_clip's tokenizer for this folder is the project's BPE, ending at </s> (pooling)
    text = "a red star above a blue circle"
    ids = TextTokenizer.from_file(runs / "tok").encode(text)
    row = enc.tokenizer([text])[0].tolist()
    assert row[:len(ids) + 1] == ids + [1]
    assert set(row[len(ids) + 1:]) == {2} and len(row) == 32
    t = enc.encode_text([text, "a green square"])
    assert t.shape == (2, 96) and torch.allclose(t.norm(dim=1), torch.ones(2), atol=1e-5)
    # the exported weights are the trained ones (not a fresh init)
    from safetensors.torch import load_file

    ckpt = load_file(str(out / "checkpoint.safetensors"))
    for k, v in enc.model.state_dict().items():
        assert torch.equal(v, ckpt["model." + k]), k
    r = train_clip.evaluate(out / "clip", runs / "shapes", limit=40)
    assert r["n"] == 40 and 0.0 <= r["top1_same_objects"] <= 1.0


def test_clip_trains_on_the_bank_split_too(runs):
    """The retriever learns the memory bank it searches (held-out pairs included): the
    default splits are train + bank; a split make_dataset.py does not write is refused."""
    opts = train_clip.ClipOptions(runs / "shapes", runs / "tok", runs / "unused")
    assert opts.splits == ("train", "bank")
    both = train_clip.PairSource(runs / "shapes", None, opts.splits)
    train = train_clip.PairSource(runs / "shapes", None, ("train",))
    bank_caps = [json.loads(line)["text"] for line in (runs / "shapes" / "bank.jsonl").open()]
    assert len(both.images) == len(train.images) + len(bank_caps)
    assert [c for caps in both.captions[len(train.images):] for c in caps[:1]] == [
        (json.loads(line).get("captions") or [json.loads(line)["text"]])[0]
        for line in (runs / "shapes" / "bank.jsonl").open()]
    with pytest.raises(ValueError, match="splits must be a non-empty subset"):
        train_clip.ClipOptions(runs / "shapes", runs / "tok", runs / "unused", splits=("eval",))


def test_measure_autocast_times_both_dtypes(capsys):
    """measure_autocast.py (the bf16-vs-fp32 decision in tools/train/README.md) times the
    real decoder and both VQGAN phases in bf16 and fp32; a malformed shape is refused."""
    assert measure_autocast.main(["--reps", "1", "--steps", "1", "--decoder-shapes", "2x8",
                                  "--vqgan-batch", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith(("| step", "| ---"))]
    assert [r[0].strip() for r in rows] == ["decoder, 2 x 8 tokens",
                                            "VQGAN phase 1 (joint), batch 1",
                                            "VQGAN phase 2 (decoder), batch 1"]
    for _, bf16, fp32, ratio in rows:
        assert float(bf16) > 0 and float(fp32) > 0
        # the ratio is printed to 2 decimals, the times to 4 significant digits
        assert abs(float(ratio) - float(bf16) / float(fp32)) <= 0.005 + 0.002 * float(ratio)
    with pytest.raises(SystemExit) as e:
        measure_autocast.main(["--decoder-shapes", "64by64"])
    assert e.value.code == 2
