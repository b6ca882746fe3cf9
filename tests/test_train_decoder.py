"""The decoder training script (tools/train/train_decoder.py) and its torch module.

- The trainable module and cm3rt's inference model give the same logits for the same
  weights (the export goes through cm3rt's normal HF-layout loader).
- Training sequences have exactly the layout cm3rt's engine builds at inference: a text ->
  image prompt, the unconditional CFG prompt and retrieved documents.
- ``--quick`` runs end to end; a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TRAIN_DIR = Path(__file__).resolve().parents[1] / "tools" / "train"
sys.path.insert(0, str(TRAIN_DIR))

import decoder_model
import encode_images
import make_dataset
import train_decoder
import train_tokenizer
import train_vqgan


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Tiny dataset, tokenizer, VQGAN, codes, and retrieval lists (each train record gets
    its two successors: the script must not care how they were chosen)."""
    root = tmp_path_factory.mktemp("decoder")
    make_dataset.make_dataset(make_dataset.DatasetOptions(root / "shapes", seed=5, train=60,
                                                          bank=8, eval=2, novel=120))
    assert train_tokenizer.main(["--data", str(root / "shapes"), "--out", str(root / "tok"),
                                 "--quick"]) == 0
    assert train_vqgan.main(["--out", str(root / "vq"), "--quick"]) == 0
    assert encode_images.main(["--data", str(root / "shapes"), "--vqgan",
                               str(root / "vq" / "vqgan"), "--out", str(root / "codes"),
                               "--splits", "train", "--quick"]) == 0
    assert encode_images.main(["--data", str(root / "shapes"), "--vqgan",
                               str(root / "vq" / "vqgan"), "--out", str(root / "codes"),
                               "--splits", "novel"]) == 0
    n = np.load(root / "codes" / "train_codes.npy").shape[0]
    retr = np.stack([(np.arange(n) + 1) % n, (np.arange(n) + 2) % n], 1).astype(np.int32)
    retr[::7, 1] = -1  # some records have one doc only
    np.save(root / "retrieval.npy", retr)
    return root


def _args(runs: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(runs / "shapes"), "--codes", str(runs / "codes"),
            "--retrieval", str(runs / "retrieval.npy"), "--tokenizer", str(runs / "tok"),
            "--vqgan", str(runs / "vq" / "vqgan"), "--out", str(out), "--threads", "1", *extra]


def _options(runs: Path, out: Path, **kw) -> train_decoder.DecoderOptions:
    base = {"data": runs / "shapes", "codes": runs / "codes",
            "retrieval": runs / "retrieval.npy", "tokenizer": runs / "tok",
            "vqgan": runs / "vq" / "vqgan", "out": out, "threads": 1, "steps": 4,
            "tokens_per_step": 1200, "hidden": 64, "layers": 2, "heads": 2, "kv_heads": 1,
            "ffn": 96, "ckpt_every": 2, "limit": 40}
    return train_decoder.DecoderOptions(**{**base, **kw})


def test_module_matches_cm3rt_inference_model(runs, tmp_path):
    from cm3rt.model import load_model

    opts = _options(runs, tmp_path)
    src = train_decoder.SequenceSource(opts)
    torch.manual_seed(0)
    module = decoder_model.TrainableChameleon(
        train_decoder.model_config(opts, train_decoder.padded_vocab(src.tok)))
    with torch.no_grad():  # non-trivial norms, so a swapped weight name would show
        for name, p in module.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    opts2 = _options(runs, tmp_path / "run")
    out = train_decoder.export(module, opts2, src)
    model = load_model(out).eval()
    ids, _ = src.build("ra", 3, np.random.default_rng(0), 0.0)
    ids_t = torch.tensor(ids)
    want = module(ids_t[None])[0].detach()
    got = model.logits(ids_t[None])[0]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sequences_have_the_engine_layout(runs, tmp_path):
    from cm3rt.engine.params import SamplingParams
    from cm3rt.engine.request import Request
    from cm3rt.engine.sequence import build_prompt
    from cm3rt.engine.state import VocabInfo
    from cm3rt.model import load_pretrained
    from cm3rt.retrieval.bank import Document

    opts = _options(runs, tmp_path)
    src = train_decoder.SequenceSource(opts)
    module = decoder_model.TrainableChameleon(
        train_decoder.model_config(opts, train_decoder.padded_vocab(src.tok)))
    model_dir = train_decoder.export(module, opts, src)
    model, proc = load_pretrained(model_dir)
    vocab = VocabInfo.from_processor(proc, model.config.vocab_size)

    i = 5
    rng = np.random.default_rng(1)
    ids, mask = src.build("t2i", i, rng, p_uncond=0.0)
    caption = proc.text.decode(ids[1: ids.index(src.boi)])
    req = Request(prompt=[caption], task="text_to_image",
                  params=SamplingParams(guidance="cfg", cfg_scale=3.0, max_new_tokens=300))
    spec = build_prompt(req, vocab, proc, max_len=4096).spec
    n = vocab.tokens_per_image
    assert ids[: len(spec.cond)] == spec.cond  # the prompt the engine continues
    assert len(ids) == len(spec.cond) + n + 1 and ids[-1] == src.eoi
    assert ids[len(spec.cond): -1] == src.images[i].tolist()
    assert mask[0] == 0 and all(mask[1:])

    uncond, _ = src.build("t2i", i, np.random.default_rng(1), p_uncond=0.999999)
    assert uncond[: len(spec.uncond)] == spec.uncond  # <s> <mask> <racm3:break>

    ids, mask = src.build("ra", i, np.random.default_rng(2), p_uncond=0.0)
    docs = [int(d) for d in src.retrieval[i] if d >= 0]
    prefix = [src.bos]
    for d in docs:
        if len(prefix) + len(src.doc_text[d]) + n + 2 > len(ids) - n - 2:
            break
        doc = Document(id=d, source=str(d), modality="image+text", caption=src.recs[d]["text"],
                       codes=torch.from_numpy(np.load(runs / "codes" / "train_codes.npy")[d]
                                              .astype(np.int64)))
        prefix += proc.document_ids(doc.caption, doc.codes)
    assert ids[: len(prefix)] == prefix
    assert not any(mask[: len(prefix)]) and all(mask[len(prefix):])

    ids, _ = src.build("i2t", i, rng, 0.0)
    assert ids[-1] == src.eos and ids[1] == src.boi
    ids, _ = src.build("infill", i, rng, 0.0)
    assert src.mask in ids and src.infill in ids and ids[-1] == src.eos


def test_edit_sequences_recolour_one_cell(runs, tmp_path):
    from PIL import Image

    from cm3rt.demo.shapes.cells import describe_code
    from cm3rt.engine.params import SamplingParams
    from cm3rt.engine.request import Request
    from cm3rt.engine.sequence import build_prompt
    from cm3rt.engine.state import VocabInfo
    from cm3rt.model import load_pretrained

    opts = _options(runs, tmp_path)
    src = train_decoder.SequenceSource(opts)
    module = decoder_model.TrainableChameleon(
        train_decoder.model_config(opts, train_decoder.padded_vocab(src.tok)))
    model, proc = load_pretrained(train_decoder.export(module, opts, src))
    vocab = VocabInfo.from_processor(proc, model.config.vocab_size)
    first_code = int(src.code_ids[0])
    checked = 0
    for i in range(len(src)):
        shapes = [o["shape"] for o in src.recs[i]["scene"]["objects"]]
        if len(set(shapes)) != len(shapes):
            continue
        ids, mask = src.build("edit", i, np.random.default_rng(i), p_uncond=0.0)
        cut = mask.index(1)
        instruction = proc.text.decode(ids[len(src.image(i)) + 1: cut])
        m = instruction.split(" ")
        assert m[:2] == ["make", "the"] and m[2] in shapes, instruction
        with Image.open(runs / "shapes" / src.recs[i]["image"]) as im:
            req = Request(prompt=[im.convert("RGB"), instruction], task="edit",
                          params=SamplingParams(guidance="cfg3"))
            spec = build_prompt(req, vocab, proc, max_len=4096).spec
        assert ids[:cut + 1] == spec.cond  # the engine's edit prompt (ends in boi), then codes
        assert all(mask[cut:]) and not any(mask[:cut])
        source, target = src.images[i].tolist(), ids[cut:][1:-1]
        (obj,) = [o for o in src.recs[i]["scene"]["objects"] if o["shape"] == m[2]]
        cell = obj["cell"][0] * 3 + obj["cell"][1]
        assert all(source[k] == target[k] for k in range(9) if k != cell)
        new = describe_code(target[cell] - first_code)
        assert new.startswith(f"{obj['size']} {m[3]} {m[2]} on "), (new, instruction)
        assert m[3] != obj["colour"]
        checked += 1
    assert checked >= 10
    masked, _ = src.build("edit", 0, np.random.default_rng(0), p_uncond=0.999999)
    assert masked[len(src.image(0)) + 1] == src.mask  # the image-conditional stream


def test_binding_steps_draw_captions_and_images_only(runs, tmp_path):
    src = train_decoder.SequenceSource(_options(runs, tmp_path))
    opts = _options(runs, tmp_path, binding_steps=30)
    early = {src.batch(np.random.default_rng(s), opts, s)[0] for s in range(30)}
    late = {src.batch(np.random.default_rng(s), opts, 30 + s)[0] for s in range(60)}
    assert early <= {"t2i", "i2t", "infill"} and len(early) >= 2
    assert late & {"ra", "novel", "edit"}
    with pytest.raises(ValueError, match="binding_mixture"):
        _options(runs, tmp_path, binding_mixture=(1.0,))
    with pytest.raises(ValueError, match="binding_steps"):
        _options(runs, tmp_path, binding_steps=-1)


def test_novel_episodes_need_their_documents(runs, tmp_path):
    from cm3rt.demo.shapes.vocab import HELD_OUT_PAIRS, NONCE_WORDS

    src = train_decoder.SequenceSource(_options(runs, tmp_path))
    nv = src.novel
    assert nv is not None and nv.targets
    held_names = [f"{c} {s}" for c, s in HELD_OUT_PAIRS]
    for seed in range(30):
        ids, mask = src.build("novel", 0, np.random.default_rng(seed), 0.0)
        assert ids[0] == src.bos and ids[-1] == src.eoi and len(ids) == len(mask)
        body_start = mask.index(1)
        assert not any(mask[:body_start]) and all(mask[body_start:])
        # one or more documents come first: each ends with an image
        context = ids[:body_start]
        assert context.count(src.boi) >= 1 and context.count(src.boi) == context.count(src.eoi)
        text = src.tok.decode([t for t in ids if t < src.images.min()])
        assert any(w in text for w in NONCE_WORDS)
        assert not any(name in text for name in held_names), text  # never by its name
        # the target's image is a novel scene showing its look; a document shows it too
        target = ids[body_start:]
        target_codes = target[target.index(src.boi) + 1: -1]
        rows = [j for j in range(len(nv.recs))
                if src.novel_images[j].tolist() == target_codes]
        assert rows
        look = nv.key(rows[0])[0]
        doc_images = []
        k = 0
        while src.boi in context[k:]:
            b = context.index(src.boi, k)
            e = context.index(src.eoi, b)
            doc_images.append(context[b + 1: e])
            k = e + 1
        assert any(any(nv.key(j)[0] == look and src.novel_images[j].tolist() == d
                       for j in nv.by_look[look]) for d in doc_images)
    assert train_decoder.rename_look("an orange star above two orange stars",
                                     ("orange", "star"), "dax") == "a dax above two daxs"


def test_alias_episodes_name_the_look_by_an_unshown_ordinary_pair(runs, tmp_path):
    """An alias episode renames its look to a train pair that no object of the episode is,
    in the documents and the target alike (the held-out situation: familiar words, a look
    only the documents show)."""
    from cm3rt.demo.shapes.captions import parse_caption
    from cm3rt.demo.shapes.vocab import HELD_OUT_PAIRS, NONCE_WORDS

    src = train_decoder.SequenceSource(_options(runs, tmp_path, novel_alias=1.0))
    nv = src.novel
    code_min = int(src.images.min())
    for seed in range(30):
        ids, mask = src.build("novel", 0, np.random.default_rng(seed), 0.0)
        body = mask.index(1)
        target = ids[body:]
        caption = src.tok.decode([t for t in target if t < code_min])
        assert not any(w in caption.split() for w in NONCE_WORDS), caption
        codes = target[target.index(src.boi) + 1: -1]
        j = next(j for j in range(len(nv.recs)) if src.novel_images[j].tolist() == codes)
        shown = {(o["colour"], o["shape"]) for o in nv.recs[j]["scene"]["objects"]}
        named = {(o.colour, o.shape) for o in parse_caption(caption).objects}
        look = nv.key(j)[0]
        alias = named - (shown - {look})
        assert len(alias) == 1, (caption, shown)
        assert not alias & shown and not alias & HELD_OUT_PAIRS
        # the documents call the look by the same alias, next to a distractor document
        assert ids[:body].count(src.boi) >= 2
        docs = src.tok.decode([t for t in ids[:body] if t < code_min])
        assert f"{next(iter(alias))[0]} {next(iter(alias))[1]}" in docs
    with pytest.raises(ValueError, match="novel_alias"):
        _options(runs, tmp_path, novel_alias=1.5)


def test_quick_run_exports_a_loadable_model(runs, tmp_path):
    from cm3rt.model import load_pretrained

    out = tmp_path / "dec"
    assert train_decoder.main(_args(runs, out, "--quick")) == 0
    model, proc = load_pretrained(out / "model")
    assert model.config.vocab_size % 64 == 0
    assert proc.image.num_tokens == np.load(runs / "codes" / "train_codes.npy").shape[1]
    assert (out / "log.jsonl").is_file()
    r = train_decoder.evaluate(out / "model", n=2, temperature=0.5, top_k=5)
    assert set(r) >= {"train_concepts", "held_out"}
    assert all(0.0 <= r[k] <= 1.0 for k in ("train_concepts", "held_out"))


def test_resume_is_bit_identical(runs, tmp_path):
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    train_decoder.train(_options(runs, a), quiet=True)
    train_decoder.train(_options(runs, b), quiet=True, max_steps=2)
    train_decoder.train(_options(runs, b), quiet=True)
    ta = load_file(str(a / "model" / "model.safetensors"))
    tb = load_file(str(b / "model" / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_bad_options_are_named(runs, tmp_path):
    with pytest.raises(ValueError, match="mixture"):
        _options(runs, tmp_path, mixture=(1.0, 0.0))
    with pytest.raises(ValueError, match="p_uncond"):
        _options(runs, tmp_path, p_uncond=1.5)
    bad = tmp_path / "retr.npy"
    np.save(bad, np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match="must cover"):
        train_decoder.SequenceSource(_options(runs, tmp_path, retrieval=bad))


def test_novel_captioning_episodes_take_the_name_from_a_document(runs, tmp_path):
    """A novel_i2t episode: documents, the target's image, then its canonical caption with
    the look renamed; the name is in a document that shows the look, never the held-out
    pair's own name, and the loss is on the caption alone."""
    from cm3rt.demo.shapes.vocab import HELD_OUT_PAIRS, NONCE_WORDS

    src = train_decoder.SequenceSource(_options(runs, tmp_path, novel_alias=0.5))
    nv = src.novel
    code_min = int(src.images.min())
    held_names = [f"{c} {s}" for c, s in HELD_OUT_PAIRS]
    for seed in range(30):
        ids, mask = src.build("novel_i2t", 0, np.random.default_rng(seed), 0.0)
        body = mask.index(1)
        assert not any(mask[:body]) and all(mask[body:]) and ids[-1] == src.eos
        prompt, caption_ids = ids[:body], ids[body:-1]
        assert prompt[-1] == src.eoi and not any(t >= code_min for t in caption_ids)
        # the image just before the caption is a novel scene; its look is renamed
        image = prompt[len(prompt) - 1 - src.images.shape[1]: -1]
        j = next(j for j in range(len(nv.recs)) if src.novel_images[j].tolist() == image)
        caption = src.tok.decode(caption_ids)
        assert caption != nv.recs[j]["canonical"]
        assert not any(name in caption for name in held_names), caption
        # the documents before that image show the same look under the name used
        docs = prompt[1: len(prompt) - 2 - src.images.shape[1]]
        doc_text = src.tok.decode([t for t in docs if t < code_min])
        look = nv.key(j)[0]
        name_words = set(caption.split()) - set(nv.recs[j]["canonical"].split())
        assert name_words and all(w.rstrip("s") in doc_text for w in name_words), (caption,
                                                                                   doc_text)
        assert any(w in caption for w in NONCE_WORDS) or name_words <= {
            w for c, s in train_decoder.TRAIN_PAIRS for w in (c, s)}
        shown = [k for k in nv.by_look[look] if src.novel_images[k].tolist() in
                 [docs[b + 1: b + 1 + src.images.shape[1]]
                  for b, t in enumerate(docs) if t == src.boi]]
        assert shown, "no document shows the target's look"


def test_near_miss_documents_share_a_word_but_no_pair(runs, tmp_path):
    src = train_decoder.SequenceSource(_options(runs, tmp_path, near_miss=1.0, i2t_docs=1.0))
    checked = 0
    for i in range(len(src)):
        near = src.near_miss_docs(i, np.random.default_rng(i), 2)
        want = src.pairs[i]
        colours, shapes = {c for c, _ in want}, {s for _, s in want}
        for j in near:
            assert j != i and not src.pairs[j] & want
            assert any(c in colours or s in shapes for c, s in src.pairs[j])
            checked += 1
    assert checked >= len(src)
    # ra episodes with near misses and i2t episodes with documents: docs are context only
    for kind in ("ra", "i2t"):
        with_docs = 0
        for seed in range(10):
            ids, mask = src.build(kind, seed, np.random.default_rng(seed), 0.0)
            body = mask.index(1)
            assert not any(mask[:body]) and all(mask[body:])
            images_in_context = ids[:body].count(src.boi) - (kind == "i2t")  # i2t: + its own
            with_docs += images_in_context >= 1
            if kind == "i2t":
                assert ids[-1] == src.eos and ids[body - 1] == src.eoi
        assert with_docs >= 9, kind
    with pytest.raises(ValueError, match="near_miss"):
        _options(runs, tmp_path, near_miss=2.0)


def test_held_out_alias_names_a_caption_by_held_out_words_never_its_own_look(runs, tmp_path):
    """held_out_alias: a novel_i2t alias episode names its target look by a held-out pair's
    words, a pair no object of the episode is, so the pair of words is copied from a
    document while the held-out concept (that name on that look) still never occurs."""
    from cm3rt.demo.shapes.captions import parse_caption
    from cm3rt.demo.shapes.vocab import HELD_OUT_PAIRS

    src = train_decoder.SequenceSource(_options(runs, tmp_path, novel_i2t_alias=1.0,
                                                held_out_alias=1.0))
    nv = src.novel
    code_min = int(src.images.min())
    named_held = 0
    for seed in range(30):
        ids, mask = src.build("novel_i2t", 0, np.random.default_rng(seed), 0.0)
        body = mask.index(1)
        prompt, caption = ids[:body], src.tok.decode(ids[body:-1])
        image = prompt[len(prompt) - 1 - src.images.shape[1]: -1]
        j = next(j for j in range(len(nv.recs)) if src.novel_images[j].tolist() == image)
        scene_pairs = {(o["colour"], o["shape"]) for o in nv.recs[j]["scene"]["objects"]}
        named = {(o.colour, o.shape) for o in parse_caption(caption).objects}
        alias = named - scene_pairs
        assert len(alias) == 1, (caption, scene_pairs)
        held = alias & HELD_OUT_PAIRS
        named_held += bool(held)
        docs = src.tok.decode([t for t in prompt if t < code_min])
        c, s = next(iter(alias))
        assert f"{c} {s}" in docs  # copied from a document
    assert named_held == 30
    with pytest.raises(ValueError, match="held_out_alias"):
        _options(runs, tmp_path, held_out_alias=2.0)


def test_init_starts_a_fine_tune_from_a_model_directory(runs, tmp_path):
    from safetensors.torch import load_file

    first = tmp_path / "first"
    train_decoder.train(_options(runs, first), quiet=True)
    start = load_file(str(first / "model" / "model.safetensors"))
    # with lr 0 (AdamW's decay scales with it too) the fine-tune's export is its init, bit
    # for bit: the weights were loaded, not drawn
    tuned = tmp_path / "tuned"
    train_decoder.train(_options(runs, tuned, init=first / "model", lr=0.0, binding_steps=0,
                                 warmup=1), quiet=True)
    got = load_file(str(tuned / "model" / "model.safetensors"))
    assert got.keys() == start.keys()
    for k in start:
        assert torch.equal(got[k], start[k]), k
    with pytest.raises(ValueError, match="does not fit this decoder"):
        train_decoder.train(_options(runs, tmp_path / "wide", init=first / "model",
                                     hidden=128), quiet=True)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        train_decoder.train(_options(runs, tmp_path / "none", init=tmp_path), quiet=True)
