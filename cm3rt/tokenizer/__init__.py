"""Tokenizers: text (HF tokenizers BPE), image (VQGAN), and the interleaving processor."""

from cm3rt.tokenizer.image_vocab import ImageVocabulary

__all__ = ["ImageVocabulary"]
