"""The VQGAN image tokenizer against HF's ChameleonVQVAE (encoder, codes) and
taming-transformers' Decoder, on the same random weights; Chameleon's preprocessing."""

from __future__ import annotations

import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from model_fixtures import load_hf_model, make_tiny_model_dir
from safetensors.torch import load_file, save_file

from cm3rt import ops
from cm3rt.tokenizer import ImageTokenizer, VQGANConfig
from cm3rt.tokenizer.image_io import image_to_tensor

needs_vq_ops = pytest.mark.skipif(
    not (hasattr(ops, "vq_nearest") and hasattr(ops, "vq_embed")),
    reason="cm3rt.ops.vq_nearest / vq_embed are not in this build yet")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vq")
    return {
        "plain": make_tiny_model_dir(root, name="plain"),
        # attention inside the down/up levels at 8 px, and no middle attention
        "attn": make_tiny_model_dir(root, name="attn", seed=3,
                                    vq={"attn_resolutions": [8]}),
        "noattn": make_tiny_model_dir(root, name="noattn", seed=4,
                                      vq={"attn_resolutions": [8], "attn_type": "none"}),
    }


def random_images(n: int, seed: int) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(16, 16), (48, 32), (20, 61), (33, 17)]  # square, landscape, portrait, odd
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        # smooth-ish content (random blobs upsampled) rather than pure noise
        small = rng.integers(0, 256, (max(2, h // 4), max(2, w // 4), 3), dtype=np.uint8)
        out.append(PIL.Image.fromarray(small).resize((w, h), PIL.Image.BILINEAR))
    return out


# ------------------------------------------------------------------------ encoder
@pytest.mark.parametrize("variant", ["plain", "attn", "noattn"])
def test_encoder_latents_match_hf(dirs, variant):
    """Encoder + quant_conv equal HF's on the same pixels (float latents, no quantiser)."""
    tok = ImageTokenizer.from_pretrained(dirs[variant])
    hf = load_hf_model(dirs[variant]).model.vqmodel
    x = tok.preprocess(random_images(4, seed=1))
    with torch.no_grad():
        ref = hf.quant_conv(hf.encoder(x))
        got = tok.quant_conv(tok.encoder(x))
    assert got.shape == ref.shape == (4, tok.config.embed_dim, 4, 4)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_vq_ops
@pytest.mark.parametrize("variant", ["plain", "attn"])
def test_codes_match_hf_vqvae_encode(dirs, variant):
    tok = ImageTokenizer.from_pretrained(dirs[variant])
    hf = load_hf_model(dirs[variant]).model.vqmodel
    images = random_images(6, seed=2)
    codes = tok.encode(images)
    assert codes.dtype == torch.int64 and codes.shape == (6, tok.num_tokens)
    with torch.no_grad():
        x = tok.preprocess(images)
        ref = hf.encode(x).image_tokens.view(6, -1)
        z = hf.quant_conv(hf.encoder(x)).permute(0, 2, 3, 1).reshape(-1, tok.config.embed_dim)
    # Where the two nearest codes are (numerically) tied, either answer is right.
    d = torch.cdist(z.double(), hf.quantize.embedding.weight.double()) ** 2
    top2 = d.topk(2, largest=False).values
    decisive = (top2[:, 1] - top2[:, 0] > 1e-4 * top2[:, 1]).view(6, -1)
    assert decisive.float().mean() > 0.9
    assert torch.equal(codes[decisive], ref[decisive])
    # and HF's mapping of these codes to BPE ids is the one our text tokenizer uses
    assert len(codes.unique()) > 4  # the random encoder really spreads over the codebook


# ------------------------------------------------------------------------ decoder
def taming_decoder(tok: ImageTokenizer, path):
    """taming-transformers' Decoder + post_quant_conv loaded with the directory's weights."""
    from taming.modules.diffusionmodules.model import Decoder

    c = tok.config
    dec = Decoder(ch=c.base_channels, out_ch=c.out_channels, ch_mult=c.channel_multiplier,
                  num_res_blocks=c.num_res_blocks, attn_resolutions=c.attn_resolutions,
                  dropout=0.0, resamp_with_conv=True, in_channels=c.in_channels,
                  resolution=c.resolution, z_channels=c.latent_channels)
    sd = load_file(path / "vqgan.safetensors")
    dec.load_state_dict({k[len("decoder."):]: v for k, v in sd.items()
                         if k.startswith("decoder.")}, strict=True)
    post = torch.nn.Conv2d(c.embed_dim, c.latent_channels, 1)
    post.load_state_dict({k.split(".")[-1]: v for k, v in sd.items()
                          if k.startswith("post_quant_conv.")}, strict=True)
    return dec.eval(), post.eval()


@pytest.mark.parametrize("variant", ["plain", "attn"])
def test_decoder_matches_taming(dirs, variant):
    pytest.importorskip("taming.modules.diffusionmodules.model")
    tok = ImageTokenizer.from_pretrained(dirs[variant])
    dec, post = taming_decoder(tok, dirs[variant])
    z = torch.randn(3, tok.config.embed_dim, tok.latent_size, tok.latent_size,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dec(post(z))
        got = tok.decoder(tok.post_quant_conv(z))
    assert got.shape == ref.shape == (3, 3, 16, 16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_vq_ops
def test_decode_codes_matches_taming(dirs):
    pytest.importorskip("taming.modules.diffusionmodules.model")
    tok = ImageTokenizer.from_pretrained(dirs["attn"])
    dec, post = taming_decoder(tok, dirs["attn"])
    codes = torch.randint(0, tok.codebook_size, (2, tok.num_tokens),
                          generator=torch.Generator().manual_seed(1))
    s = tok.latent_size
    z = tok.codebook[codes].view(2, s, s, -1).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = dec(post(z))
    pixels = tok.decode_pixels(codes)
    torch.testing.assert_close(pixels, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    images = tok.decode(codes)
    assert [im.size for im in images] == [(16, 16)] * 2 and images[0].mode == "RGB"
    expect = ((ref[1].clamp(-1, 1) + 1) / 2 * 255).permute(1, 2, 0).numpy().astype(np.uint8)
    assert np.abs(np.asarray(images[1]).astype(int) - expect).max() <= 1


# ------------------------------------------------------------------------ loading layouts
def test_hf_encoder_with_separate_decoder(dirs, tmp_path):
    """HF directories carry only the encoder; the decoder comes from a taming file, whose
    codebook must agree with the encoder's."""
    hf_only = tmp_path / "hf_only"
    shutil.copytree(dirs["plain"], hf_only)
    (hf_only / "vqgan.safetensors").unlink()
    enc_only = ImageTokenizer.from_pretrained(hf_only)
    assert not enc_only.has_decoder
    with pytest.raises(ValueError, match="decoder"):
        enc_only.decode_pixels(torch.zeros(1, enc_only.num_tokens, dtype=torch.int64))
    full = ImageTokenizer.from_pretrained(dirs["plain"])
    both = ImageTokenizer.from_pretrained(hf_only, decoder_path=dirs["plain"])
    assert both.has_decoder and both.identity() == full.identity() == enc_only.identity()
    for a, b in zip(both.decoder.state_dict().values(), full.decoder.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="codebook"):
        ImageTokenizer.from_pretrained(hf_only, decoder_path=dirs["attn"])


def test_identity_is_stable_and_sensitive(dirs, tmp_path):
    a = ImageTokenizer.from_pretrained(dirs["plain"]).identity()
    assert a == ImageTokenizer.from_pretrained(dirs["plain"]).identity()
    assert a != ImageTokenizer.from_pretrained(dirs["attn"]).identity()
    assert a != ImageTokenizer.from_pretrained(dirs["plain"], dtype=torch.bfloat16).identity()
    changed = tmp_path / "changed"
    shutil.copytree(dirs["plain"], changed)
    sd = dict(load_file(changed / "vqgan.safetensors"))
    sd["encoder.conv_in.bias"] = sd["encoder.conv_in.bias"] + 1e-3
    save_file(sd, changed / "vqgan.safetensors")
    assert a != ImageTokenizer.from_pretrained(changed).identity()


def test_bad_files_and_arguments(dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageTokenizer.from_pretrained(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(dirs["plain"], bad)
    sd = dict(load_file(bad / "vqgan.safetensors"))
    sd["decoder.conv_out.weight"] = torch.zeros(3, 5, 3, 3)
    sd.pop("encoder.mid.block_1.norm2.bias")
    save_file(sd, bad / "vqgan.safetensors")
    with pytest.raises(ValueError, match=r"encoder\.mid\.block_1\.norm2\.bias"):
        ImageTokenizer.from_pretrained(bad)
    sd["encoder.mid.block_1.norm2.bias"] = torch.zeros(64)
    save_file(sd, bad / "vqgan.safetensors")
    with pytest.raises(ValueError, match=r"decoder\.conv_out\.weight.*\[3, 5, 3, 3\]"):
        ImageTokenizer.from_pretrained(bad)
    (bad / "vqgan_config.json").unlink()
    (bad / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="vqgan_config.json"):
        ImageTokenizer.from_pretrained(bad)

    tok = ImageTokenizer.from_pretrained(dirs["plain"])
    with pytest.raises(TypeError, match=r"images\[1\].*ndarray"):
        tok.encode([random_images(1, 0)[0], np.zeros((16, 16, 3))])
    with pytest.raises(ValueError, match=r"codes.*\[0, 64\)"):
        tok.decode_pixels(torch.full((1, 16), 64))
    with pytest.raises(ValueError, match=r"codes.*\[N, 16\]"):
        tok.decode_pixels(torch.zeros(2, 15, dtype=torch.int64))
    with pytest.raises(TypeError, match="codes"):
        tok.decode_pixels(torch.zeros(1, 16))


def test_config_from_taming_yaml_params():
    params = {"embed_dim": 256, "n_embed": 8192, "ddconfig": {
        "double_z": False, "z_channels": 256, "resolution": 512, "in_channels": 3,
        "out_ch": 3, "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
        "attn_resolutions": [], "dropout": 0.0}}
    cfg = VQGANConfig.from_taming(params)
    assert cfg == VQGANConfig()  # Chameleon's VQGAN is the default
    assert (cfg.num_tokens, cfg.latent_size, cfg.num_embeddings) == (1024, 32, 8192)
    with pytest.raises(ValueError, match="n_embed"):
        VQGANConfig.from_taming({"embed_dim": 4, "ddconfig": params["ddconfig"]})
    with pytest.raises(ValueError, match="double_latent"):
        VQGANConfig(double_latent=True)


# ------------------------------------------------------------------------ preprocessing
def test_preprocessing_matches_hf_image_processor():
    """Where the resize is exact (short side scales to an integer long side), Chameleon's
    recipe and HF's ChameleonImageProcessorPil (rescaled to [-1, 1]) agree."""
    from transformers.models.chameleon.image_processing_pil_chameleon import (
        ChameleonImageProcessorPil,
    )

    proc = ChameleonImageProcessorPil(size={"shortest_edge": 16},
                                      crop_size={"height": 16, "width": 16},
                                      rescale_factor=1 / 127.5)
    rng = np.random.default_rng(0)
    for w, h in [(48, 32), (32, 80), (16, 16), (64, 64)]:
        img = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = proc(images=[img], return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(image_to_tensor(img, 16), ref, rtol=0, atol=1e-6)


def test_preprocessing_rules():
    # constant colour stays exact through LANCZOS; values map bytes -> [-1, 1]
    img = PIL.Image.new("RGB", (37, 53), (200, 100, 50))
    x = image_to_tensor(img, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    for c, v in enumerate((200, 100, 50)):
        assert torch.all(x[c] == torch.tensor(v / 255 * 2 - 1, dtype=torch.float32))
    # transparency is whitened: alpha 0 -> white, alpha 128 over black -> 127 (truncated)
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, 8:, 3] = 128
    x = image_to_tensor(PIL.Image.fromarray(rgba, "RGBA"), 16)
    assert torch.all(x[:, :, :8] == 1.0)
    expect = np.float32(int((1 - 128 / 255) * 255) / 255 * 2 - 1)
    assert torch.allclose(x[:, :, 8:], torch.tensor(expect), atol=1e-6)
    # grey and palette images become three equal channels
    x = image_to_tensor(PIL.Image.new("L", (20, 20), 77), 16)
    assert torch.all(x == torch.tensor(77 / 255 * 2 - 1, dtype=torch.float32))
    x = image_to_tensor(PIL.Image.new("P", (20, 20), 3), 16)
    assert x.shape == (3, 16, 16)
    # the centre survives the crop: left/right thirds of a wide image are cut away
    wide = np.zeros((16, 48, 3), dtype=np.uint8)
    wide[:, 16:32] = 255
    x = image_to_tensor(PIL.Image.fromarray(wide), 16)
    assert x[:, :, 3:13].min() > 0.9
    # an extreme strip does not explode in memory and still yields a square
    x = image_to_tensor(PIL.Image.new("RGB", (100000, 1), (9, 9, 9)), 16)
    assert x.shape == (3, 16, 16)
    with pytest.raises(TypeError, match="image"):
        image_to_tensor("not an image", 16)


def test_undecodable_image_is_named(tmp_path):
    path = tmp_path / "cut.png"
    random_images(1, seed=0)[0].resize((64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:200])  # truncated: PIL opens lazily, fails on load
    broken = PIL.Image.open(path)
    with pytest.raises(ValueError, match=r"images\[0\].*could not be decoded"):
        image_to_tensor(broken, 16, "images[0]")
