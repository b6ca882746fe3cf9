"""Engine with the real tokenizers (tiny random model directory): the sequence format of
each task, decoded outputs, best-of-n ranking, retrieval prefixes, ``cm3rt.generate`` and
the ``generate`` / ``caption`` CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import make_tiny_model_dir
from PIL import Image

from cm3rt.engine import Engine, Request, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("engine_tasks"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    from cm3rt.model import load_pretrained

    return load_pretrained(model_dir)


def engine(loaded, **kw):
    model, proc = loaded
    kw.setdefault("num_blocks", 256)
    kw.setdefault("block_size", 4)
    return Engine(model, proc, **kw)


def picture(seed: int, size: int = 16) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def streams_of(eng: Engine, req: Request) -> dict[str, list[int]]:
    """The prompts the engine built for each stream role (then the request is dropped)."""
    rid = eng.add_request(req)
    state = eng._requests[rid]
    out = {s.role: list(s.tokens) for s in state.groups[0].streams}
    eng.abort(rid)
    return out


def test_text_to_image_streams_and_decoded_images(loaded):
    _model, proc = loaded
    t = proc.text
    eng = engine(loaded)
    req = Request("a red circle", params=SamplingParams(guidance="cfg", n=2, seed=3))
    s = streams_of(eng, req)
    assert s["cond"] == [t.bos_id, *t.encode("a red circle"), t.boi_id]
    assert s["uncond"] == [t.bos_id, t.mask_id, t.boi_id]  # the tiny vocab has <mask>
    (out,) = eng.generate([req])
    assert out.ok and len(out.samples) == 2 and len(out.images) == 2
    n = proc.num_image_tokens
    for smp in out.samples:
        assert len(smp.token_ids) == n + 1 and smp.token_ids[-1] == t.eoi_id
        assert bool(t.is_image_id(torch.tensor(smp.token_ids[:n])).all())
        assert smp.images[0].size == (proc.image.image_size,) * 2
        # The engine's image equals the processor decoding the same span.
        ref = proc.decode([t.boi_id, *smp.token_ids])[0]
        assert np.array_equal(np.asarray(ref), np.asarray(smp.images[0]))
    assert out.image is out.images[0]


def test_caption_is_text_only_and_single_stream(loaded):
    _, proc = loaded
    t = proc.text
    eng = engine(loaded)
    img = picture(1)
    req = Request([img, "Describe the image."], task="image_to_text",
                  params=SamplingParams(guidance="cfg", max_new_tokens=12, seed=5))
    s = streams_of(eng, req)
    assert list(s) == ["cond"], "guidance only applies inside generated image spans"
    assert s["cond"] == proc.encode([img, "Describe the image."])
    (out,) = eng.generate([req])
    ids = out.samples[0].token_ids
    assert not bool(t.is_image_id(torch.tensor(ids)).any())
    assert t.boi_id not in ids and t.eoi_id not in ids
    assert isinstance(out.text, str) and out.images == []
    assert out.text == t.decode([i for i in ids if i != t.eos_id])


def test_edit_uses_three_streams(loaded):
    _, proc = loaded
    t = proc.text
    eng = engine(loaded)
    img = picture(2)
    span = proc.image_ids(proc.image.encode([img])[0])
    req = Request([img, "make it blue"], task="edit",
                  params=SamplingParams(guidance="cfg3", cfg_scale=2.0, cfg_image_scale=1.2))
    s = streams_of(eng, req)
    assert list(s) == ["cond", "image_cond", "uncond"]
    assert s["cond"] == [t.bos_id, *span, *t.encode("make it blue"), t.boi_id]
    assert s["image_cond"] == [t.bos_id, *span, t.mask_id, t.boi_id]
    assert s["uncond"] == [t.bos_id, t.mask_id, t.boi_id]
    (out,) = eng.generate([req])
    assert out.ok and len(out.images) == 1


def test_infill_prompt_layout(loaded):
    _, proc = loaded
    t = proc.text
    eng = engine(loaded)
    req = Request("a red", task="infill", suffix=" on a white background",
                  params=SamplingParams(max_new_tokens=6))
    s = streams_of(eng, req)
    assert s["cond"] == [t.bos_id, *t.encode("a red"), t.mask_id,
                         *t.encode(" on a white background"), t.infill_id]
    (out,) = eng.generate([req])
    assert out.ok and 1 <= len(out.samples[0].token_ids) <= 6


def test_interleaved_output_keeps_image_spans_whole(loaded):
    _, proc = loaded
    t = proc.text
    n = proc.num_image_tokens
    eng = engine(loaded)
    reqs = [Request(["two yellow stars", picture(3)], task="interleaved",
                    params=SamplingParams(guidance="cfg", seed=s, max_new_tokens=60))
            for s in range(6)]
    outs = eng.generate(reqs)
    for out in outs:
        ids = out.samples[0].token_ids
        is_img = t.is_image_id(torch.tensor(ids)).tolist()
        i = 0
        while i < len(ids):
            if ids[i] == t.boi_id:
                span = is_img[i + 1:i + 1 + n]
                assert all(span), "a span holds only image codes"
                if i + 1 + n < len(ids):
                    assert ids[i + 1 + n] == t.eoi_id
                i += n + 2
            else:
                assert not is_img[i], "image codes appear only inside spans"
                i += 1
        images = [seg for seg in out.samples[0].segments if not isinstance(seg, str)]
        complete = sum(1 for j, x in enumerate(ids) if x == t.boi_id and j + n < len(ids))
        assert len(images) == complete


def test_prefix_cache_reuses_one_image_prompt_and_not_another(loaded):
    eng = engine(loaded)
    a, b = picture(10), picture(11)

    def cap(img):
        return Request([img, "what is it"], task="image_to_text",
                       params=SamplingParams(max_new_tokens=2))

    eng.generate([cap(a)])
    hits0 = eng.stats.prefix_hit_blocks
    eng.generate([cap(b)])
    # b's first block already holds b's codes: nothing of a's prompt may serve it.
    hits_b = eng.stats.prefix_hit_blocks - hits0
    eng.generate([cap(a)])
    hits_a = eng.stats.prefix_hit_blocks - hits0 - hits_b
    assert hits_a >= 4 and hits_b == 0


def test_best_of_n_ranks_samples_by_the_scorer(loaded):
    calls = []

    def brightness(text, images):
        calls.append((text, len(images)))
        return [float(np.asarray(im).mean()) for im in images]

    eng = engine(loaded, scorer=brightness)
    (out,) = eng.generate([Request("a blue square", params=SamplingParams(n=4, seed=9))])
    assert calls == [("a blue square", 4)]
    scores = [s.score for s in out.samples]
    assert scores == sorted(scores, reverse=True)
    assert out.image is out.samples[0].images[0]
    assert sorted(s.index for s in out.samples) == [0, 1, 2, 3]


def test_retrieved_documents_go_to_the_conditional_streams_only(loaded, monkeypatch):
    from cm3rt.retrieval import augment

    _, proc = loaded
    t = proc.text
    doc_ids = [*t.encode("a red circle"), t.boi_id, *proc.image_ids(
        proc.image.encode([picture(20)])[0]), t.eoi_id]
    seen = {}

    def fake_retrieve(bank, text, images, k, max_tokens, processor, *, max_score):
        seen.update(text=text, k=k, max_tokens=max_tokens, max_score=max_score)
        return list(doc_ids), ["doc"]

    monkeypatch.setattr(augment, "retrieve_prefix", fake_retrieve)
    eng = engine(loaded)
    req = Request("a red circle", bank=object(), k_docs=2,
                  params=SamplingParams(guidance="cfg"))
    s = streams_of(eng, req)
    assert s["cond"] == [t.bos_id, *doc_ids, *t.encode("a red circle"), t.boi_id]
    assert s["uncond"] == [t.bos_id, t.mask_id, t.boi_id]
    assert seen["text"] == "a red circle" and seen["k"] == 2
    assert seen["max_score"] == 0.9  # the request's max_doc_score (RA-CM3's rule)
    assert 0 < seen["max_tokens"] < eng.max_model_len
    (out,) = eng.generate([req])
    assert out.ok and out.docs == ["doc"]


def test_bad_inputs_with_tokenizers(loaded):
    eng = engine(loaded)
    bad = [
        (Request(["a cat", np.zeros((4, 4, 3))]), TypeError, "prompt[1]"),
        (Request("   "), ValueError, "empty"),
        (Request("a cat", task="image_to_text"), ValueError, "needs an image"),
        (Request("a cat", task="paint"), ValueError, "task"),
        (Request("a cat", params=SamplingParams(guidance="cfg3")), ValueError, "cfg3"),
        (Request("a cat", suffix="x"), ValueError, "suffix"),
        (Request("word " * 600), ValueError, "too long"),
    ]
    outs = eng.generate([r for r, _, _ in bad] + [Request("a red circle")])
    for (_, kind, text), out in zip(bad, outs):
        assert isinstance(out.error, kind), out.error
        assert text in str(out.error)
    assert outs[-1].ok and len(outs[-1].images) == 1
    assert eng.pool.num_free == eng.pool.num_blocks


def test_generate_function(model_dir, monkeypatch, tmp_path):
    from cm3rt.api import generate

    out = generate("a red circle", model=model_dir, guidance="cfg", seed=4, n=2)
    assert len(out.images) == 2 and out.images[0].size == (16, 16)
    again = generate("a red circle", model=model_dir, guidance="cfg", seed=4, n=2)
    assert [s.token_ids for s in again.samples] == [s.token_ids for s in out.samples]
    cap = generate("Describe the image.", model=model_dir, images=[picture(5)],
                   max_new_tokens=5)
    assert isinstance(cap.text, str) and cap.images == []
    with pytest.raises(TypeError, match="unknown sampling argument"):
        generate("a red circle", model=model_dir, guidence="cfg")
    from cm3rt.api import defaults as defaults_mod

    monkeypatch.setattr(defaults_mod, "DEFAULT_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="embedded default model"):
        generate("a red circle")


def test_cli_generate_and_caption(model_dir, tmp_path, capsys):
    from cm3rt.cli import main

    out_png = tmp_path / "out.png"
    rc = main(["generate", "a red circle", "--model", str(model_dir), "-o", str(out_png),
               "--seed", "2", "--no-progress", "--device", "cpu"])
    assert rc == 0 and out_png.is_file()
    with Image.open(out_png) as im:
        assert im.size == (16, 16)
    img_path = tmp_path / "in.png"
    picture(7).save(img_path)
    capsys.readouterr()
    rc = main(["caption", str(img_path), "--model", str(model_dir), "--max-new-tokens", "6",
               "--no-progress"])
    assert rc == 0  # (a random model may caption with an empty string)
    capsys.readouterr()
    rc = main(["generate", "x", "--model", str(tmp_path / "missing"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "no such directory" in err and "Traceback" not in err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rc = main(["caption", str(tmp_path / "bad.png"), "--model", str(model_dir)])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot read" in err
    rc = main(["generate", "x", "--model", str(model_dir), "-o", str(tmp_path / "o.txt")])
    assert rc == 1 and "-o/--out" in capsys.readouterr().err
