"""Start `vllm serve` as users do (console script, spawned engine processes, real HTTP on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import requests

# The console script beside this interpreter (a venv), else the one on PATH (the GPU machine's /tmp/site/bin).
VLLM = str(Path(sys.executable).with_name("vllm")) if Path(sys.executable).with_name("vllm").exists() \
    else shutil.which("vllm") or "vllm"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model: Path, *args: str, log: Path, timeout: float = 300,
                env: dict[str, str] | None = None) -> Iterator[str]:
    """Yield the base URL of a healthy server; stop it (its whole process group) afterwards."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **(env or {})}
    with open(log, "w") as log_file:
        process = subprocess.Popen([VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args],
                                   stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not healthy after {timeout} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def failed_start(model: Path, *args: str, timeout: float = 300) -> tuple[int, str]:
    """Run `vllm serve` expecting it to refuse to start; (exit code, output). A server that starts instead runs
    into the timeout, is killed, and fails the test."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    process = subprocess.Popen([VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", str(free_port()), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"vllm serve {model} did not refuse to start within {timeout} s") from None
    return process.returncode, output
