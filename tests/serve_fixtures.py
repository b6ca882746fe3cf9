"""Start the real ``cm3rt serve`` in a subprocess on a free 127.0.0.1 port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: str

    def log_text(self) -> str:
        return Path(self.log).read_text()

    def metrics(self) -> dict[str, float]:
        """``name{labels}`` -> value of every sample on /metrics (labels dropped)."""
        out: dict[str, float] = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
        return out

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start_server(tmp_path, *args: str, timeout: float = 240.0) -> Server:
    """``cm3rt serve ARGS`` on a free port; returns once /ready answers 200."""
    port = free_port()
    log = str(tmp_path / f"serve-{port}.log")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "passive"}
    env.pop("CM3RT_RAISE_STEP_ERRORS", None)  # serving behaviour: a failed step fails its requests
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "cm3rt", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), "--log-level", "warning", *args],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cm3rt serve exited {proc.returncode}:\n{server.log_text()}")
        try:
            if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"cm3rt serve did not become ready in {timeout} s:\n"
                       f"{server.log_text()}")
