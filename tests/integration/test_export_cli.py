"""The export command line: exit codes and messages, run as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import tiny_models


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporters", *args], capture_output=True, text=True, timeout=600)


def test_missing_directory_is_bad_input(tmp_path: Path) -> None:
    result = _run(str(tmp_path / "nope"), "--name", "x", "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert not (tmp_path / "out" / "x").exists()


def test_unsupported_architecture_names_what_is_supported(tmp_path: Path) -> None:
    source = tiny_models.unsupported_model(tmp_path / "gpt2")
    result = _run(str(source), "--name", "x", "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "gpt2" in result.stderr and "XLM-RoBERTa" in result.stderr and "MPNet" in result.stderr


def test_unwritable_output_directory(tmp_path: Path, bge_style_source: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = _run(str(bge_style_source), "--name", "x", "--output", str(blocker / "models"))
    assert result.returncode == 2
    assert "output directory" in result.stderr


def test_successful_cli_export_prints_summary(tmp_path: Path, bge_style_source: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "service.cli", "export", str(bge_style_source), "--name", "cli",
                             "--output", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "float32" in result.stdout and "ms per batch" in result.stdout
    for stage in ("load", "export", "optimize", "quantize", "verify"):
        assert stage in result.stderr
    assert (tmp_path / "cli" / "manifest.json").is_file()


def test_no_packed_tokens_keeps_one_padded_int8_graph(tmp_path: Path, bge_style_source: Path) -> None:
    import json

    import onnx

    result = _run(str(bge_style_source), "--name", "padded", "--output", str(tmp_path), "--int8", "--force",
                  "--no-packed-tokens", "--no-packed-float32")
    assert result.returncode == 0, result.stderr
    assert "packed tokens" not in result.stderr
    variants = json.loads((tmp_path / "padded" / "manifest.json").read_text())["variants"]
    assert variants["int8"]["quantization"]["packed_tokens"] is None
    for record in variants.values():
        assert record["padded_file"] is None and record["packed_tokens"] == 0
        graph = onnx.load(str(tmp_path / "padded" / record["file"])).graph
        assert "NonZero" not in {node.op_type for node in graph.node}
    assert sorted(path.name for path in (tmp_path / "padded").glob("*.onnx")) == ["model.onnx", "model_int8.onnx"]


def test_packed_float32_through_the_cli(tmp_path: Path, bge_style_source: Path) -> None:
    import json

    result = _run(str(bge_style_source), "--name", "packed", "--output", str(tmp_path))  # packed by default
    assert result.returncode == 0, result.stderr
    assert "fp32 packed tokens: 2 layers" in result.stderr
    fp32 = json.loads((tmp_path / "packed" / "manifest.json").read_text())["variants"]["float32"]
    assert fp32["packed_tokens"] == 2 and fp32["padded_file"] is None and fp32["passed"]
