"""Rerank and classify use cases. No HTTP here.

Cross-encoders score (query, document) pairs: each pair is one item on the model's batcher, so the
pairs of concurrent requests share forward passes. An embedding model can rerank too: its score is
the cosine between the query's and each document's embedding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from service.core.embed import Limits, Timings, Usage, WaitHook, check_count, embed, process
from service.core.registry import TAG_LOGITS, ServedModel
from service.engines.pooling import sigmoid, softmax
from service.engines.tokenizer import TextOrPair
from service.errors import ApiError, ErrorKind


@dataclass
class RerankResult:
    """Scores in document order, and how the documents were cut to fit."""

    scores: NDArray[np.float32]
    usage: Usage
    timings: Timings

    def ranking(self, top_n: int | None = None) -> list[int]:
        """Document indexes by descending score; ties keep document order (stable sort)."""
        order = [int(index) for index in np.argsort(-self.scores, kind="stable")]
        return order if top_n is None else order[:top_n]


@dataclass
class Prediction:
    label: str
    score: float


def check_top_n(top_n: int | None) -> None:
    if top_n is not None and top_n < 1:
        raise ApiError(ErrorKind.VALIDATION, f"`top_n` must be at least 1 (got {top_n})", param="top_n")


def _finite(scores: NDArray[np.float32]) -> NDArray[np.float32]:
    if not np.isfinite(scores).all():
        raise ApiError(ErrorKind.BACKEND, "the model produced a score that is not a number (NaN or infinity)")
    return scores


def cut_documents(model: ServedModel, documents: Sequence[str], max_tokens: int) -> tuple[list[str], int]:
    """Shorten each document to its first `max_tokens` tokens, cutting the text at a token boundary."""
    if max_tokens < 1:
        raise ApiError(ErrorKind.VALIDATION, "`max_tokens_per_doc` must be at least 1", param="max_tokens_per_doc")
    cut: list[str] = []
    shortened = 0
    encodings = model.bundle.tokenizer.encode_raw(list(documents), add_special_tokens=False)
    for document, encoding in zip(documents, encodings, strict=True):
        if len(encoding.ids) > max_tokens:
            cut.append(document[: encoding.offsets[max_tokens - 1][1]])
            shortened += 1
        else:
            cut.append(document)
    return cut, shortened


async def rerank(model: ServedModel, query: str, documents: Sequence[str], *, limits: Limits,
                 raw_scores: bool = False, truncate: bool | None = None,
                 direction: Literal["right", "left"] = "right", max_tokens_per_doc: int | None = None,
                 executor: Executor | None = None, wait: WaitHook | None = None,
                 field_name: str = "texts") -> RerankResult:
    """Relevance of each document to the query, in document order."""
    check_count(len(documents), limits, field_name)
    if not query.strip():
        raise ApiError(ErrorKind.EMPTY, "`query` cannot be empty", param="query")
    pre_cut = 0
    if max_tokens_per_doc is not None:
        documents, pre_cut = cut_documents(model, documents, max_tokens_per_doc)
    if model.task == "embed":
        return await _rerank_by_embeddings(model, query, documents, limits, truncate, direction, executor, wait,
                                           pre_cut)
    if model.task != "rerank":
        raise ApiError(ErrorKind.WRONG_TASK, f"model '{model.name}' is not a re-ranker model")
    pairs: list[TextOrPair] = [(query, document) for document in documents]
    logits, usage, timings = await process(model, pairs, TAG_LOGITS, limits=limits, truncate=truncate,
                                           direction=direction, executor=executor, wait=wait)
    raw = np.array([row[0] for row in logits], dtype=np.float32)
    usage.truncated += pre_cut
    return RerankResult(_finite(raw if raw_scores else sigmoid(raw)), usage, timings)


async def _rerank_by_embeddings(model: ServedModel, query: str, documents: Sequence[str], limits: Limits,
                                truncate: bool | None, direction: Literal["right", "left"],
                                executor: Executor | None, wait: WaitHook | None, pre_cut: int) -> RerankResult:
    """Cosine between query and document embeddings, with the model's query/document prompts if it has them."""
    prompts = model.manifest.prompts
    query_prompt = prompts.get("query", "")
    document_prompt = prompts.get("document", prompts.get("passage", ""))
    inputs = [query_prompt + query, *[document_prompt + document for document in documents]]
    one_more = dataclasses.replace(limits, max_client_batch_size=limits.max_client_batch_size + 1, default_prompt="",
                                   default_prompt_name=None)
    result = await embed(model, inputs, limits=one_more, normalize=True, truncate=truncate, direction=direction,
                         executor=executor, wait=wait)
    scores = result.vectors[1:] @ result.vectors[0]
    result.usage.truncated += pre_cut
    return RerankResult(_finite(np.asarray(scores, dtype=np.float32)), result.usage, result.timings)


async def classify(model: ServedModel, inputs: Sequence[TextOrPair], *, limits: Limits, raw_scores: bool = False,
                   truncate: bool | None = None, direction: Literal["right", "left"] = "right",
                   executor: Executor | None = None,
                   wait: WaitHook | None = None) -> tuple[list[list[Prediction]], Usage, Timings]:
    """Every label with its score for each input, best first: softmax over labels (sigmoid for a single
    label), or the raw logits with `raw_scores`."""
    check_count(len(inputs), limits)
    if model.task not in ("classify", "rerank"):
        raise ApiError(ErrorKind.WRONG_TASK, f"model '{model.name}' is not a classifier model")
    rows, usage, timings = await process(model, inputs, TAG_LOGITS, limits=limits, truncate=truncate,
                                         direction=direction, executor=executor, wait=wait)
    logits = np.stack(rows).astype(np.float32)
    labels = model.manifest.labels
    if raw_scores:
        scores = logits
    elif len(labels) == 1:
        scores = sigmoid(logits)
    else:
        scores = softmax(logits)
    _finite(scores)
    predictions = []
    for row in scores:
        order = np.argsort(-row, kind="stable")
        predictions.append([Prediction(labels[index], float(row[index])) for index in order])
    return predictions, usage, timings
