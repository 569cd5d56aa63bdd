"""Resolve a source (local directory or hub id) and detect the model facts the manifest records."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from exporters.errors import ExportFailure, ExportInputError, MissingExtraError

# model_type -> family the ONNX exporter and the graph optimizer handle.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "bert": "BERT",
    "xlm-roberta": "XLM-RoBERTa",
    "roberta": "RoBERTa",
    "mpnet": "MPNet",
    "distilbert": "DistilBERT",
}
# Position ids of RoBERTa-style models start after the padding index, so two positions are unusable.
POSITION_OFFSET = {"xlm-roberta": 2, "roberta": 2, "mpnet": 2}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ACTIVATIONS = {
    "Identity": "identity",
    "Tanh": "tanh",
    "ReLU": "relu",
    "Sigmoid": "sigmoid",
    "GELU": "gelu",
}


@dataclass
class DenseWeights:
    weight: NDArray[np.float32]
    bias: NDArray[np.float32] | None
    activation: str


@dataclass
class SourceModel:
    """A checkpoint on local disk and everything detected about it."""

    directory: Path
    source_id: str
    revision: str | None
    task: str
    architecture: str
    model_type: str
    hidden_size: int
    max_length: int
    position_limit: int
    pooling: str | None
    normalize: bool
    lowercase_input: bool
    prompts: dict[str, str]
    default_prompt_name: str | None
    labels: list[str]
    dense: list[DenseWeights] = field(default_factory=list)
    sentence_transformers: bool = False

    @property
    def dimensions(self) -> int:
        if self.task != "embed":
            return len(self.labels)
        return int(self.dense[-1].weight.shape[0]) if self.dense else self.hidden_size


def _download(source: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingExtraError("huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id=source, revision=revision))
    except Exception as error:  # the hub client raises many error types for one cause: no download
        raise ExportFailure(
            f"could not download {source!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
            "Without network access, pass a local directory in Hugging Face layout instead."
        ) from None


def locate(source: str, revision: str | None) -> tuple[Path, str]:
    """Return the local directory for SOURCE, downloading hub ids; bad paths are input errors."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ExportInputError(f"{source} is a file; SOURCE must be a model directory or a hub id")
        return path.resolve(), str(path.resolve())
    looks_like_path = source.startswith(("/", ".", "~")) or source.count("/") != 1
    if looks_like_path or not _HUB_ID.match(source):
        raise ExportInputError(f"model directory {source} does not exist")
    return _download(source, revision), source


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ExportInputError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise ExportInputError(f"{path} does not hold a JSON object")
    return data


def _detect_task(config: dict[str, Any], has_modules: bool, requested: str) -> str:
    architectures = config.get("architectures") or []
    is_classifier = any(str(name).endswith("ForSequenceClassification") for name in architectures)
    num_labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 0) or 0)
    if requested != "auto":
        if requested in ("rerank", "classify") and not is_classifier:
            raise ExportInputError(
                f"--task {requested} needs a sequence-classification checkpoint; this one is "
                f"{', '.join(architectures) or 'a bare encoder'}"
            )
        return requested
    if is_classifier and not has_modules:
        return "rerank" if num_labels == 1 else "classify"
    return "embed"


def _pooling_from_config(pooling_config: dict[str, Any]) -> str:
    mode = pooling_config.get("pooling_mode")
    if isinstance(mode, str):
        return mode
    flags = [
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_max_tokens", "max"),
        ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
        ("pooling_mode_weightedmean_tokens", "weightedmean"),
        ("pooling_mode_lasttoken", "lasttoken"),
    ]
    chosen = [name for key, name in flags if pooling_config.get(key)]
    if len(chosen) != 1:
        raise ExportInputError(f"unsupported pooling configuration {pooling_config} (exactly one mode is supported)")
    return chosen[0]


def _sentence_transformers_facts(directory: Path) -> dict[str, Any]:
    """Load the sentence-transformers model to read pooling, Dense layers, prompts and max length."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise MissingExtraError("sentence-transformers") from None
    model = SentenceTransformer(str(directory), device="cpu", local_files_only=True)
    facts: dict[str, Any] = {
        "pooling": None, "normalize": False, "dense": [], "lowercase_input": False,
        "max_length": int(model.max_seq_length) if model.max_seq_length else None,
        "prompts": {k: v for k, v in (model.prompts or {}).items() if isinstance(v, str)},
        "default_prompt_name": model.default_prompt_name,
    }
    modules = list(model)
    for position, module in enumerate(modules):
        kind = type(module).__name__
        if position == 0:
            if kind != "Transformer":
                raise ExportInputError(f"sentence-transformers model starts with {kind}, expected Transformer")
            facts["lowercase_input"] = bool(getattr(module, "do_lower_case", False))
        elif kind == "Pooling":
            config = module.get_config_dict()
            if config.get("include_prompt") is False:
                raise ExportInputError("Pooling with include_prompt=false is not supported")
            facts["pooling"] = _pooling_from_config(config)
        elif kind == "Dense":
            activation_name = type(module.activation_function).__name__
            if activation_name not in _ACTIVATIONS:
                raise ExportInputError(f"Dense activation {activation_name} is not supported "
                                       f"(supported: {', '.join(_ACTIVATIONS)})")
            linear = module.linear
            facts["dense"].append(DenseWeights(
                weight=linear.weight.detach().cpu().float().numpy(),
                bias=None if linear.bias is None else linear.bias.detach().cpu().float().numpy(),
                activation=_ACTIVATIONS[activation_name],
            ))
        elif kind == "Normalize":
            facts["normalize"] = True
        else:
            raise ExportInputError(f"sentence-transformers module {kind} is not supported "
                                   "(supported after Transformer: Pooling, Dense, Normalize)")
    if facts["pooling"] is None:
        raise ExportInputError("sentence-transformers model has no Pooling module")
    return facts


def resolve(
    source: str,
    task: str = "auto",
    revision: str | None = None,
    max_length: int | None = None,
    pooling: str | None = None,
) -> SourceModel:
    directory, source_id = locate(source, revision)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ExportInputError(f"{directory} has no config.json: not a Hugging Face model directory")
    config = _read_json(config_path)
    model_type = str(config.get("model_type", ""))
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(f"{name} ({key})" for key, name in SUPPORTED_ARCHITECTURES.items())
        raise ExportInputError(
            f"architecture '{model_type or 'unknown'}' ({', '.join(config.get('architectures') or [])}) "
            f"is not supported; supported: {supported}"
        )
    has_modules = (directory / "modules.json").is_file()
    detected_task = _detect_task(config, has_modules, task)
    position_limit = int(config.get("max_position_embeddings", 512)) - POSITION_OFFSET.get(model_type, 0)
    if model_type == "distilbert":
        position_limit = int(config.get("max_position_embeddings", 512))
    hidden_size = int(config.get("hidden_size") or config.get("dim") or 0)

    facts: dict[str, Any] = {
        "pooling": None, "normalize": False, "dense": [], "lowercase_input": False,
        "max_length": None, "prompts": {}, "default_prompt_name": None,
    }
    if detected_task == "embed":
        if has_modules:
            facts = _sentence_transformers_facts(directory)
        else:
            facts["pooling"] = "mean"
        if pooling is not None:
            facts["pooling"] = pooling
    if facts["max_length"] is None:
        facts["max_length"] = _tokenizer_max_length(directory)
    detected_max = min(int(facts["max_length"] or position_limit), position_limit)
    if max_length is not None:
        if max_length < 8 or max_length > position_limit:
            raise ExportInputError(f"--max-length must be between 8 and {position_limit} for this model")
        detected_max = max_length

    labels: list[str] = []
    if detected_task in ("rerank", "classify"):
        id2label = config.get("id2label") or {}
        count = len(id2label) or int(config.get("num_labels", 1))
        labels = [str(id2label.get(str(index), id2label.get(index, f"LABEL_{index}"))) for index in range(count)]
        if detected_task == "rerank" and len(labels) != 1:
            raise ExportInputError(f"a reranker must have one output label; this model has {len(labels)}")

    return SourceModel(
        directory=directory,
        source_id=source_id,
        revision=revision or _git_revision(directory),
        task=detected_task,
        architecture=", ".join(config.get("architectures") or [model_type]),
        model_type=model_type,
        hidden_size=hidden_size,
        max_length=detected_max,
        position_limit=position_limit,
        pooling=facts["pooling"],
        normalize=bool(facts["normalize"]),
        lowercase_input=bool(facts["lowercase_input"]),
        prompts=dict(facts["prompts"]),
        default_prompt_name=facts["default_prompt_name"],
        labels=labels,
        dense=list(facts["dense"]),
        sentence_transformers=has_modules and detected_task == "embed",
    )


def _tokenizer_max_length(directory: Path) -> int | None:
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    value = _read_json(config_path).get("model_max_length")
    if isinstance(value, int | float) and 0 < value < 1_000_000:
        return int(value)
    return None


def _git_revision(directory: Path) -> str | None:
    """Hub snapshots live in .../snapshots/<commit>/; report that commit when present."""
    if directory.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", directory.name):
        return directory.name
    return None
