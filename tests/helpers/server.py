"""Start a real `embedrank serve` process on 127.0.0.1 and stop it afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(process: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; fail with the process's log if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not up in {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)


def spawn_logged(command: list[str], log_dir: Path, name: str,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    """Start `command` with stdout and stderr going to `log_dir/name.log`; return the process and log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    return process, log


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_server(args: list[str], log_dir: Path, env: dict[str, str] | None = None,
                   ready_timeout: float = 60.0) -> Iterator[RunningServer]:
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "serve", "--hostname", "127.0.0.1", "--port", str(port), *args]
    process, log = spawn_logged(command, log_dir, f"server-{port}", env)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until_up(process, server.url + "/health", log, ready_timeout)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
