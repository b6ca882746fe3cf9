"""``cm3rt serve``: the OpenAI-compatible HTTP server (cm3rt.serve).

    cm3rt serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    cm3rt serve --replicas N      # N engines as Ray Serve replicas (cm3rt.serve.replicas)
"""

from __future__ import annotations

import argparse
import os

from cm3rt.cli.generate import add_tensor_parallel_argument


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "serve", help="serve the model over HTTP (OpenAI-compatible routes)",
        description="Serve /v1/images/generations (SSE partial images), /v1/images/edits, "
                    "/v1/chat/completions, /v1/models, /health, /ready, /metrics and a "
                    "playground page at /. Without --model: the embedded default model.")
    s.add_argument("--model", default=None, metavar="DIR", help="model directory")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("CM3RT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes "
                        "(default: $CM3RT_API_KEY; none: open)")
    s.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    s.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or int8 (weight-only, "
                   "quantised at load; activations bfloat16, float32 on CPUs without "
                   "AVX512_BF16)")
    add_tensor_parallel_argument(s)
    s.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="N engines as Ray Serve replicas behind Ray's HTTP proxy, routed by "
                        "prompt-prefix affinity (needs ray[serve])")
    s.add_argument("--imbalanced-threshold", type=float, default=8.0, metavar="Q",
                   help="with --replicas: while replica queues differ by more than Q "
                        "requests, route by power of two choices instead of affinity")
    s.add_argument("--max-queued", type=int, default=256,
                   help="samples in flight at most (an n > 1 request counts n); past it: 503")
    s.add_argument("--max-body-bytes", type=int, default=8 << 20,
                   help="largest request body (default 8 MiB); past it: 413")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests before exiting")
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients name (default: cm3rt-default or the dir name)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        from cm3rt.serve.app import ServeConfig
        from cm3rt.serve.server import serve
    except ModuleNotFoundError as exc:
        raise ImportError(f"cm3rt serve needs {exc.name}: pip install -e '.[serve]'") from exc
    for name in ("port", "max_queued", "max_body_bytes", "replicas", "tensor_parallel_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    config = ServeConfig(model=args.model, device=args.device, dtype=args.dtype,
                         api_key=args.api_key, max_queued=args.max_queued,
                         max_body_bytes=args.max_body_bytes,
                         served_model_name=args.served_model_name,
                         shutdown_timeout=args.shutdown_timeout,
                         tensor_parallel_size=args.tensor_parallel_size)
    if args.replicas > 1:
        try:
            from cm3rt.serve.replicas import serve_replicas
        except ModuleNotFoundError as exc:
            raise ImportError(f"cm3rt serve --replicas needs {exc.name}: pip install "
                              "'ray[serve]'") from exc
        serve_replicas(config, args.replicas, args.host, args.port, args.imbalanced_threshold)
        return 0
    serve(config, host=args.host, port=args.port, log_level=args.log_level)
    return 0
