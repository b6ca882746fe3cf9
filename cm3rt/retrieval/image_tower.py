"""CLIP image tower without open_clip: torch + safetensors + PIL only.

Captioning retrieves documents by the prompt image, which needs the CLIP *image* embedding,
and importing open_clip costs seconds (it pulls in torchvision and transformers).
:class:`ClipImageTower` reproduces, for the configurations it accepts, exactly what open_clip
computes for ``CLIP.encode_image`` of a local-dir model in fp32:

- the eval preprocessing open_clip builds from the folder's ``preprocess_cfg``
  (``image_transform_v2(..., is_train=False)``): torchvision's PIL resize (same target size,
  same PIL filter, done in the image's own mode), its centre crop, ``convert("RGB")``,
  ``to_tensor`` and ``Normalize``, for resize_mode "shortest" or "squash" with bicubic or
  bilinear filtering;
- open_clip's ``ModifiedResNet`` vision tower (3-conv stem, anti-aliased Bottleneck blocks,
  attention pooling); ``CLIP.encode_image`` adds nothing to it.

Anything else (ViT or timm towers, CoCa, resize_mode "longest", other filters, ...) is refused
by :func:`unsupported_reason`, and the caller uses open_clip instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

# One refusal type for both towers (text_tower.UnsupportedTower): the model or its files are
# not what the tower reproduces, and the caller uses open_clip.
from .text_tower import (
    CONFIG_FILE,
    UnsupportedTower,
    check_safetensors_checkpoint,
    find_checkpoint,
)

# open_clip's PreprocessCfg defaults (open_clip/transform.py). clip.py uses them too, for the
# identity of a folder computed without open_clip (checked against open_clip's when loaded).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_DEFAULTS = {"size": 224, "mode": "RGB", "mean": OPENAI_MEAN, "std": OPENAI_STD,
                       "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}

# open_clip's eval transform maps "bilinear" to bilinear and everything else it accepts
# ("bicubic", and "random", which only matters for training) to bicubic; torchvision then
# hands PIL these filters.
_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "random": Image.Resampling.BICUBIC,
                "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "squash")  # "longest" (resize + pad) is not implemented

# open_clip CLIPVisionCfg fields. For a ModifiedResNet open_clip reads only layers, width,
# head_width and image_size; the ViT-only ones are ignored there, so they may be present.
_VISION_RESNET = {"layers", "width", "head_width", "image_size"}
_VISION_IGNORED = {"mlp_ratio", "patch_size", "ls_init_value", "patch_dropout",
                   "attentional_pool", "attn_pooler_queries", "attn_pooler_heads",
                   "no_ln_pre", "pos_embed_type", "final_ln_after_pool", "pool_type",
                   "output_tokens", "act_kwargs", "norm_kwargs", "block_type", "qk_norm",
                   "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                   "scale_fc"}
# model_cfg keys that leave CLIP.encode_image alone (custom_text only swaps the text side).
_MODEL_HANDLED = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale",
                  "init_logit_bias", "nonscalar_logit_scale", "custom_text"}
_BN_EPS = 1e-5  # nn.BatchNorm2d's default, which ModifiedResNet uses


@dataclass(frozen=True)
class ResNetConfig:
    """What the ModifiedResNet forward pass needs (open_clip's names)."""

    layers: tuple[int, int, int, int]  # Bottleneck blocks per stage
    width: int  # stem width; stage i has width * 2**i planes (x4 channels out)
    heads: int  # attention-pool heads
    image_size: int
    embed_dim: int  # output of the attention pool's c_proj

    @property
    def feature_dim(self) -> int:
        """Channels of the last stage (the attention pool's width)."""
        return self.width * 32

    @property
    def grid(self) -> int:
        """Side of the last feature map (open_clip sizes the positional embedding by it)."""
        return self.image_size // 32


@dataclass(frozen=True)
class PreprocessConfig:
    """open_clip's eval transform for a square image size."""

    size: int
    resize_mode: str  # "shortest" (resize the short side, centre crop) or "squash"
    resample: Image.Resampling
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def preprocess_cfg_of(config: dict) -> dict:
    """``model.visual.preprocess_cfg`` that open_clip sets for a local-dir config file."""
    cfg = dict(PREPROCESS_DEFAULTS)
    cfg.update({k: v for k, v in (config.get("preprocess_cfg") or {}).items()
                if k in PREPROCESS_DEFAULTS and v is not None})
    vision = config["model_cfg"].get("vision_cfg", {})
    size = vision.get("image_size", 224)
    # ModifiedResNet keeps image_size as given; ViT and timm towers make it a pair.
    if isinstance(vision.get("layers", 12), (list, tuple)) and not vision.get("timm_model_name"):
        cfg["size"] = size
    else:
        cfg["size"] = size if isinstance(size, (list, tuple)) else (size, size)
    return cfg


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UnsupportedTower(f"{path} is not readable JSON: {e}") from e
    if not isinstance(d, dict) or not isinstance(d.get("model_cfg"), dict):
        raise UnsupportedTower(f"{path}: expected an object with a model_cfg object")
    return d


def _positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedTower(f"{where}={value!r} is not implemented here (expected an "
                               "int >= 1)")
    return value


def _last_grid(image_size: int) -> int:
    """Side of ModifiedResNet's last feature map for an image_size input."""
    side = (image_size - 1) // 2 + 1  # conv1: 3x3, stride 2, padding 1
    for _ in range(4):  # the stem's avgpool and the stride-2 pools of stages 2-4
        side //= 2
    return side


def tower_config(model_cfg: dict) -> ResNetConfig:
    """Check ``model_cfg`` (open_clip_config.json's ``model_cfg``) and extract the tower.

    Raises UnsupportedTower naming the first setting this module does not reproduce.
    """
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict):
        raise UnsupportedTower("model_cfg: expected an object with a vision_cfg object")
    if "multimodal_cfg" in model_cfg:
        raise UnsupportedTower("model_cfg: multimodal_cfg (CoCa) is not implemented here")
    extra = sorted(set(model_cfg) - _MODEL_HANDLED)
    if extra:
        raise UnsupportedTower(f"model_cfg: keys {extra} are not implemented here")
    v = model_cfg["vision_cfg"]
    timm = sorted(k for k in v if k.startswith("timm_"))
    if timm:  # even a null timm_model_name changes how open_clip sets the model up
        raise UnsupportedTower(f"vision_cfg: timm settings {timm} are not implemented here")
    layers = v.get("layers", 12)
    if not isinstance(layers, (list, tuple)):
        raise UnsupportedTower("vision_cfg: a ViT vision tower (layers an int) is not "
                               "implemented here, only ModifiedResNet (layers a list)")
    extra = sorted(set(v) - _VISION_RESNET - _VISION_IGNORED)
    if extra:
        raise UnsupportedTower(f"vision_cfg: keys {extra} are not implemented here")
    if len(layers) != 4:
        raise UnsupportedTower(f"vision_cfg: layers={list(layers)} is not implemented here "
                               "(ModifiedResNet has 4 stages)")
    layers = tuple(_positive_int(n, "vision_cfg: layers entry") for n in layers)
    width = _positive_int(v.get("width", 768), "vision_cfg: width")
    if width < 2:
        raise UnsupportedTower(f"vision_cfg: width={width} is not implemented here (the stem "
                               "has width // 2 channels)")
    head_width = _positive_int(v.get("head_width", 64), "vision_cfg: head_width")
    image_size = _positive_int(v.get("image_size", 224), "vision_cfg: image_size")
    embed_dim = _positive_int(model_cfg.get("embed_dim"), "model_cfg: embed_dim")
    cfg = ResNetConfig(layers=layers, width=width, heads=width * 32 // head_width,
                       image_size=image_size, embed_dim=embed_dim)
    if cfg.heads < 1 or cfg.feature_dim % cfg.heads:
        raise UnsupportedTower(f"vision_cfg: {cfg.feature_dim} attention-pool channels do not "
                               f"split into {cfg.heads} heads (head_width {head_width})")
    # open_clip sizes the positional embedding by image_size // 32; other sizes (e.g. 63)
    # give a different feature map and open_clip itself fails on them.
    if cfg.grid < 1 or _last_grid(image_size) != cfg.grid:
        raise UnsupportedTower(f"vision_cfg: image_size={image_size} gives a "
                               f"{_last_grid(image_size)}-wide feature map, not image_size // "
                               f"32 = {cfg.grid}")
    return cfg


def _channel_triple(value, name: str) -> tuple[float, float, float]:
    # image_transform: a falsy value means the OpenAI constants, a scalar is repeated.
    if not value:
        value = OPENAI_MEAN if name == "mean" else OPENAI_STD
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
        raise UnsupportedTower(f"preprocess_cfg: {name}={value!r} is not implemented here "
                               "(expected 3 numbers)")
    return tuple(float(x) for x in value)


def preprocess_config(cfg: dict) -> PreprocessConfig:
    """Check a merged preprocess config (:func:`preprocess_cfg_of`) and extract it."""
    if cfg.get("mode", "RGB") != "RGB":
        raise UnsupportedTower(f"preprocess_cfg: mode={cfg['mode']!r} is not implemented here")
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation not in _PIL_FILTERS:
        raise UnsupportedTower(f"preprocess_cfg: interpolation={interpolation!r} is not "
                               f"implemented here (only {sorted(_PIL_FILTERS)})")
    resize_mode = cfg.get("resize_mode") or "shortest"
    if resize_mode not in _RESIZE_MODES:
        raise UnsupportedTower(f"preprocess_cfg: resize_mode={resize_mode!r} is not "
                               f"implemented here (only {list(_RESIZE_MODES)})")
    size = cfg.get("size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    size = _positive_int(size, "preprocess_cfg: size (square)")
    std = _channel_triple(cfg.get("std"), "std")
    # torchvision's Normalize refuses a std that is zero in float32
    if (torch.tensor(std, dtype=torch.float32) == 0).any():
        raise UnsupportedTower(f"preprocess_cfg: std={list(std)} has a zero")
    return PreprocessConfig(size=size, resize_mode=resize_mode,
                            resample=_PIL_FILTERS[interpolation],
                            mean=_channel_triple(cfg.get("mean"), "mean"), std=std)


def _configs(folder: Path) -> tuple[ResNetConfig, PreprocessConfig]:
    config = _read_json(folder / CONFIG_FILE)
    tower = tower_config(config["model_cfg"])
    pre = preprocess_config(preprocess_cfg_of(config))
    if pre.size != tower.image_size:  # open_clip sets size from the tower; kept as a guard
        raise UnsupportedTower(f"preprocess_cfg: size {pre.size} differs from image_size "
                               f"{tower.image_size}")
    return tower, pre


def unsupported_reason(folder: str | Path) -> str | None:
    """Why :class:`ClipImageTower` cannot reproduce the local-dir CLIP in ``folder``, or None.

    Checks the config, the preprocessing and the weights file open_clip would load (it must
    be .safetensors); the weight shapes are checked when loading.
    """
    folder = Path(folder)
    try:
        _configs(folder)
        check_safetensors_checkpoint(folder)
    except UnsupportedTower as e:
        return str(e)
    return None


def supports(folder: str | Path) -> bool:
    """True when :class:`ClipImageTower` reproduces the CLIP in ``folder`` exactly."""
    return unsupported_reason(folder) is None


def preprocess(image: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """open_clip's eval transform of one PIL image: float32 [3, size, size].

    Each step mirrors what torchvision does to a PIL image, so the result is bit-identical.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a PIL.Image.Image, got {type(image).__name__}")
    w, h = image.size
    if w < 1 or h < 1:
        raise ValueError(f"image: expected a non-empty image, got size {w}x{h}")
    s = cfg.size
    if cfg.resize_mode == "shortest":
        # torchvision Resize(int): the short side becomes s, the long side is truncated
        # (int(), not round()) from s * long / short, computed in that order.
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        new_w, new_h = (s, new_long) if w <= h else (new_long, s)
    else:
        new_w, new_h = s, s
    if (new_w, new_h) != (w, h):  # torchvision returns the image untouched at the target size
        # Resized in the image's own mode (RGBA, L, P, ...), before the RGB conversion,
        # exactly as open_clip's transform orders it; PIL handles each mode itself.
        image = image.resize((new_w, new_h), cfg.resample)
    if cfg.resize_mode == "shortest":
        # torchvision CenterCrop: Python's round() on the half offset (ties go to even).
        top, left = round((new_h - s) / 2.0), round((new_w - s) / 2.0)
        image = image.crop((left, top, left + s, top + s))
    image = image.convert("RGB")
    # to_tensor (uint8 HWC -> float CHW / 255), then Normalize's sub and div in float32
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(s, s, 3)
    x = x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def _expected_shapes(cfg: ResNetConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass reads, with its shape (open_clip's state-dict names)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, out: int, inp: int, k: int) -> None:
        shapes[f"visual.{name}.weight"] = (out, inp, k, k)

    def bn(name: str, c: int) -> None:
        for part in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"visual.{name}.{part}"] = (c,)

    half = cfg.width // 2
    for name, out, inp in (("1", half, 3), ("2", half, half), ("3", cfg.width, half)):
        conv(f"conv{name}", out, inp, 3)
        bn(f"bn{name}", out)
    inplanes = cfg.width
    for stage, (blocks, stride) in enumerate(zip(cfg.layers, (1, 2, 2, 2)), start=1):
        planes = cfg.width * 2 ** (stage - 1)
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            for name, out, inp, k in (("1", planes, inplanes, 1), ("2", planes, planes, 3),
                                      ("3", planes * 4, planes, 1)):
                conv(f"{p}.conv{name}", out, inp, k)
                bn(f"{p}.bn{name}", out)
            if i == 0 and (stride > 1 or inplanes != planes * 4):
                conv(f"{p}.downsample.0", planes * 4, inplanes, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    c = cfg.feature_dim
    shapes["visual.attnpool.positional_embedding"] = (cfg.grid ** 2 + 1, c)
    for proj in ("q_proj", "k_proj", "v_proj"):
        shapes[f"visual.attnpool.{proj}.weight"] = (c, c)
        shapes[f"visual.attnpool.{proj}.bias"] = (c,)
    shapes["visual.attnpool.c_proj.weight"] = (cfg.embed_dim, c)
    shapes["visual.attnpool.c_proj.bias"] = (cfg.embed_dim,)
    return shapes


class ClipImageTower:
    """open_clip ``CLIP.encode_image`` (fp32, with its eval preprocessing) for a local-dir
    ModifiedResNet model, without open_clip.

    Build with :meth:`from_dir`; :meth:`encode` returns L2-normalised float32 [N, E].
    """

    def __init__(self, cfg: ResNetConfig, pre: PreprocessConfig,
                 weights: dict[str, torch.Tensor], device: torch.device) -> None:
        self.cfg = cfg
        self.pre = pre
        self.embed_dim = cfg.embed_dim
        self.device = device
        self.w = weights
        # open_clip concatenates the q, k, v biases on every call; the values are the same
        a = "visual.attnpool."
        self._in_proj_bias = torch.cat([weights[a + "q_proj.bias"], weights[a + "k_proj.bias"],
                                        weights[a + "v_proj.bias"]])

    @classmethod
    def from_dir(cls, folder: str | Path, device: str | torch.device = "cpu") -> ClipImageTower:
        """Load config, preprocessing and vision weights; UnsupportedTower when not
        reproducible."""
        from safetensors import safe_open

        folder = Path(folder)
        reason = unsupported_reason(folder)
        if reason is not None:
            raise UnsupportedTower(reason)
        cfg, pre = _configs(folder)
        device = torch.device(device)
        weights = {}
        with safe_open(str(find_checkpoint(folder)), framework="pt") as f:
            present = set(f.keys())
            expected = _expected_shapes(cfg)
            missing = sorted(set(expected) - present)
            if missing:
                raise UnsupportedTower(f"weights: vision tower tensors {missing[:4]} missing")
            # open_clip loads the state dict strictly: an unexpected visual tensor (another
            # block, a different tower) means the folder is not the model described here.
            unexpected = sorted(k for k in present - set(expected) if k.startswith("visual.")
                                and not k.endswith(".num_batches_tracked"))
            if unexpected:
                raise UnsupportedTower(f"weights: unexpected vision tensors {unexpected[:4]}")
            for key, shape in expected.items():
                t = f.get_tensor(key)
                if tuple(t.shape) != shape:
                    raise UnsupportedTower(f"weights: {key} has shape {list(t.shape)}, "
                                           f"expected {list(shape)}")
                weights[key] = t.to(device=device, dtype=torch.float32)
        return cls(cfg, pre, weights, device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """open_clip's eval transform of ``image``: float32 [3, size, size] on the CPU."""
        return preprocess(image, self.pre)

    # ------------------------------------------------------------------ forward pass
    def _conv_bn(self, x: torch.Tensor, conv: str, bn: str, stride: int = 1,
                 relu: bool = True) -> torch.Tensor:
        w = self.w
        weight = w[f"visual.{conv}.weight"]
        x = F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2)
        # BatchNorm in eval mode: the running statistics, never the batch's
        x = F.batch_norm(x, w[f"visual.{bn}.running_mean"], w[f"visual.{bn}.running_var"],
                         w[f"visual.{bn}.weight"], w[f"visual.{bn}.bias"], False, 0.0, _BN_EPS)
        return F.relu(x) if relu else x

    def _bottleneck(self, x: torch.Tensor, p: str, stride: int, downsample: bool):
        out = self._conv_bn(x, f"{p}.conv1", f"{p}.bn1")
        out = self._conv_bn(out, f"{p}.conv2", f"{p}.bn2")
        if stride > 1:  # anti-aliasing: average-pool, then a stride-1 convolution
            out = F.avg_pool2d(out, stride)
        out = self._conv_bn(out, f"{p}.conv3", f"{p}.bn3", relu=False)
        if downsample:
            # open_clip's AvgPool2d(stride) runs even for stride 1 (a no-op average of one)
            identity = self._conv_bn(F.avg_pool2d(x, stride), f"{p}.downsample.0",
                                     f"{p}.downsample.1", relu=False)
        else:
            identity = x
        return F.relu(out + identity)

    def _attention_pool(self, x: torch.Tensor) -> torch.Tensor:
        w, a = self.w, "visual.attnpool."
        n, c = x.shape[:2]
        x = x.reshape(n, c, -1).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # the mean token first
        x = x + w[a + "positional_embedding"][:, None, :]
        # every token attends to every token; the mean token's output is the embedding
        out, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=c, num_heads=self.cfg.heads,
            in_proj_weight=None, in_proj_bias=self._in_proj_bias, bias_k=None, bias_v=None,
            add_zero_attn=False, dropout_p=0.0, out_proj_weight=w[a + "c_proj.weight"],
            out_proj_bias=w[a + "c_proj.bias"], training=False, need_weights=False,
            use_separate_proj_weight=True, q_proj_weight=w[a + "q_proj.weight"],
            k_proj_weight=w[a + "k_proj.weight"], v_proj_weight=w[a + "v_proj.weight"])
        return out[0]

    @torch.inference_mode()
    def forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features [N, E] of preprocessed images [N, 3, size, size]."""
        cfg = self.cfg
        s = cfg.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"pixels: expected [N, 3, {s}, {s}], got {list(pixels.shape)}")
        x = pixels.to(self.device, torch.float32)
        x = self._conv_bn(x, "conv1", "bn1", stride=2)
        x = self._conv_bn(x, "conv2", "bn2")
        x = self._conv_bn(x, "conv3", "bn3")
        x = F.avg_pool2d(x, 2)
        inplanes = cfg.width
        for stage, (blocks, stride) in enumerate(zip(cfg.layers, (1, 2, 2, 2)), start=1):
            planes = cfg.width * 2 ** (stage - 1)
            for i in range(blocks):
                first = i == 0
                x = self._bottleneck(x, f"layer{stage}.{i}", stride if first else 1,
                                     first and (stride > 1 or inplanes != planes * 4))
                inplanes = planes * 4
        return self._attention_pool(x)

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings: float32 [N, E] on the CPU."""
        if not images:
            return torch.empty(0, self.embed_dim)
        x = self.forward_pixels(torch.stack([self.preprocess(im) for im in images])).float()
        return (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu()
