"""``load_model``: an HF-layout Chameleon directory -> :class:`ChameleonModel`.

The directory holds ``config.json`` and ``model.safetensors`` (or a sharded index) with HF's
weight names (``model.layers.{i}.self_attn.q_proj.weight`` ...). q/k/v rows are copied
straight into the fused QKV weight and gate/up into the fused gate/up weight, so no layer is
ever materialised twice.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cm3rt.checkpoint import SafetensorsCheckpoint, TensorSpec
from cm3rt.devices import resolve_device, resolve_weight_dtype
from cm3rt.model.chameleon import ChameleonModel
from cm3rt.model.config import ChameleonConfig
from cm3rt.model.tensor_parallel import SINGLE_PROCESS, TensorParallel


def _prefix(ckpt: SafetensorsCheckpoint) -> str:
    # ChameleonForConditionalGeneration nests the decoder under "model."; ChameleonModel
    # saved on its own does not.
    if "model.embed_tokens.weight" in ckpt:
        return "model."
    if "embed_tokens.weight" in ckpt:
        return ""
    return "model."  # report the names the common layout expects as missing


def weight_specs(model: ChameleonModel, prefix: str = "model.",
                 lm_head_name: str = "lm_head.weight") -> list[TensorSpec]:
    """Every checkpoint tensor the model reads, with the parameter slice it lands in and,
    under tensor parallelism, the part of the checkpoint tensor this rank reads."""
    cfg, tp = model.config, model.tp
    d, nq, nkv, inter = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, \
        cfg.intermediate_size
    h = cfg.hidden_size
    everything = slice(None)
    q0, nq_l = tp.part(nq)
    k0, nkv_l = tp.part(nkv)
    i0, inter_l = tp.part(inter)
    q_rows = slice(q0 * d, (q0 + nq_l) * d)  # this rank's heads / channels
    kv_rows = slice(k0 * d, (k0 + nkv_l) * d)
    heads, kv_heads, channels = slice(q0, q0 + nq_l), slice(k0, k0 + nkv_l), \
        slice(i0, i0 + inter_l)
    v0, v1 = model.vocab_start, model.vocab_end
    vocab = (slice(v0, v1),) if tp.enabled else ()
    specs = [TensorSpec(f"{prefix}embed_tokens.weight", (cfg.vocab_size, h),
                        model.embed_tokens[:v1 - v0], vocab),
             TensorSpec(f"{prefix}norm.weight", (h,), model.norm)]
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec(lm_head_name, (cfg.vocab_size, h), model.lm_head[:v1 - v0],
                                vocab))
    part = (lambda *index: index) if tp.enabled else (lambda *index: ())
    nq_r, nkv_r = nq_l * d, nkv_l * d
    for i, layer in enumerate(model.layers):
        p = f"{prefix}layers.{i}."
        qkv = layer.qkv_proj
        specs += [
            TensorSpec(p + "input_layernorm.weight", (h,), layer.input_layernorm),
            TensorSpec(p + "post_attention_layernorm.weight", (h,),
                       layer.post_attention_layernorm),
            TensorSpec(p + "self_attn.q_proj.weight", (nq * d, h), qkv[:nq_r], part(q_rows)),
            TensorSpec(p + "self_attn.k_proj.weight", (nkv * d, h), qkv[nq_r:nq_r + nkv_r],
                       part(kv_rows)),
            TensorSpec(p + "self_attn.v_proj.weight", (nkv * d, h), qkv[nq_r + nkv_r:],
                       part(kv_rows)),
            TensorSpec(p + "self_attn.o_proj.weight", (h, nq * d), layer.o_proj,
                       part(everything, q_rows)),
            TensorSpec(p + "self_attn.q_norm.weight", (nq, d), layer.q_norm_weight,
                       part(heads)),
            TensorSpec(p + "self_attn.q_norm.bias", (nq, d), layer.q_norm_bias, part(heads)),
            TensorSpec(p + "self_attn.k_norm.weight", (nkv, d), layer.k_norm_weight,
                       part(kv_heads)),
            TensorSpec(p + "self_attn.k_norm.bias", (nkv, d), layer.k_norm_bias,
                       part(kv_heads)),
            TensorSpec(p + "mlp.gate_proj.weight", (inter, h), layer.gate_up_proj[:inter_l],
                       part(channels)),
            TensorSpec(p + "mlp.up_proj.weight", (inter, h), layer.gate_up_proj[inter_l:],
                       part(channels)),
            TensorSpec(p + "mlp.down_proj.weight", (h, inter), layer.down_proj,
                       part(everything, channels)),
        ]
    return specs


def _check_unexpected(ckpt: SafetensorsCheckpoint, specs: list[TensorSpec], prefix: str,
                      path: Path) -> None:
    """Decoder tensors the config does not account for mean config and weights disagree
    (e.g. more layers in the file than in config.json): refuse rather than ignore them."""
    expected = {s.name for s in specs}
    ignored_roots = (f"{prefix}vqmodel.", "vqmodel.")
    unexpected = [
        n for n in ckpt.names()
        if n not in expected and not n.startswith(ignored_roots)
        and not n.endswith("rotary_emb.inv_freq")
        and not (n == "lm_head.weight" and "lm_head.weight" not in expected)
    ]
    if unexpected:
        raise ValueError(
            f"load_model: {path} holds {len(unexpected)} tensor(s) that config.json does not "
            f"describe: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )


def load_model(
    path: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    tp: TensorParallel = SINGLE_PROCESS,
    pack_weights: bool | None = None,
) -> ChameleonModel:
    """Load a Chameleon model from an HF-layout directory.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` (or
            ``model.safetensors.index.json`` + shards), HF weight names.
        dtype: weight / activation dtype (float32, bfloat16 or float16, or their names), or
            "int8": weight-only int8 projections with per-channel scales, quantised here,
            activations in :func:`cm3rt.devices.int8_activation_dtype` (bfloat16 where the
            device multiplies it natively);
            checkpoint tensors are converted one at a time while copying.
        device: ``"cpu"`` or ``"cuda[:N]"``.
        tp: this process's rank in a tensor-parallel group: only its share of every tensor
            is read (see :mod:`cm3rt.model.tensor_parallel`).
        pack_weights: on the CPU, keep every projection in panels instead of ``[N, K]``
            (:meth:`ChameleonModel.pack_weights_`; the same memory, faster at every row
            count where the CPU has the panel kernel). None (default): pack on the CPU
            without tensor parallelism (whose tests compare the ``[N, K]`` shards).

    Raises:
        FileNotFoundError: the directory, config.json or a weight file is missing.
        ValueError: unknown architecture / unsupported config, a missing tensor, or a tensor
            with the wrong shape or dtype (named, with its file). Nothing is loaded then.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"load_model: argument 'path' must be a model directory, "
                                f"got {str(path)!r} (no such directory)")
    device = resolve_device(device)
    dtype, int8 = resolve_weight_dtype(dtype, device)
    config = ChameleonConfig.from_json(path / "config.json")
    with SafetensorsCheckpoint.open_dir(path) as ckpt:
        prefix = _prefix(ckpt)
        # Shapes are checked against a meta-device twin first: nothing is allocated for
        # real until the whole checkpoint is known to fit the config.
        probe = ChameleonModel(config, dtype, "meta", tp)
        _check_unexpected(ckpt, weight_specs(probe, prefix), prefix, path)
        ckpt.check(weight_specs(probe, prefix), what=f"load_model({str(path)!r})")
        del probe
        model = ChameleonModel(config, dtype, device, tp)
        ckpt.copy_into(weight_specs(model, prefix))
    if int8:
        model.quantize_int8_()
    if pack_weights is None:
        pack_weights = device.type == "cpu" and not tp.enabled
    if pack_weights:
        model.pack_weights_()
    return model.eval()


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    tp: TensorParallel = SINGLE_PROCESS,
    pack_weights: bool | None = None,
):
    """``(model, processor)`` from one directory: decoder, tokenizer.json and the VQGAN
    (``pack_weights``: see :func:`load_model`)."""
    from cm3rt.tokenizer import ImageTokenizer, Processor, TextTokenizer

    model = load_model(path, dtype, device, tp, pack_weights)
    text = TextTokenizer.from_file(path)
    image = ImageTokenizer.from_pretrained(path, device=device)
    return model, Processor(text, image)
