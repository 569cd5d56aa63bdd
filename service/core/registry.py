"""Served models: a bundle, its engine and its batcher, looked up by name or alias."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.batching.batcher import BatchStats, DynamicBatcher
from service.core.cache import ResultCache
from service.core.manifest import Manifest
from service.engines.bundle import BundleModel
from service.engines.layout import ThreadLayout
from service.engines.pooling import normalize
from service.engines.tokenizer import TokenizedItem
from service.errors import ApiError, ErrorKind

TAG_POOLED = "pooled"
TAG_UNIT = "unit"  # pooled, then scaled to unit length: one operation per batch on the worker, not per request
TAG_TOKENS = "tokens"
TAG_LOGITS = "logits"

NON_FINITE = "the model produced non-finite values (NaN or infinity)"
# An embedding model can also rerank (cosine to the query); a reranker is a one-label classifier.
CAPABILITIES = {"embed": ["embed", "rerank"], "rerank": ["rerank", "classify"], "classify": ["classify"]}


@dataclass(eq=False)
class ServedModel:
    name: str
    bundle: BundleModel
    variant: str
    device: str
    aliases: list[str] = field(default_factory=list)
    batcher: DynamicBatcher | None = None
    in_flight: int = 0
    layout: ThreadLayout | None = None  # how its engine was set up to use the CPU (None: not chosen here)
    cache: ResultCache | None = None  # results remembered for repeated inputs (--result-cache-size)

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def bundle_dir(self) -> Path:
        return self.bundle.bundle_dir

    @property
    def capabilities(self) -> list[str]:
        return CAPABILITIES[self.task]

    def run_batch(self, items: list[TokenizedItem], tags: list[str], lone: bool = False) -> Sequence[Any]:
        """One forward pass (on the batcher's thread); one result per item, as its tag asks, or an `ApiError`
        for an embedding that came out non-finite. `lone`: no other pass runs or waits (the engine may then
        give it the whole machine)."""
        batch = self.bundle.tokenizer.pad(items)
        if self.task != "embed":
            return list(self.bundle.forward_logits(batch, lone))
        hidden = self.bundle.forward_tokens(batch, lone) if TAG_TOKENS in tags else None
        pooled = None
        if hidden is None:
            pooled = self.bundle.forward_pooled(batch, lone)
        elif TAG_POOLED in tags or TAG_UNIT in tags:
            pooled = self.bundle.pool_hidden(hidden, batch)
        unit = normalize(pooled) if pooled is not None and TAG_UNIT in tags else None
        results: list[Any]
        if hidden is None and (unit is None or TAG_POOLED not in tags):  # one kind of row: no per-row choice
            assert pooled is not None
            results = list(pooled if unit is None else unit)
        else:
            results = []
            for row, (item, tag) in enumerate(zip(items, tags, strict=True)):
                if tag == TAG_TOKENS:
                    assert hidden is not None
                    results.append(np.array(hidden[row, :len(item)], dtype=np.float32))
                else:
                    chosen = unit if tag == TAG_UNIT else pooled
                    assert chosen is not None
                    results.append(chosen[row])
        if pooled is not None:
            # Checked once for the whole pass: a finite pooled row stays finite when scaled or cut.
            finite = np.isfinite(pooled).all(axis=1)
            if not finite.all():
                for position in np.flatnonzero(~finite).tolist():
                    if tags[position] != TAG_TOKENS:
                        results[position] = ApiError(ErrorKind.BACKEND, NON_FINITE)
        return results

    def start(self, max_batch_tokens: int, max_batch_requests: int | None, on_batch: Any = None,
              workers: int = 1, nice: int = 0, overlap_tokens: int = 256, target_tokens: int | None = None,
              release_idle_seconds: float = 0.0, inline_tokens: int = 0, keep_requests_whole: bool = False) -> None:
        release = getattr(self.bundle.engine, "release_memory", None)
        self.batcher = DynamicBatcher(self.name, self.run_batch, max_batch_tokens, max_batch_requests, on_batch,
                                      workers=workers, nice=nice, overlap_tokens=overlap_tokens,
                                      target_tokens=target_tokens, on_idle=release, idle_seconds=release_idle_seconds,
                                      inline_tokens=inline_tokens, keep_requests_whole=keep_requests_whole)

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()


class ModelRegistry:
    """The models of this server, in the order they were given."""

    def __init__(self, models: list[ServedModel]) -> None:
        self.models = models
        self._capable: dict[str, list[ServedModel]] = {}  # per task; the models never change once served

    def names(self) -> list[str]:
        return [model.name for model in self.models]

    def get(self, name: str | None, task: str, surface_accepts_any: bool = False) -> ServedModel:
        """Find the model for a request.

        With a name: the model served under it (or an alias). Without one, or with a name this server
        does not know while exactly one model can do the task (as TEI and Infinity do with one
        model): the first model that can do the task.
        """
        # Models made for the task come first: a cross-encoder reranks before an embedder does.
        capable = self._capable.get(task)
        if capable is None:
            capable = self._capable[task] = sorted((model for model in self.models if task in model.capabilities),
                                                   key=lambda model: model.task != task)
        if name:
            for model in self.models:
                if name == model.name or name in model.aliases:
                    if task not in model.capabilities:
                        raise ApiError(ErrorKind.WRONG_TASK,
                                       f"model '{model.name}' is a {model.task} model and cannot {task}; "
                                       f"models that can: {', '.join(m.name for m in capable) or 'none'}",
                                       param="model")
                    return model
            if not (surface_accepts_any and len(capable) == 1):
                raise ApiError(ErrorKind.NOT_FOUND,
                               f"model '{name}' is not served here; served models: {', '.join(self.names())}",
                               param="model")
        if not capable:
            raise ApiError(ErrorKind.WRONG_TASK,
                           f"no served model can {task}; served: "
                           + ", ".join(f"{m.name} ({m.task})" for m in self.models))
        return capable[0]

    def pick(self, name: str | None, preferred_task: str) -> ServedModel:
        """For routes that work with any model (tokenize, decode, info, POST /): the model named, else the
        first that does `preferred_task`, else the first model."""
        if name:
            for model in self.models:
                if name == model.name or name in model.aliases:
                    return model
            raise ApiError(ErrorKind.NOT_FOUND,
                           f"model '{name}' is not served here; served models: {', '.join(self.names())}",
                           param="model")
        return next((model for model in self.models if model.task == preferred_task), self.models[0])

    def saturated(self, limit: int) -> bool:
        """Every model holds `limit` requests: no inference request can be admitted (so 429 at once)."""
        return bool(self.models) and all(model.in_flight >= limit for model in self.models)

    def stop(self) -> None:
        for model in self.models:
            model.stop()


def batch_observer(metrics: Any, model_name: str) -> Any:
    def observe(stats: BatchStats) -> None:
        metrics.observe_batch(model_name, stats)
    return observe
