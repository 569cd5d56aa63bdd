"""The bundle manifest: the one description of an exported model that the server trusts.

The exporter writes it after verifying every variant; the server reads it and never re-derives
model facts (pooling, normalization, dimensions, labels) from the original checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "embedrank-bundle"
FORMAT_VERSION = 1

Task = Literal["embed", "rerank", "classify"]
TASKS: tuple[str, ...] = ("embed", "rerank", "classify")
POOLING_MODES: tuple[str, ...] = ("cls", "mean", "max", "mean_sqrt_len_tokens", "lasttoken", "weightedmean")
DENSE_ACTIVATIONS: tuple[str, ...] = ("identity", "tanh", "relu", "sigmoid", "gelu")
VARIANT_PRECISIONS: dict[str, str] = {"float32": "fp32", "int8": "int8", "float16": "fp16"}


class ManifestError(ValueError):
    """A bundle directory whose manifest is missing, malformed, or does not match its files."""


@dataclass
class DenseLayer:
    """A sentence-transformers Dense module applied after pooling: y = activation(x @ W.T + b)."""

    in_features: int
    out_features: int
    activation: str
    weight_file: str
    bias_file: str | None


@dataclass
class Variant:
    """One ONNX file of the bundle and the measurements that admitted it."""

    file: str
    sha256: str
    size_bytes: int
    precision: str
    opset: int
    graph_optimization: str
    parity: dict[str, float]
    bars: dict[str, float]
    passed: bool
    forced: bool = False
    ms_per_batch: dict[str, float] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    verified_on: list[str] = field(default_factory=lambda: ["cpu"])
    # Weight files beside `file` for models over protobuf's 2 GB limit, with their sha256.
    external_data: dict[str, str] = field(default_factory=dict)
    # The same model with padded tokens, where `file` computes its token-wise operators on real tokens only
    # (int8 "packed tokens"): the lone-pass session runs it, since a lone pass is mostly one text, which has
    # no padding to save, and there the packed int8 graph's extra operators cost 5-10%.
    padded_file: str | None = None
    padded_sha256: str = ""
    padded_size_bytes: int = 0
    packed_tokens: int = 0  # attention layers whose token-wise operators `file` runs on real tokens only


@dataclass
class Manifest:
    name: str
    task: str
    source: dict[str, Any]
    architecture: str
    model_type: str
    input_names: list[str]
    output_name: str
    hidden_size: int
    dimensions: int
    max_length: int
    pooling: str | None
    normalize: bool
    lowercase_input: bool
    dense_layers: list[DenseLayer]
    prompts: dict[str, str]
    default_prompt_name: str | None
    labels: list[str]
    tokenizer: dict[str, Any]
    variants: dict[str, Variant]
    refused_variants: dict[str, dict[str, Any]]
    exporter: dict[str, Any]
    created_at: str
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False, ensure_ascii=False) + "\n"

    @property
    def id2label(self) -> dict[str, str]:
        return {str(index): label for index, label in enumerate(self.labels)}

    def summary_rows(self) -> list[tuple[str, str, str, str]]:
        """(variant, size, parity, ms per batch) rows for terminal tables."""
        rows = []
        for variant_name, variant in self.variants.items():
            parity = ", ".join(f"{key}={value:.5g}" for key, value in variant.parity.items())
            timing = ", ".join(f"{key}={value:.1f}" for key, value in variant.ms_per_batch.items())
            mark = " (forced)" if variant.forced else ""
            rows.append((variant_name + mark, f"{variant.size_bytes / 1e6:.1f} MB", parity, timing))
        return rows


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise ManifestError(f"manifest field '{key}' is missing")
    value = data[key]
    if not isinstance(value, kind):
        raise ManifestError(f"manifest field '{key}' has the wrong type ({type(value).__name__})")
    return value


def parse_manifest(data: dict[str, Any]) -> Manifest:
    """Build a Manifest from decoded JSON, refusing unknown formats and inconsistent facts."""
    if data.get("format") != FORMAT_NAME:
        raise ManifestError(f"not an embedrank bundle manifest (format={data.get('format')!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"bundle format version {version} is not supported by this server (it reads {FORMAT_VERSION}); "
            "re-export the model with this version of embedrank"
        )
    task = _require(data, "task", str)
    if task not in TASKS:
        raise ManifestError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    pooling = data.get("pooling")
    if task == "embed" and pooling not in POOLING_MODES:
        raise ManifestError(f"embedding bundle has unsupported pooling {pooling!r}")
    dense_layers = []
    for raw in _require(data, "dense_layers", list):
        layer = DenseLayer(**raw)
        if layer.activation not in DENSE_ACTIVATIONS:
            raise ManifestError(f"unsupported Dense activation {layer.activation!r}")
        dense_layers.append(layer)
    variants = {name: Variant(**raw) for name, raw in _require(data, "variants", dict).items()}
    if not variants:
        raise ManifestError("bundle has no model variants")
    for name in variants:
        if name not in VARIANT_PRECISIONS:
            raise ManifestError(f"unknown variant {name!r}")
    fields = {key: data[key] for key in Manifest.__dataclass_fields__ if key in data}
    fields["dense_layers"] = dense_layers
    fields["variants"] = variants
    try:
        manifest = Manifest(**fields)
    except TypeError as error:
        raise ManifestError(f"manifest is incomplete: {error}") from None
    if task in ("rerank", "classify") and not manifest.labels:
        raise ManifestError("classification bundle has no labels")
    return manifest


def load_manifest(bundle_dir: Path, verify_files: bool = True) -> Manifest:
    """Read `bundle_dir/manifest.json`; with verify_files, check every variant file's size exists."""
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{bundle_dir} is not an embedrank bundle: {MANIFEST_FILE} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ManifestError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} does not hold a JSON object")
    manifest = parse_manifest(data)
    if verify_files:
        for name, variant in manifest.variants.items():
            file_path = bundle_dir / variant.file
            if not file_path.is_file():
                raise ManifestError(f"variant {name}: file {variant.file} is missing from {bundle_dir}")
            if file_path.stat().st_size != variant.size_bytes:
                raise ManifestError(f"variant {name}: {variant.file} has changed since export (size differs)")
            for data_file in variant.external_data:
                if not (bundle_dir / data_file).is_file():
                    raise ManifestError(f"variant {name}: weight file {data_file} is missing from {bundle_dir}")
            if variant.padded_file is not None:
                padded = bundle_dir / variant.padded_file
                if not padded.is_file():
                    raise ManifestError(f"variant {name}: file {variant.padded_file} is missing from {bundle_dir}")
                if padded.stat().st_size != variant.padded_size_bytes:
                    raise ManifestError(
                        f"variant {name}: {variant.padded_file} has changed since export (size differs)")
        if not (bundle_dir / manifest.tokenizer["file"]).is_file():
            raise ManifestError(f"tokenizer file {manifest.tokenizer['file']} is missing from {bundle_dir}")
    return manifest
