"""Tables of calls shared by every front door test: the Python API (``cm3rt.generate``),
the CLI (``cm3rt generate`` / ``caption``) and, once it exists, the HTTP server.

``GOOD``: (name, model, API keyword arguments, CLI arguments); the same inputs must give
the same output whichever door they enter by. ``model`` is "default" (the embedded model,
no --model) or "tiny" (a tiny random model directory with its own bank).

``BAD``: (name, API keyword arguments or None, CLI arguments or None, exception type,
pattern). Every API call must raise that type with a message matching the pattern (it
names the argument); every CLI call must exit 1 with a one-line error matching it.
Placeholders in arguments: ``{tiny}`` (model dir), ``{bank}`` (its bank), ``{image}`` (an
image file), ``{out}`` (an output PNG path); ``IMAGE`` stands for a PIL image.
"""

from __future__ import annotations

import math

import torch

PROMPT = "a red star above a blue circle"
IMAGE = object()  # replaced by a PIL image (API) / "{image}" (CLI)

GOOD = [
    ("default_no_flags", "default", {}, []),
    ("default_plain", "default", {"k_docs": 0, "guidance": "none", "seed": 1},
     ["--k-docs", "0", "--guidance", "none", "--seed", "1"]),
    ("default_cdk", "default", {"guidance": "cdk", "seed": 2, "top_k": 20},
     ["--guidance", "cdk", "--seed", "2", "--top-k", "20"]),
    ("default_caption", "default", {"task": "image_to_text", "images": [IMAGE]}, []),
    ("tiny_builtin_defaults", "tiny", {"seed": 3}, ["--seed", "3"]),
    ("tiny_bank_without_k_docs", "tiny", {"bank": "{bank}", "seed": 4},
     ["--bank", "{bank}", "--seed", "4"]),
    ("tiny_max_doc_score_off", "tiny", {"bank": "{bank}", "max_doc_score": None, "seed": 7},
     ["--bank", "{bank}", "--max-doc-score", "none", "--seed", "7"]),
    ("tiny_cfg_n2", "tiny", {"guidance": "cfg", "cfg_scale": 1.5, "n": 2, "seed": 5},
     ["--guidance", "cfg", "--cfg-scale", "1.5", "-n", "2", "--seed", "5"]),
    ("tiny_edit", "tiny", {"images": [IMAGE], "guidance": "cfg3", "seed": 6},
     ["--image", "{image}", "--guidance", "cfg3", "--seed", "6"]),
    ("tiny_caption", "tiny", {"task": "image_to_text", "images": [IMAGE],
                              "max_new_tokens": 6, "temperature": 0.0}, []),
]

BAD = [
    ("image_not_an_image", {"images": ["not an image"]}, None, TypeError, r"images\[0\]"),
    ("image_file_missing", None, ["--image", "/nonexistent/in.png"], FileNotFoundError,
     r"--image: image file not found"),
    ("image_empty", {"images": ["EMPTY"]}, None, ValueError, r"images\[0\].*empty image"),
    ("prompt_lone_surrogate", {"prompt": "a red \udcff circle"}, ["a red \udcff circle"],
     ValueError, r"prompt.*not valid Unicode"),
    ("prompt_not_text", {"prompt": 42}, None, TypeError, r"argument 'prompt' must be a str"),
    ("prompt_item_not_text", {"prompt": ["a", 3]}, None, TypeError, r"prompt\[1\]"),
    ("prompt_empty", {"prompt": ""}, [""], ValueError, r"prompt.*empty"),
    ("prompt_blank", {"prompt": "   "}, ["   "], ValueError, r"prompt' is empty"),
    ("prompt_image_only", {"prompt": [], "images": ["IMAGE"], "task": "text_to_image"}, None,
     ValueError, r"prompt' has no text: text_to_image needs a description"),
    ("device_unknown", {"device": "tpu"}, ["--device", "tpu"], ValueError,
     r"device.*'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ("dtype_unknown", {"dtype": "float8"}, ["--dtype", "float8"], ValueError,
     r"dtype.*float32.*got 'float8'"),
    ("dtype_unsupported", {"dtype": torch.int8}, None, TypeError, r"dtype"),
    ("guidance_unknown", {"guidance": "cfgg"}, ["--guidance", "cfgg"], ValueError,
     r"guidance must be one of"),
    ("temperature_negative", {"temperature": -1.0}, ["--temperature", "-1"], ValueError,
     r"temperature"),
    ("top_p_zero", {"top_p": 0.0}, ["--top-p", "0"], ValueError, r"top_p must be in"),
    ("top_k_negative", {"top_k": -1}, ["--top-k", "-1"], ValueError, r"top_k must be >= 0"),
    ("n_zero", {"n": 0}, ["-n", "0"], ValueError, r"\bn must be >= 1"),
    ("n_too_many_streams", {"n": 100}, ["-n", "100"], ValueError, r"max_num_seqs"),
    ("seed_negative", {"seed": -1}, ["--seed", "-1"], ValueError, r"seed must be in"),
    ("max_new_tokens_zero", {"max_new_tokens": 0}, ["--max-new-tokens", "0"], ValueError,
     r"max_new_tokens must be >= 1"),
    ("cd_alpha_out_of_range", {"cd_alpha": 2.0}, ["--cd-alpha", "2"], ValueError,
     r"cd_alpha must be in \[0, 1\]"),
    ("cd_k_zero", {"cd_k": 0}, ["--cd-k", "0"], ValueError, r"cd_k must be >= 1"),
    ("cfg_scale_infinite", {"cfg_scale": math.inf}, ["--cfg-scale", "inf"], ValueError,
     r"cfg_scale must be finite"),
    ("sampling_typo", {"guidence": "cfg"}, None, TypeError, r"unknown sampling argument"),
    ("k_docs_negative", {"k_docs": -1}, ["--k-docs", "-1"], ValueError,
     r"k.docs'? must be an int >= 0"),
    ("k_docs_not_int", {"k_docs": "2"}, None, ValueError, r"k_docs' must be an int >= 0"),
    ("max_doc_score_out_of_range", {"max_doc_score": 2.0}, ["--max-doc-score", "2"],
     ValueError, r"max.doc.score'? must be None or a cosine similarity in \[-1, 1\]"),
    ("max_doc_score_not_a_number", {"max_doc_score": "high"}, None, ValueError,
     r"max_doc_score' must be None or a cosine similarity"),
    ("k_docs_without_bank", {"model": "{tiny}", "k_docs": 2},
     ["--model", "{tiny}", "--k-docs", "2"], ValueError, r"no bank was given"),
    ("bank_missing", {"bank": "/nonexistent/bank"}, ["--bank", "/nonexistent/bank"],
     FileNotFoundError, r"bank'? must be a memory bank directory"),
    ("bank_wrong_type", {"bank": 42}, None, TypeError, r"argument 'bank'"),
    ("model_missing", {"model": "/nonexistent/model"}, ["--model", "/nonexistent/model"],
     FileNotFoundError, r"model'? must be a model directory"),
    ("model_wrong_type", {"model": 3.5}, None, TypeError, r"argument 'model'"),
    ("task_unknown", {"task": "draw"}, ["--task", "draw"], ValueError,
     r"task.*one of .*got 'draw'"),
    ("task_edit_without_image", {"task": "edit"}, ["--task", "edit"], ValueError,
     r"task 'edit' needs an image"),
    ("cfg3_without_image", {"guidance": "cfg3"}, ["--guidance", "cfg3"], ValueError,
     r"cfg3.*needs an input image"),
    ("suffix_outside_infill", {"suffix": "x"}, ["--suffix", "x"], ValueError,
     r"suffix'? is for task 'infill' only"),
    ("scorer_not_callable", {"scorer": 42}, None, TypeError, r"scorer.*callable"),
    ("out_not_an_image_name", None, ["-o", "{out}.txt"], ValueError,
     r"-o/--out must name an image file"),
    ("out_directory_missing", None, ["-o", "/nonexistent/dir/x.png"], FileNotFoundError,
     r"-o/--out: directory"),
]
