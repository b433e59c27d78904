"""Start a real `zamba2 serve` process on a free loopback port and wait for it (tests, bench/serve_load.py)."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]  # the checkout, for PYTHONPATH


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder, name, *flags, env: dict | None = None):
    """Start `zamba2 serve` on `folder` and wait until /health answers; returns (process, base url).
    `output(process)` reads what it printed so far."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: nobody reads it while the server runs
    named = ["--served-model-name", name] if name is not None else []  # None: the server's default name
    proc = subprocess.Popen([sys.executable, "-m", "zamba2", "serve", "--model", str(folder), "--port", str(port),
                             *named, *flags], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited: {log.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not come up in 60 s")


def output(proc) -> str:
    """What a server started by `start_server` printed so far (stdout and stderr)."""
    fd = proc.log.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode()  # pread: the offset the server writes at stays put
