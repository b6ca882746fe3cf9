"""Tokenizers: text (HF ``tokenizers`` BPE), images (Chameleon's VQGAN), and the processor
that interleaves them into one token stream.

    text = TextTokenizer.from_file("model_dir")          # tokenizer.json
    image = ImageTokenizer.from_pretrained("model_dir")  # vqgan.safetensors / HF vqmodel
    proc = Processor(text, image)
    ids = proc.encode(["a red circle", pil_image])
    parts = proc.decode(ids)                             # [str | PIL.Image, ...]
"""

from cm3rt.tokenizer.image_vocab import ImageVocabulary, image_token_name
from cm3rt.tokenizer.processor import Processor
from cm3rt.tokenizer.text import TextTokenizer
from cm3rt.tokenizer.vqgan import ImageTokenizer
from cm3rt.tokenizer.vqgan_config import VQGANConfig

__all__ = [
    "ImageTokenizer",
    "ImageVocabulary",
    "Processor",
    "TextTokenizer",
    "VQGANConfig",
    "image_token_name",
]
