"""Start LLM servers for the proxy tests as real processes on 127.0.0.1: the scripted stub, and
llama.cpp's OpenAI-compatible server from llama-cpp-python."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers.server import free_port, spawn_logged, wait_until_up

HELPERS = Path(__file__).parent
ROOT = HELPERS.parents[1]


@dataclass
class Upstream:
    url: str  # OpenAI base URL, .../v1
    process: subprocess.Popen[bytes]
    log: Path

    def events(self) -> list[dict[str, object]]:
        result: list[dict[str, object]] = httpx.get(self.url.removesuffix("/v1") + "/events", timeout=5).json()
        return result

    def event(self, request_id: str) -> dict[str, object]:
        return next(event for event in self.events() if event["request_id"] == request_id)


@contextmanager
def _process(command: list[str], port: int, log_dir: Path, timeout: float) -> Iterator[Upstream]:
    process, log = spawn_logged(command, log_dir, f"upstream-{port}")
    upstream = Upstream(f"http://127.0.0.1:{port}/v1", process, log)
    try:
        wait_until_up(process, upstream.url + "/models", log, timeout)
        yield upstream
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@contextmanager
def stub_upstream(log_dir: Path, port: int | None = None) -> Iterator[Upstream]:
    port = port or free_port()
    with _process([sys.executable, str(HELPERS / "llm_stub.py"), str(port)], port, log_dir, 30) as upstream:
        yield upstream


def llama_python() -> Path:
    """The Python of the virtual environment holding llama-cpp-python (`make llama-backend` builds
    .venv-llama). Under `make test` a missing one fails the test; elsewhere it is skipped."""
    path = Path(os.environ.get("EMBEDRANK_LLAMA_PYTHON", ROOT / ".venv-llama" / "bin" / "python"))
    probe = subprocess.run([str(path), "-c", "import llama_cpp.server, gguf"], capture_output=True) \
        if path.exists() else None
    if probe is None or probe.returncode != 0:
        message = f"llama-cpp-python not found at {path}: run `make llama-backend`"
        if os.environ.get("EMBEDRANK_REQUIRE_BACKENDS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@contextmanager
def llama_cpp_upstream(log_dir: Path, context: int = 4096) -> Iterator[Upstream]:
    python = llama_python()
    model = log_dir / "tiny-llama.gguf"
    log_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(python), str(HELPERS / "tiny_gguf.py"), str(model)], check=True)
    port = free_port()
    command = [str(python), "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(context), "--n_threads", "1", "--model_alias", "tiny-llama"]
    with _process(command, port, log_dir, 60) as upstream:
        yield upstream
