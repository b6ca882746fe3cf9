"""The Chameleon decoder on cm3rt's paged kernels, and its HF-layout loader.

    model = load_model("path/to/chameleon", dtype=torch.bfloat16, device="cuda")
    logits = model.logits(input_ids)            # [B, L] -> float32 [B, L, V]
    hidden = model.forward_step(ids, positions, meta, kv_caches)   # the engine's step
"""

from cm3rt.model.chameleon import ChameleonDecoderLayer, ChameleonModel
from cm3rt.model.config import ChameleonConfig
from cm3rt.model.loader import load_model, load_pretrained
from cm3rt.model.step import StepMetadata
from cm3rt.model.tensor_parallel import TensorParallel

__all__ = [
    "ChameleonConfig",
    "ChameleonDecoderLayer",
    "ChameleonModel",
    "StepMetadata",
    "TensorParallel",
    "load_model",
    "load_pretrained",
]
