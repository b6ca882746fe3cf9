"""``cm3rt serve``: an OpenAI-compatible HTTP server that streams images as they are drawn.

    loop.py      EngineLoop: one thread steps the Engine; handlers submit and read events
    app.py       the FastAPI routes (images/generations, images/edits, chat/completions,
                 models, health, ready, metrics, the playground page)
    protocol.py  request bodies and OpenAI-shaped errors
    images.py    PNG / base64 / uploads and partial images
    metrics.py   Prometheus metrics with vLLM's names under ``cm3rt:``
    server.py    uvicorn with a draining shutdown

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client, python-multipart).
"""
