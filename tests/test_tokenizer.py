"""Text tokenizer, image vocabulary map and the interleaving processor."""

from __future__ import annotations

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from model_fixtures import image_token_name, load_hf_model, make_tiny_model_dir

from cm3rt import ops
from cm3rt.model import load_pretrained
from cm3rt.tokenizer import ImageTokenizer, ImageVocabulary, Processor, TextTokenizer

needs_vq_ops = pytest.mark.skipif(
    not (hasattr(ops, "vq_nearest") and hasattr(ops, "vq_embed")),
    reason="cm3rt.ops.vq_nearest / vq_embed are not in this build yet")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def text(model_dir):
    return TextTokenizer.from_file(model_dir)


@pytest.fixture(scope="module")
def processor(model_dir, text):
    return Processor(text, ImageTokenizer.from_pretrained(model_dir))


def picture(seed: int, size=(24, 16)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ------------------------------------------------------------------------ text tokenizer
def test_special_tokens(model_dir, text):
    vocab = json.loads((model_dir / "config.json").read_text())["vocabulary_map"]
    assert (text.bos_id, text.pad_id, text.eos_id) == (0, 1, 2)
    assert text.boi_id == vocab["<racm3:break>"] and text.eoi_id == vocab["<eoss>"]
    assert text.mask_id == vocab["<mask>"] and text.infill_id == vocab["<infill>"]
    assert TextTokenizer.from_file(model_dir / "tokenizer.json").boi_id == text.boi_id
    plain = make_tiny_model_dir(model_dir.parent, name="no_infill", with_infill=False)
    t2 = TextTokenizer.from_file(plain)
    assert t2.mask_id is None and t2.infill_id is None


def test_image_vocabulary_matches_hf_mapping(model_dir, text):
    from transformers.models.chameleon.modeling_chameleon import (
        ChameleonImageVocabularyMapping,
    )

    vocab = json.loads((model_dir / "config.json").read_text())["vocabulary_map"]
    img2bpe = ChameleonImageVocabularyMapping(vocab).img2bpe
    ids = text.image_token_ids
    assert ids.dtype == torch.int64 and len(ids) == len(img2bpe) == 64
    assert ids.tolist() == [img2bpe[c] for c in range(64)]
    assert ids.tolist() == [text.token_to_id(image_token_name(c)) for c in range(64)]
    assert ids.tolist() != sorted(ids.tolist())  # the fixture shuffles them: a real map
    codes = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(text.id_to_code(text.code_to_id(codes)), codes)
    assert text.is_image_id(ids).all() and not text.is_image_id(torch.tensor([0, 2])).any()
    with pytest.raises(ValueError, match="not an image token"):
        text.id_to_code(torch.tensor([ids[0].item(), text.bos_id]))
    with pytest.raises(ValueError, match=r"codes.*\[0, 64\)"):
        text.code_to_id(torch.tensor([64]))


def test_image_vocabulary_rejects_gaps_and_duplicates():
    names = {image_token_name(c): 10 + c for c in (0, 1, 3)}
    with pytest.raises(ValueError, match="without gaps"):
        ImageVocabulary.from_vocab(names)
    with pytest.raises(ValueError, match="twice"):
        ImageVocabulary.from_vocab({"IMGIMGAZ": 5, "IMGIMGAAZ": 6})  # both spell code 0
    big = ImageVocabulary.from_vocab({image_token_name(c): c + 4 for c in range(8192)})
    assert big.num_codes == 8192 and big.code_to_id(torch.tensor([8191])).item() == 8195


def test_text_roundtrip_and_bad_ids(text):
    s = "a red circle next to two blue squares!"
    ids = text.encode(s)
    assert ids and all(isinstance(i, int) for i in ids) and text.bos_id not in ids
    assert text.decode(ids) == s
    assert text.decode([text.bos_id, *ids, text.eos_id]) == s  # specials skipped
    with pytest.raises(ValueError, match=r"ids outside \[0, "):
        text.decode([1, text.vocab_size])
    with pytest.raises(TypeError, match="text"):
        text.encode(b"bytes")


def test_tokenizer_config_overrides_and_errors(model_dir, tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    shutil.copy(model_dir / "tokenizer.json", d)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<mask>"},
                                                         "eos_token": "<eoss>"}))
    t = TextTokenizer.from_file(d)
    assert t.bos_id == t.mask_id and t.eos_id == t.eoi_id
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TextTokenizer.from_file(tmp_path / "missing")
    (d / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a valid HF tokenizers file"):
        TextTokenizer.from_file(d)
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["content"] != "<racm3:break>"]
    tj["model"]["vocab"].pop("<racm3:break>", None)
    (d / "tokenizer.json").write_text(json.dumps(tj))
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="boi token"):
        TextTokenizer.from_file(d)


# ------------------------------------------------------------------------ processor
def test_processor_text_only_and_split(processor, text):
    ids = processor.encode(["a red circle"])
    assert ids == [text.bos_id, *text.encode("a red circle")]
    assert processor.encode("a red circle", add_bos=False) == text.encode("a red circle")
    n = processor.num_image_tokens
    img = text.code_to_id(torch.arange(n) % 64).tolist()
    stream = [text.bos_id, *text.encode("look: "), text.boi_id, *img, text.eoi_id,
              *text.encode("nice"), text.boi_id, *img]  # last eoi missing: still an image
    parts = processor.split(stream)
    assert parts[0] == "look: " and parts[2] == "nice"
    assert torch.equal(parts[1], torch.arange(n) % 64) and torch.equal(parts[3], parts[1])
    with pytest.raises(ValueError, match=r"position 1 has 5 image tokens, expected 16"):
        processor.split([text.bos_id, text.boi_id, *img[:5], text.eoi_id])
    with pytest.raises(ValueError, match="outside an image span"):
        processor.split([text.bos_id, img[0]])
    with pytest.raises(ValueError, match="ids outside"):
        processor.split([text.bos_id, 10**6])
    with pytest.raises(TypeError, match=r"items\[1\]"):
        processor.encode(["a", 3])


def test_processor_rejects_mismatched_codebook(model_dir, text, tmp_path):
    other = make_tiny_model_dir(tmp_path, name="k128", vq={"num_embeddings": 128})
    with pytest.raises(ValueError, match="128"):
        Processor(text, ImageTokenizer.from_pretrained(other))
    with pytest.raises(TypeError, match="image_tokenizer"):
        Processor(text, "vqgan")


@needs_vq_ops
def test_processor_images_match_hf_image_tokens(model_dir, processor, text):
    """Image ids = HF's get_image_tokens (its VQVAE + its vocabulary mapping) on the same
    pixels; decoding gives back the text and the VQGAN's pictures of those codes."""
    images = [picture(1), picture(2, size=(16, 40))]
    ids = processor.encode(["a cat", images[0], "and a dog", images[1]])
    hf = load_hf_model(model_dir)
    with torch.no_grad():
        ref = hf.get_image_tokens(processor.image.preprocess(images))
    n = processor.num_image_tokens
    first = ids.index(text.boi_id)
    assert ids[first + 1 + n] == text.eoi_id
    assert ids[first + 1:first + 1 + n] == ref[0].tolist()
    second = ids.index(text.boi_id, first + 1)
    assert ids[second + 1:second + 1 + n] == ref[1].tolist()
    parts = processor.decode(ids)
    assert parts[0] == "a cat" and parts[2] == "and a dog"
    assert isinstance(parts[1], PIL.Image.Image) and parts[1].size == (16, 16)
    codes = processor.image.encode(images)
    expect = processor.image.decode(codes)
    assert np.array_equal(np.asarray(parts[3]), np.asarray(expect[1]))


def test_load_pretrained(model_dir):
    model, proc = load_pretrained(model_dir)
    assert proc.text.vocab_size <= model.config.vocab_size
    assert proc.text.image_token_ids.tolist() == list(model.config.image_token_ids)
    assert proc.image.has_decoder and proc.image.num_tokens == 16
