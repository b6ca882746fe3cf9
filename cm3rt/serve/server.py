"""Run the app under uvicorn, with a draining shutdown.

SIGTERM (or SIGINT) first stops admission (new requests get 503, /ready turns 503), waits
up to ``shutdown_timeout`` seconds for the requests in flight to finish, then lets uvicorn
exit (status 0). A second signal exits at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import uvicorn

from cm3rt.serve.app import ServeConfig, create_app

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout
        self._draining = False

    def handle_exit(self, sig: int, frame) -> None:
        loop = getattr(self.config.app.state, "loop", None)
        if self._draining or loop is None or sig not in (signal.SIGTERM, signal.SIGINT):
            return super().handle_exit(sig, frame)
        self._draining = True
        loop.draining = True
        log.info("draining: %d samples in flight, %.0f s at most", loop.in_flight,
                 self.shutdown_timeout)
        threading.Thread(target=self._drain, args=(loop,), daemon=True).start()

    def _drain(self, loop) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while loop.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if loop.in_flight:
            log.warning("shutdown timeout: %d samples still in flight", loop.in_flight)
        self.should_exit = True


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Serve until a signal ends it (see the module docstring)."""
    app = create_app(config)
    uv = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                        timeout_graceful_shutdown=1, access_log=False)
    DrainingServer(uv, config.shutdown_timeout).run()
