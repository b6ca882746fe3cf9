"""ClipTextTower (open_clip-free text tower) against open_clip itself on tiny random CLIPs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")

from cm3rt.retrieval import text_tower as tt
from cm3rt.retrieval.clip import ClipEncoder

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 12
CAPTIONS = ["a red circle", "", "Two   blue squares\n on a  green field",
            ("a very long caption about many small shapes that goes far past the twelve "
             "token context of this tiny model"), "café &amp; crème “quoted”", "A\tB <s> </s>"]
RESNET_VISION = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}
VIT_VISION = {"image_size": 32, "layers": 1, "width": 16, "patch_size": 16, "head_width": 8}


def make_tokenizer(folder: Path) -> int:
    """A small byte-level BPE with </s> appended (like tools/train/train_tokenizer.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a red circle", "two blue squares on a green field",
                             "small shapes"] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 4096}))
    return tok.get_vocab_size()


def make_clip(folder: Path, text_extra: dict | None = None, vision: dict | None = None,
              model_extra: dict | None = None, seed: int = 0) -> Path:
    """A random tiny CLIP with an HF tokenizer in open_clip's local-dir layout."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    vocab = make_tokenizer(folder)
    cfg = {"embed_dim": 16, "vision_cfg": vision or RESNET_VISION,
           "text_cfg": {"context_length": CONTEXT, "vocab_size": vocab, "width": 16,
                        "heads": 2, "layers": 2, "hf_tokenizer_name": "tiny-bpe",
                        "tokenizer_kwargs": {"clean": "whitespace"}, "pool_type": "eos",
                        "eos_id": 1, "pad_id": 2, **(text_extra or {})},
           **(model_extra or {})}
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**json.loads(json.dumps(cfg)))
    with torch.no_grad():  # layer-scale gammas and biases away from their constant inits
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "bias")):
                p.add_(0.1 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return folder


VARIANTS = {
    # the shipped layout: eos pooling, projection matrix, ResNet vision tower
    "eos": ({}, RESNET_VISION, {}),
    # argmax pooling, Linear projection with bias, layer scale, QuickGELU, lower-casing,
    # no causal mask, ViT vision tower
    "argmax": ({"pool_type": "argmax", "proj_bias": True, "ls_init_value": 0.5,
                "tokenizer_kwargs": {"clean": "lower"}, "no_causal_mask": True},
               VIT_VISION, {"quick_gelu": True}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def clip_dir(request, tmp_path_factory):
    text, vision, model = VARIANTS[request.param]
    return make_clip(tmp_path_factory.mktemp(request.param) / "clip", text, vision, model)


def test_tower_matches_open_clip(clip_dir):
    ref = ClipEncoder(f"local-dir:{clip_dir}")
    fast = ClipEncoder.for_queries(f"local-dir:{clip_dir}")
    assert fast._tower is not None, fast.text_tower_refusal
    assert fast._open_clip is None
    # same ids (cleaning, truncation to the context, </s>, padding) as open_clip's HFTokenizer
    ids = fast._tower.tokenize(CAPTIONS)
    assert torch.equal(ids, ref.tokenizer(CAPTIONS))
    assert ids.shape == (len(CAPTIONS), CONTEXT) and ids[3, -1] == 1  # truncated, eos kept
    got, want = fast.encode_text(CAPTIONS), ref.encode_text(CAPTIONS)
    assert got.shape == want.shape == (len(CAPTIONS), 16)
    assert (got - want).abs().max().item() <= 1e-5
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(CAPTIONS)), atol=1e-5)
    # distinct captions give distinct embeddings (the test can tell texts apart)
    assert (got[0] - got[2]).abs().max().item() > 1e-3
    q = fast.encode_query("a red circle")
    assert (q - ref.encode_query("a red circle")).abs().max().item() <= 1e-5
    # the identity a bank records is exactly open_clip's, computed without it
    assert fast.identity == ref.identity
    assert fast._open_clip is None
    # images: ClipImageTower for a ModifiedResNet vision tower (open_clip stays unloaded),
    # else open_clip, loaded lazily (and re-checking the identity)
    assert fast.encode_image([]).shape == (0, 16)
    cfg = json.loads((clip_dir / "open_clip_config.json").read_text())["model_cfg"]
    resnet = isinstance(cfg["vision_cfg"].get("layers"), list)
    assert (fast._image_tower is not None) == resnet
    assert (fast._open_clip is None) == resnet


def test_unsupported_configs_are_refused():
    base = {"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"hf_tokenizer_name": "x"}}
    tt.tower_config(base)  # supported
    bad = [{"text_cfg": {"hf_tokenizer_name": "x", "hf_model_name": "bert-base-uncased"}},
           {"text_cfg": {"hf_tokenizer_name": "x", "pool_type": "none"}},
           {"text_cfg": {"hf_tokenizer_name": "x", "embed_cls": True}},
           {"text_cfg": {"hf_tokenizer_name": "x", "qk_norm": True}},
           {"text_cfg": {}},  # SimpleTokenizer
           {"text_cfg": {"hf_tokenizer_name": "x", "tokenizer_mode": "clips"}},
           {"custom_text": True},
           {"multimodal_cfg": {}}]
    for change in bad:
        with pytest.raises(tt.UnsupportedTower):
            tt.tower_config({**base, **change})


def test_unsupported_tower_falls_back_to_open_clip(tmp_path):
    clip = make_clip(tmp_path / "clip", {"tokenizer_kwargs": {"clean": "canonicalize"}})
    assert not tt.supports(clip) and "canonicalize" in tt.unsupported_reason(clip)
    enc = ClipEncoder.for_queries(f"local-dir:{clip}")
    assert enc._tower is None and "canonicalize" in enc.text_tower_refusal
    assert enc._open_clip is None  # the image tower still applies; texts load open_clip
    ref = ClipEncoder(f"local-dir:{clip}")
    assert enc.identity == ref.identity
    assert torch.equal(enc.encode_text(CAPTIONS[:2]), ref.encode_text(CAPTIONS[:2]))
    assert enc._open_clip is not None


def test_text_query_through_default_bank_imports_no_open_clip(tmp_path):
    from cm3rt.retrieval.bank import DocInput, MemoryBank

    clip = make_clip(tmp_path / "root" / "clip")
    enc = ClipEncoder(f"local-dir:{clip}")  # the bank records open_clip's own identity
    captions = ["a red circle", "two blue squares", "a green field"]
    bank = MemoryBank.create(tmp_path / "root" / "bank", enc)
    bank.add_documents([DocInput(f"doc{i}", c) for i, c in enumerate(captions)],
                       enc.encode_text(captions))
    bank.flush()  # writes the index file
    bank.close()
    script = textwrap.dedent(f"""
        import sys
        from cm3rt.api.defaults import DefaultAssets, open_default_bank
        bank = open_default_bank(DefaultAssets(root=__import__("pathlib").Path(
            {str(tmp_path / "root")!r}), k_docs=1, bank="bank"))
        docs = bank.search("two blue squares", k=1, max_score=None)
        heavy = [m for m in ("open_clip", "torchvision", "transformers") if m in sys.modules]
        print("DOC", docs[0].caption, "HEAVY", heavy)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=False,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "DOC two blue squares HEAVY []" in out.stdout, out.stdout
