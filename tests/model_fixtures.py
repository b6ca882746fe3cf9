"""Tiny random Chameleon model directories for tests (no downloads).

``make_tiny_model_dir(tmp_path, **overrides)`` writes an HF-layout directory the way a real
one looks, using HF transformers' own ``save_pretrained`` for the decoder (``use_hf=False``
writes the same layout without importing transformers, for tests that only need a model):

    config.json            HF ChameleonConfig, with vocabulary_map and vq_config
    model.safetensors      HF weight names (model.layers.*, lm_head, model.vqmodel.* encoder)
    tokenizer.json         byte-level BPE with Chameleon's special and IMGIMG image tokens
    vqgan.safetensors      the full VQGAN (taming names: encoder, quantizer, decoder)
    vqgan_config.json

Weights are random but *not* HF's near-zero init: linear layers ~ N(0, 1/fan_in), norms
around 1, biases and codebook non-zero, so every term of the forward matters in a
comparison. Image codes are placed in the vocabulary in a shuffled order, so code != id
offset and the image vocabulary map is really exercised.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

import torch

SPECIALS_BEFORE = ["<s>", "<pad>", "</s>", "<unk>"]
SPECIALS_AFTER = ["<eoss>", "<racm3:break>", "<image>", "<mask>", "<infill>"]

TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head_dim 32 (a size the attention kernels are built for)
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "swin_norm": False,
    "bos_token_id": 0,
    "pad_token_id": 1,
    "eos_token_id": 2,
}

TINY_VQ: dict[str, Any] = {
    "resolution": 16,
    "in_channels": 3,
    "out_channels": 3,
    "base_channels": 32,
    "channel_multiplier": [1, 2, 2],  # 16 px / 4 = a 4 x 4 grid: 16 tokens per image
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "attn_type": "vanilla",
    "latent_channels": 8,
    "embed_dim": 8,
    "num_embeddings": 64,
    "double_latent": False,
    "dropout": 0.0,
}

CORPUS = [
    "a red circle on a white background",
    "a blue square next to a green triangle",
    "two yellow stars above a purple hexagon",
    "the small orange circle is left of the big black square",
    "draw a picture of a cat sitting on a mat",
    "Describe the image. It shows shapes and colours.",
]


def image_token_name(code: int) -> str:
    """Chameleon's vocabulary name of VQ code ``code`` (written here independently of
    cm3rt so the tests check cm3rt's parser against it)."""
    return "IMGIMG" + "".join("ABCDEFGHIJ"[int(d)] for d in str(code)) + "Z"


@functools.lru_cache(maxsize=8)
def tiny_tokenizer_json(num_codes: int, bpe_merges: int = 64, with_infill: bool = True) -> str:
    """A byte-level BPE tokenizer.json: specials, the image tokens (shuffled), then BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    names = [image_token_name(c) for c in range(num_codes)]
    random.Random(num_codes).shuffle(names)
    after = SPECIALS_AFTER if with_infill else SPECIALS_AFTER[:3]
    specials = SPECIALS_BEFORE + names + after
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + len(alphabet) + bpe_merges,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok.to_str()


def _random_value(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    r = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith("embedding.weight"):  # VQ codebook
        return r
    if "norm" in name and name.endswith("weight"):
        return 1.0 + 0.2 * r
    if name.endswith("bias"):
        return 0.1 * r
    if len(shape) >= 2:
        return r / (r[0].numel() ** 0.5)  # ~ N(0, 1/fan_in)
    return r


def _randomise_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_random_value(name, tuple(p.shape), gen))


def _direct_checkpoint(cfg: dict[str, Any], vq: dict[str, Any], seed: int
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """HF-named decoder tensors and the VQ-VAE's encoder half, without transformers."""
    from cm3rt.tokenizer.vqgan_config import VQGANConfig
    from cm3rt.tokenizer.vqgan_modules import Encoder

    gen = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // nq
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
              "lm_head.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nq * d, h), p + "self_attn.k_proj.weight": (nkv * d, h),
            p + "self_attn.v_proj.weight": (nkv * d, h), p + "self_attn.o_proj.weight": (h, nq * d),
            p + "self_attn.q_norm.weight": (nq, d), p + "self_attn.q_norm.bias": (nq, d),
            p + "self_attn.k_norm.weight": (nkv, d), p + "self_attn.k_norm.bias": (nkv, d),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter)})
    decoder = {n: _random_value(n, s, gen) for n, s in shapes.items()}
    vcfg = VQGANConfig.from_hf_dict(vq)
    vq_shapes = {f"encoder.{n}": tuple(t.shape) for n, t in Encoder(vcfg).state_dict().items()}
    vq_shapes.update({
        "quantize.embedding.weight": (vcfg.num_embeddings, vcfg.embed_dim),
        "quant_conv.weight": (vcfg.embed_dim, vcfg.latent_channels, 1, 1),
        "quant_conv.bias": (vcfg.embed_dim,),
        "post_quant_conv.weight": (vcfg.latent_channels, vcfg.embed_dim, 1, 1),
        "post_quant_conv.bias": (vcfg.latent_channels,)})
    vq_state = {n: _random_value(n, s, gen) for n, s in vq_shapes.items()}
    return decoder, vq_state


def make_tiny_model_dir(tmp_path: str | Path, **overrides: Any) -> Path:
    """Write a tiny random Chameleon model directory and return its path.

    Overrides (all optional): any ChameleonConfig field (``hidden_size``, ``swin_norm``,
    ``num_key_value_heads`` ...); ``vq`` (dict merged into the VQGAN config); ``seed``;
    ``name`` (sub-directory, default ``tiny``); ``max_shard_size`` (e.g. ``"50KB"`` for a
    sharded checkpoint); ``save_dtype`` (dtype of the saved decoder weights);
    ``with_infill`` (False: no ``<mask>`` / ``<infill>`` tokens); ``write_vqgan`` (False:
    no vqgan.safetensors, only HF's encoder half); ``vocab_size`` (default: tokenizer size
    rounded up to 64); ``use_hf`` (False: write the same layout directly, without importing
    transformers, which is much faster to import; same names, shapes and config fields).
    """
    from safetensors.torch import save_file

    overrides = dict(overrides)
    seed = overrides.pop("seed", 0)
    name = overrides.pop("name", "tiny")
    max_shard_size = overrides.pop("max_shard_size", None)
    save_dtype = overrides.pop("save_dtype", None)
    with_infill = overrides.pop("with_infill", True)
    write_vqgan = overrides.pop("write_vqgan", True)
    use_hf = overrides.pop("use_hf", True)
    vq = {**TINY_VQ, **overrides.pop("vq", {})}
    out = Path(tmp_path) / name
    out.mkdir(parents=True, exist_ok=True)

    tok_json = tiny_tokenizer_json(vq["num_embeddings"], with_infill=with_infill)
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    vocab = _vocab_of(tok_json)
    vocab_size = overrides.pop("vocab_size", -(-(max(vocab.values()) + 1) // 64) * 64)

    cfg_kwargs = {**TINY_CONFIG, **overrides}
    rope_theta = cfg_kwargs.pop("rope_theta")
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if use_hf:
        from transformers import ChameleonConfig, ChameleonForConditionalGeneration

        cfg = ChameleonConfig(
            vocab_size=vocab_size,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
            vocabulary_map=vocab,
            vq_config=vq,
            **cfg_kwargs,
        )
        model = ChameleonForConditionalGeneration(cfg).eval()
        _randomise_(model, seed)
        if save_dtype is not None:
            model = model.to(save_dtype)
        model.save_pretrained(out, **kwargs)
        vq_state = {k: v.float().contiguous() for k, v in model.model.vqmodel.state_dict().items()}
    else:
        if max_shard_size:
            raise ValueError("make_tiny_model_dir: max_shard_size needs use_hf=True")
        config = {"architectures": ["ChameleonForConditionalGeneration"],
                  "model_type": "chameleon", "vocab_size": vocab_size, "hidden_act": "silu",
                  "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
                  "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
                  "vocabulary_map": vocab, "vq_config": vq, **cfg_kwargs}
        decoder_tensors, vq_state = _direct_checkpoint(config, vq, seed)
        tensors = {**decoder_tensors, **{f"model.vqmodel.{k}": t for k, t in vq_state.items()}}
        if save_dtype is not None:
            tensors = {k: t.to(save_dtype) for k, t in tensors.items()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    if write_vqgan:
        # The full taming-layout VQGAN: the checkpoint's encoder half plus a random decoder.
        from cm3rt.tokenizer.vqgan_config import VQGANConfig
        from cm3rt.tokenizer.vqgan_modules import Decoder

        vcfg = VQGANConfig.from_hf_dict(vq)
        decoder = Decoder(vcfg)
        _randomise_(decoder, seed + 1)
        tensors = dict(vq_state)
        tensors.update({f"decoder.{k}": v.contiguous() for k, v in decoder.state_dict().items()})
        save_file(tensors, str(out / "vqgan.safetensors"))
        vcfg.save_json(out / "vqgan_config.json")
    return out


def _vocab_of(tok_json: str) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tok_json).get_vocab(with_added_tokens=True)


def load_hf_model(path: Path, dtype: torch.dtype = torch.float32):
    """HF's ChameleonForConditionalGeneration from the same directory (the reference)."""
    from transformers import ChameleonForConditionalGeneration

    return ChameleonForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()


def hf_logits(hf_model, input_ids: torch.Tensor) -> torch.Tensor:
    """HF logits *before* it masks image tokens: its lm_head on its final hidden states."""
    with torch.no_grad():
        hidden = hf_model.model(input_ids=input_ids).last_hidden_state
        return hf_model.lm_head(hidden).float()


def read_config(path: Path) -> dict:
    """The directory's config.json as a dict."""
    return json.loads((Path(path) / "config.json").read_text())
