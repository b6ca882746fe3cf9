"""Original VQGAN checkpoints -> the safetensors layout cm3rt loads (``cm3rt convert vqgan``).

    cm3rt convert vqgan --ckpt tokenizer/vqgan.ckpt --config tokenizer/vqgan.yaml --out DIR

turns Chameleon's VQGAN (a PyTorch Lightning ``.ckpt`` holding ``state_dict`` plus the
taming ``vqgan.yaml``) into ``DIR/vqgan.safetensors`` + ``DIR/vqgan_config.json``, which
``ImageTokenizer.from_pretrained(DIR)`` reads. Put them in a Chameleon model directory to
give it the decoder HF checkpoints lack.

The ``.ckpt`` is read once with ``torch.load(weights_only=True)``: tensors and plain
containers only, nothing else is unpickled (a checkpoint that needs more is refused).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

VQGAN_KEEP = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.",
              "quantize.embedding.weight")


def read_taming_yaml(path: str | Path):
    """The :class:`VQGANConfig` of a taming ``vqgan.yaml`` (``model.params`` section)."""
    from cm3rt.tokenizer.vqgan_config import VQGANConfig

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"convert: argument '--config': no such file: {path}")
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - PyYAML is a dependency of convert
        raise ImportError("convert: reading vqgan.yaml needs PyYAML (pip install pyyaml)") \
            from exc
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"convert: {path} is not valid YAML: {exc}") from exc
    params = doc
    if isinstance(doc, dict) and isinstance(doc.get("model"), dict):
        params = doc["model"].get("params", doc["model"])
    if not isinstance(params, dict) or "ddconfig" not in params:
        raise ValueError(f"convert: {path} has no taming 'model: params: ddconfig:' section")
    return VQGANConfig.from_taming(params)


def load_ckpt_state_dict(path: str | Path) -> dict:
    """The tensors of a ``.ckpt`` / ``.pth`` (its ``state_dict`` entry when it has one),
    loaded with ``weights_only=True``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"convert: argument '--ckpt': no such file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise ValueError(
            f"convert: {path} cannot be read as a weights-only checkpoint (cm3rt never "
            f"unpickles arbitrary objects): {str(exc).splitlines()[0]}") from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"convert: {path} holds no state dict (got {type(obj).__name__})")
    return state


def convert_vqgan(ckpt: str | Path, config: str | Path, out_dir: str | Path,
                  overwrite: bool = False) -> Path:
    """Convert Chameleon's ``vqgan.ckpt`` + ``vqgan.yaml`` to ``out_dir/vqgan.safetensors``
    (taming tensor names; training-only tensors such as ``loss.*`` dropped) and
    ``out_dir/vqgan_config.json``. Every tensor is checked against the config first.

    Returns the path of the written safetensors file.
    """
    import torch
    from safetensors.torch import save_file

    from cm3rt.tokenizer.vqgan import VQGAN_CONFIG, VQGAN_WEIGHTS, taming_tensor_shapes

    cfg = read_taming_yaml(config)
    out_dir = Path(out_dir)
    target = out_dir / VQGAN_WEIGHTS
    if target.exists() and not overwrite:
        raise ValueError(f"convert: {target} exists (pass --overwrite to replace it)")
    state = load_ckpt_state_dict(ckpt)
    expected = taming_tensor_shapes(cfg)
    kept, problems = {}, []
    for name, shape in expected.items():
        t = state.get(name)
        if t is None:
            problems.append(f"missing tensor '{name}'")
        elif not isinstance(t, torch.Tensor) or not t.is_floating_point():
            problems.append(f"tensor '{name}' is {getattr(t, 'dtype', type(t).__name__)}, "
                            "expected floating point")
        elif tuple(t.shape) != shape:
            problems.append(f"tensor '{name}' has shape {list(t.shape)}, expected "
                            f"{list(shape)} (from {config})")
        else:
            kept[name] = t.detach().contiguous()
    unknown = [n for n in state if n.startswith(VQGAN_KEEP) and n not in expected]
    if unknown:
        problems.append(f"tensors the config does not describe: {unknown[:5]}")
    if problems:
        raise ValueError(f"convert: {ckpt}: " + "; ".join(problems[:6])
                         + (f"; and {len(problems) - 6} more" if len(problems) > 6 else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    save_file(kept, str(tmp), metadata={"format": "pt", "source": "cm3rt convert vqgan"})
    os.replace(tmp, target)  # never leave a half-written vqgan.safetensors behind
    cfg.save_json(out_dir / VQGAN_CONFIG)
    return target
