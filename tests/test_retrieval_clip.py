"""ClipEncoder against open_clip used directly (float64 normalisation), and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from retrieval_fixtures import make_tiny_clip, random_image

from cm3rt.retrieval.clip import ClipEncoder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"), seed=3)


@pytest.fixture(scope="module")
def reference(files):
    """The same weights loaded by hand into open_clip's CLIP (no cm3rt code)."""
    import json

    import open_clip
    from safetensors.torch import load_file

    cfg, weights = files
    model = open_clip.CLIP(**json.loads(cfg.read_text())).eval()
    model.load_state_dict(load_file(str(weights)))
    tokenizer = open_clip.SimpleTokenizer(context_length=24)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD

    def text(xs):
        with torch.no_grad():
            f = model.encode_text(tokenizer(xs)).double()
        return (f / f.norm(dim=1, keepdim=True)).numpy()

    def image(ims):
        # open_clip's eval preprocessing written out: shortest side to 32 (bicubic),
        # centre crop, [0, 1], normalise with the OpenAI mean/std.
        xs = []
        for im in ims:
            im = im.convert("RGB")
            w, h = im.size
            # the long side truncated, as torchvision's Resize(int) computes it
            size = (32, int(32 * h / w)) if w <= h else (int(32 * w / h), 32)
            im = im.resize(size, 3)
            w, h = im.size
            left, top = round((w - 32) / 2.0), round((h - 32) / 2.0)
            a = np.asarray(im.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255
            xs.append(torch.from_numpy((a - np.array(mean)) / np.array(std)).permute(2, 0, 1))
        with torch.no_grad():
            f = model.encode_image(torch.stack(xs).float()).double()
        return (f / f.norm(dim=1, keepdim=True)).numpy()

    return text, image


def test_matches_open_clip(files, reference) -> None:
    cfg, weights = files
    enc = ClipEncoder(str(cfg), weights=weights, batch_size=3)  # several batches
    ref_text, ref_image = reference
    texts = ["a red circle", "", "two blue squares on a green field", "x" * 300, "a", "b c"]
    got = enc.encode_text(texts)
    assert got.dtype == torch.float32 and got.shape == (6, 32)
    np.testing.assert_allclose(got.numpy(), ref_text(texts), atol=2e-5)

    rng = np.random.default_rng(0)
    ims = [random_image(rng, size) for size in [(32, 32), (50, 40), (33, 77), (64, 64)]]
    ims.append(ims[0].convert("L"))
    got = enc.encode_image(ims)
    np.testing.assert_allclose(got.numpy(), ref_image(ims), atol=2e-5)
    np.testing.assert_allclose(got.norm(dim=1).numpy(), 1.0, atol=1e-6)

    # Scores are cosines; queries and documents average normalised parts.
    t = ref_text(["a red circle"])[0]
    np.testing.assert_allclose(enc.score("a red circle", ims[:3]), ref_image(ims[:3]) @ t,
                               atol=2e-5)
    want = t + ref_image(ims[:1])[0]
    np.testing.assert_allclose(enc.encode_query("a red circle", ims[:1]).numpy(),
                               want / np.linalg.norm(want), atol=2e-5)
    imgs = ref_image(ims[:2]).mean(0)
    want = t + imgs / np.linalg.norm(imgs)
    np.testing.assert_allclose(enc.encode_query("a red circle", ims[:2]).numpy(),
                               want / np.linalg.norm(want), atol=2e-5)
    docs = enc.encode_documents(["a red circle", None, "b c"], [None, ims[1], ims[2]])
    bc = ref_text(["b c"])[0] + ref_image(ims[2:3])[0]
    np.testing.assert_allclose(docs.numpy(), np.stack([t, ref_image(ims[1:2])[0],
                                                       bc / np.linalg.norm(bc)]), atol=2e-5)
    assert enc.encode_text([]).shape == (0, 32)

    # The identity follows the weights, not the file name.
    same = ClipEncoder(str(cfg), weights=weights)
    assert same.identity.digest == enc.identity.digest
    other_cfg, other_w = make_tiny_clip(cfg.parent / "other", seed=4)
    assert ClipEncoder(str(other_cfg), weights=other_w).identity.digest != enc.identity.digest


def test_errors(files, tmp_path) -> None:
    cfg, weights = files
    with pytest.raises(ValueError, match="weights: expected a local checkpoint"):
        ClipEncoder(str(cfg))
    with pytest.raises(FileNotFoundError, match="weights"):
        ClipEncoder(str(cfg), weights=tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="weights"):
        ClipEncoder("ViT-B-32", weights="openai")  # a hub tag is never downloaded
    with pytest.raises(ValueError, match="arch"):
        ClipEncoder("no-such-arch", weights=weights)
    with pytest.raises(FileNotFoundError, match="arch"):
        ClipEncoder(str(tmp_path / "missing.json"), weights=weights)
    with pytest.raises(ValueError, match="precision"):
        ClipEncoder(str(cfg), weights=weights, precision="int8")
    enc = ClipEncoder(str(cfg), weights=weights)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        enc.encode_text(["ok", 3])
    with pytest.raises(TypeError, match="texts"):
        enc.encode_text("not a list")
    with pytest.raises(TypeError, match=r"images\[0\]"):
        enc.encode_image([np.zeros((4, 4, 3))])
    with pytest.raises(ValueError, match="neither"):
        enc.encode_query(None, [])
