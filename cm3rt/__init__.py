"""cm3rt: a runtime for retrieval-augmented autoregressive multimodal models (CM3Leon family).

Submodules:
    cm3rt.ops        kernel ops (paged attention, KV append, sampling, VQ lookup)
"""

__version__ = "0.1.0"
