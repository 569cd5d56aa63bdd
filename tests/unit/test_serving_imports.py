"""What the serving path imports: start-up time is a target, and every module imported costs it."""

from __future__ import annotations

import json
import subprocess
import sys

# What `embedrank serve` imports before it answers, for a server without --llm.
SERVING_MODULES = ("service.cli", "service.server", "service.app", "service.engines.ort_engine")


def _imported_after(modules: tuple[str, ...], watched: tuple[str, ...]) -> list[str]:
    code = (f"import importlib, json, sys\nfor name in {modules!r}: importlib.import_module(name)\n"
            f"print(json.dumps([name for name in {watched!r} if name in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout)


def test_a_server_without_llm_imports_neither_torch_nor_the_proxys_http_client() -> None:
    assert _imported_after(SERVING_MODULES, ("torch", "transformers", "httpx")) == []

