"""ClipImageTower (open_clip-free image tower) against open_clip itself: the embedded CLIP and
random ModifiedResNet CLIPs of another size, on images of odd sizes and modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("open_clip")

from test_text_tower import VIT_VISION, make_clip

from cm3rt.retrieval import image_tower as it
from cm3rt.retrieval.clip import EMBEDDED_CLIP_DIR, ClipEncoder

REPO = Path(__file__).resolve().parents[1]
# Another ModifiedResNet than the embedded one (48 px, [1, 1, 1, 1], width 16): two blocks
# in the first and last stages (the non-first block path), 2x2 final grid, 8 pool heads.
RESNET64 = {"image_size": 64, "layers": [2, 1, 1, 2], "width": 8, "head_width": 32}
# preprocess_cfg variants of the random model (open_clip merges them over its defaults)
PREPROCESS = {
    "half": {"mean": [0.5] * 3, "std": [0.5] * 3},  # shortest side + bicubic, like embedded
    "openai": {},  # open_clip's defaults: OpenAI mean / std
    "squash": {"interpolation": "bilinear", "resize_mode": "squash",
               "mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3]},
}
SIZES = [(37, 53), (53, 37), (200, 48), (48, 200), (61, 40), (40, 61), (48, 48), (64, 64),
         (97, 97), (1, 300), (300, 1), (3, 2)]


def odd_images(seed: int = 0) -> list[Image.Image]:
    """Images of odd sizes (random colour blocks plus noise, so that they differ in more
    than noise), then other modes: the resize runs in the image's own mode (RGBA
    premultiplies a random alpha, P and 1 resize by nearest) before the RGB step."""
    rng = np.random.default_rng(seed)
    rgb = []
    for w, h in SIZES:
        blocks = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8))
        base = np.asarray(blocks.resize((w, h), Image.Resampling.NEAREST), dtype=np.int16)
        noise = rng.integers(-40, 41, (h, w, 3))
        rgb.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    alpha = Image.fromarray(rng.integers(0, 256, (53, 37), dtype=np.uint8))
    rgba = rgb[0].copy()
    rgba.putalpha(alpha)
    return rgb + [rgba, rgb[1].convert("L"), rgb[2].convert("LA"), rgb[4].convert("P"),
                  rgb[5].convert("1"), rgb[3].convert("CMYK")]


def make_resnet_clip(folder: Path, vision: dict | None = None,
                     preprocess: dict | None = None, seed: int = 1) -> Path:
    """A random CLIP in open_clip's local-dir layout with realistic BatchNorm state.

    open_clip initialises every bn3 weight to zero (hiding conv3) and the running stats to
    0 / 1 (hiding them, and letting the signal fade so that every image embeds alike). So
    the stats are measured on images (train-mode passes), then every BatchNorm gets a
    random scale and a shifted mean: a wrong use of any of them changes the output.
    """
    import open_clip
    from safetensors.torch import load_file, save_file

    make_clip(folder, vision=vision or RESNET64, seed=seed)
    config = json.loads((folder / "open_clip_config.json").read_text())
    weights = folder / "open_clip_model.safetensors"
    model = open_clip.CLIP(**config["model_cfg"])
    model.load_state_dict(load_file(str(weights)))
    bns = [m for m in model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    size = model.visual.image_size
    with torch.no_grad():
        model.visual.train()
        for i in range(3):
            ims = [im.convert("RGB").resize((size, size)) for im in odd_images(seed=10 + i)]
            x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1)
                             for im in ims]).permute(0, 3, 1, 2)
            model.visual(x)
        g = torch.Generator().manual_seed(seed)
        for m in bns:
            m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
            m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn(m.weight.shape,
                                                                          generator=g))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    config["preprocess_cfg"] = PREPROCESS["half"] if preprocess is None else preprocess
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=["embedded", *sorted(PREPROCESS)])
def encoders(request, tmp_path_factory):
    """(open_clip's ClipEncoder, for_queries encoder) of one model."""
    if request.param == "embedded":
        arch = "embedded"
    else:
        folder = make_resnet_clip(tmp_path_factory.mktemp(request.param) / "clip",
                                  preprocess=PREPROCESS[request.param])
        arch = f"local-dir:{folder}"
    return ClipEncoder(arch), ClipEncoder.for_queries(arch, batch_size=5)


def test_preprocess_matches_open_clip(encoders):
    ref, fast = encoders
    assert fast._image_tower is not None, fast.image_tower_refusal
    size = fast._image_tower.cfg.image_size
    for im in odd_images():
        got, want = fast._image_tower.preprocess(im), ref.preprocess(im)
        assert got.dtype == want.dtype == torch.float32
        assert got.shape == want.shape == (3, size, size), (im.size, im.mode)
        assert torch.equal(got, want), (im.size, im.mode, (got - want).abs().max().item())
    assert fast._open_clip is None


def test_tower_matches_open_clip(encoders):
    ref, fast = encoders
    tower = fast._image_tower
    assert tower is not None and fast.image_tower_refusal is None, fast.image_tower_refusal
    images = odd_images(seed=1)
    # unnormalised features of the same pixels: the forward pass alone
    pixels = torch.stack([ref.preprocess(im) for im in images])
    with torch.no_grad():
        want = ref.model.encode_image(pixels)
    torch.testing.assert_close(tower.forward_pixels(pixels), want, atol=1e-5, rtol=1e-5)
    # the whole path, several batches of 5
    got, want = fast.encode_image(images), ref.encode_image(images)
    assert got.shape == want.shape == (len(images), ref.embed_dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(images)), atol=1e-5)
    # different images give different embeddings (the comparison can tell them apart)
    assert (got[0] - got[1]).abs().max().item() > 1e-3
    torch.testing.assert_close(fast.encode_query("a red circle", images[:3]),
                               ref.encode_query("a red circle", images[:3]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(fast.score_texts(images[0], ["a red circle", "small shapes"]),
                               ref.score_texts(images[0], ["a red circle", "small shapes"]),
                               atol=1e-5, rtol=0)
    assert fast.encode_image([]).shape == (0, ref.embed_dim)
    # the identity a bank records is open_clip's, and open_clip was never needed
    assert fast.identity == ref.identity
    assert fast._open_clip is None


def test_unsupported_configs_are_refused():
    base = {"embed_dim": 16, "vision_cfg": dict(RESNET64), "text_cfg": {}}
    cfg = it.tower_config(base)  # supported
    assert (cfg.heads, cfg.grid, cfg.feature_dim) == (8, 2, 256)
    bad = {
        "ViT": {"vision_cfg": {"image_size": 32, "layers": 2, "width": 16}},
        "timm": {"vision_cfg": {**RESNET64, "timm_model_name": "resnet50"}},
        "CoCa": {"multimodal_cfg": {}},
        "cast_dtype": {"cast_dtype": "fp16"},
        "vision_cfg: keys": {"vision_cfg": {**RESNET64, "stem_width": 3}},
        "4 stages": {"vision_cfg": {**RESNET64, "layers": [1, 1, 1]}},
        "int >= 1": {"vision_cfg": {**RESNET64, "layers": [1, 0, 1, 1]}},
        "feature map": {"vision_cfg": {**RESNET64, "image_size": 63}},
        "heads": {"vision_cfg": {**RESNET64, "head_width": 48}},
    }
    for words, change in bad.items():
        with pytest.raises(it.UnsupportedTower, match=words):
            it.tower_config({**base, **change})
    good = it.preprocess_cfg_of({"model_cfg": base, "preprocess_cfg": {}})
    assert it.preprocess_config(good).resample == Image.Resampling.BICUBIC
    bad_pre = {"longest": {"resize_mode": "longest"}, "nearest": {"interpolation": "nearest"},
               "mode": {"mode": "L"}, "mean": {"mean": [0.5, 0.5]}, "zero": {"std": [1, 0, 1]},
               "square": {"size": (64, 48)}}
    for words, change in bad_pre.items():
        with pytest.raises(it.UnsupportedTower, match=words):
            it.preprocess_config({**good, **change})


@pytest.mark.parametrize("case", ["longest", "vit", "bin"])
def test_unsupported_tower_falls_back_to_open_clip(case, tmp_path):
    folder = tmp_path / "clip"
    if case == "longest":
        make_resnet_clip(folder, preprocess={"resize_mode": "longest"})
        words = "longest"
    elif case == "vit":
        make_clip(folder, vision=VIT_VISION)
        words = "ViT"
    else:  # weights open_clip would read with torch.load
        make_resnet_clip(folder)
        from safetensors.torch import load_file

        st = folder / "open_clip_model.safetensors"
        torch.save(load_file(str(st)), folder / "open_clip_pytorch_model.bin")
        st.unlink()
        words = ".safetensors"
    reason = it.unsupported_reason(folder)
    assert reason is not None and words in reason
    enc = ClipEncoder.for_queries(f"local-dir:{folder}")
    assert enc._image_tower is None and words in enc.image_tower_refusal
    ref = ClipEncoder(f"local-dir:{folder}")
    assert enc.identity == ref.identity
    images = odd_images()[:4]
    assert torch.equal(enc.encode_image(images), ref.encode_image(images))
    assert enc._open_clip is not None  # loaded for the images


def test_image_query_through_default_assets_imports_no_open_clip(tmp_path):
    images = odd_images(seed=2)[:3] + odd_images(seed=2)[-6:-4]
    for i, im in enumerate(images):
        im.save(tmp_path / f"im{i}.png")
    out_file = tmp_path / "out.pt"
    script = textwrap.dedent(f"""
        import sys
        import torch
        from PIL import Image
        from cm3rt.api.defaults import load_defaults, open_default_bank
        from cm3rt.retrieval.clip import ClipEncoder

        images = [Image.open({str(tmp_path)!r} + f"/im{{i}}.png") for i in range({len(images)})]
        enc = ClipEncoder.for_queries("embedded")
        emb = enc.encode_image(images)
        # what captioning runs: search by image, doc sweep scores captions with the bank CLIP
        assets = load_defaults()
        if assets.bank is not None:
            bank = open_default_bank(assets)
            bank.search(image=images[0], k=2, max_score=None)
            bank.score_captions(images[0], ["a red circle", "a blue square"])
        torch.save({{"emb": emb, "digest": enc.identity.digest}}, {str(out_file)!r})
        heavy = [m for m in ("open_clip", "torchvision", "transformers") if m in sys.modules]
        print("HEAVY", heavy, "BANK", assets.bank is not None)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=False,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "HEAVY [] BANK True" in out.stdout, out.stdout
    got = torch.load(out_file)
    ref = ClipEncoder("embedded")
    assert got["digest"] == ref.identity.digest
    reloaded = [Image.open(tmp_path / f"im{i}.png") for i in range(len(images))]
    torch.testing.assert_close(got["emb"], ref.encode_image(reloaded), atol=1e-5, rtol=0)


def test_embedded_folder_is_supported():
    # the shipped model is the case this module exists for: a refusal must not go unnoticed
    assert it.unsupported_reason(EMBEDDED_CLIP_DIR) is None
