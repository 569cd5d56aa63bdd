"""Embedding use cases: validate, tokenize, queue, pool, post-process. No HTTP here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, cast

import numpy as np
from numpy.typing import NDArray

from service.batching.batcher import PendingRequest
from service.core.cache import ResultCache
from service.core.registry import TAG_POOLED, TAG_TOKENS, TAG_UNIT, ServedModel
from service.core.tokens import check_token_ids
from service.engines.pooling import normalize as normalize_rows
from service.engines.tokenizer import TextOrPair, TokenizedItem
from service.errors import ApiError, ErrorKind

# Inputs up to this many characters in total are tokenized on the event loop: a thread hand-off
# costs more than tokenizing a few sentences.
INLINE_TOKENIZE_CHARS = 4096
# Like TEI: a cheap character pre-check before tokenizing, at this many characters per token.
MAX_CHARS_PER_TOKEN = 250

Input = str | list[int]
WaitHook = Callable[[PendingRequest], Awaitable[list[Any]]]


@dataclass
class Limits:
    max_client_batch_size: int
    auto_truncate: bool
    default_prompt: str | None = None
    default_prompt_name: str | None = None
    max_concurrent_requests: int = 512
    split_oversized_batches: bool = False
    max_input_characters: int | None = None
    queue_timeout_seconds: float | None = None


@dataclass
class Timings:
    """Milliseconds spent per phase, reported in TEI's x-* headers and in metrics."""

    started: float = field(default_factory=time.perf_counter)
    tokenization: float = 0.0
    queue: float = 0.0
    inference: float = 0.0

    @property
    def total(self) -> float:
        return (time.perf_counter() - self.started) * 1000


@dataclass
class Usage:
    items: int
    tokens: int
    characters: int
    truncated: int = 0


@dataclass
class EmbedResult:
    vectors: NDArray[np.float32]
    usage: Usage
    timings: Timings


@dataclass
class TokenEmbeddingsResult:
    tokens: list[NDArray[np.float32]]
    usage: Usage
    timings: Timings


def resolve_prompt(model: ServedModel, limits: Limits, prompt_name: str | None) -> str:
    if prompt_name is not None:
        prompts = model.manifest.prompts
        if prompt_name not in prompts:
            known = ", ".join(sorted(prompts)) or "none"
            raise ApiError(ErrorKind.VALIDATION,
                           f"prompt_name '{prompt_name}' is not a prompt of this model (prompts: {known})",
                           param="prompt_name")
        return prompts[prompt_name]
    if limits.default_prompt is not None:
        return limits.default_prompt
    if limits.default_prompt_name is not None:
        return model.manifest.prompts.get(limits.default_prompt_name, "")
    if model.manifest.default_prompt_name:
        return model.manifest.prompts.get(model.manifest.default_prompt_name, "")
    return ""


def check_count(count: int, limits: Limits, field_name: str = "inputs") -> None:
    if count == 0:
        raise ApiError(ErrorKind.EMPTY, f"`{field_name}` cannot be empty", param=field_name)
    if count > limits.max_client_batch_size and not limits.split_oversized_batches:
        raise ApiError(ErrorKind.VALIDATION,
                       f"batch size {count} > maximum allowed batch size {limits.max_client_batch_size}",
                       param=field_name)


async def tokenize(model: ServedModel, items: Sequence[TextOrPair | list[int]], truncate: bool,
                   direction: Literal["right", "left"], executor: Executor | None,
                   timings: Timings, max_characters: int | None = None) -> tuple[list[TokenizedItem], Usage]:
    """Tokenize inputs (token-id inputs pass through), enforcing the model's max length."""
    start = time.perf_counter()
    max_length = model.manifest.max_length
    limit = max_characters or (None if truncate else max_length * MAX_CHARS_PER_TOKEN)
    texts: list[TextOrPair] = []
    positions: list[int] = []
    tokenized: list[TokenizedItem | None] = [None] * len(items)
    characters = 0
    for position, item in enumerate(items):
        if isinstance(item, list):
            if not item:
                raise ApiError(ErrorKind.EMPTY, "token id inputs cannot be empty")
            check_token_ids(model, item)
            ids = item
            if len(ids) > max_length:
                if not truncate:
                    raise ApiError(ErrorKind.VALIDATION, f"`inputs` must have less than {max_length} tokens. "
                                   f"Given: {len(ids)}")
                ids = ids[:max_length] if direction == "right" else ids[-max_length:]
            tokenized[position] = TokenizedItem(ids=ids, type_ids=[0] * len(ids), truncated=len(ids) < len(item))
            continue
        length = len(item[0]) + len(item[1]) if isinstance(item, tuple) else len(item)
        characters += length
        if limit is not None and length > limit:
            raise ApiError(ErrorKind.VALIDATION, f"`inputs` must have less than {limit} characters")
        texts.append(item)
        positions.append(position)
    result: list[TokenizedItem]
    if texts:
        tokenizer = model.bundle.tokenizer
        try:
            if characters <= INLINE_TOKENIZE_CHARS or executor is None:
                encoded = tokenizer.encode(texts, truncate=truncate, direction=direction)
            else:
                encoded = await asyncio.get_running_loop().run_in_executor(
                    executor, partial(tokenizer.encode, texts, truncate=truncate, direction=direction))
        except Exception as error:  # tokenizers raises its own exception type for bad input
            raise ApiError(ErrorKind.TOKENIZER, f"tokenization failed: {error}") from None
        if len(texts) == len(items):  # texts only, the usual request
            result = encoded
        else:
            for position, encoding in zip(positions, encoded, strict=True):
                tokenized[position] = encoding
            result = cast(list[TokenizedItem], tokenized)
    else:
        result = cast(list[TokenizedItem], tokenized)
    tokens = truncated = 0
    for encoded_item in result:
        length = len(encoded_item.ids)
        if length > max_length:
            raise ApiError(ErrorKind.VALIDATION,
                           f"`inputs` must have less than {max_length} tokens. Given: {length}")
        tokens += length
        truncated += encoded_item.truncated
    timings.tokenization = (time.perf_counter() - start) * 1000
    usage = Usage(items=len(result), tokens=tokens, characters=characters, truncated=truncated)
    return result, usage


class Admission:
    """Hold one of the model's request slots from arrival to answer; refuse at once when none is free.

    The slot is taken before tokenization, so a flood of large requests cannot slip past the limit
    while it is being tokenized. (A class, not a generator: entered and left once per request.)
    """

    __slots__ = ("ticket",)

    def __init__(self, model: ServedModel, limits: Limits) -> None:
        if model.in_flight >= limits.max_concurrent_requests:
            raise ApiError(ErrorKind.OVERLOADED, "Model is overloaded", retry_after=1)
        self.ticket = _Ticket(model)

    def __enter__(self) -> _Ticket:
        model = self.ticket.model
        model.in_flight += 1
        assert model.batcher is not None
        model.batcher.announce()
        return self.ticket

    def __exit__(self, *exc_info: object) -> None:
        self.ticket.model.in_flight -= 1
        self.ticket.withdraw()


class _Ticket:
    """Whether an admitted request has handed its items to the batcher yet."""

    __slots__ = ("model", "submitted")

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self.submitted = False

    def withdraw(self) -> None:
        """Tell the batcher this request will submit nothing (more), unless it already has."""
        if not self.submitted:
            self.submitted = True
            assert self.model.batcher is not None
            self.model.batcher.withdraw()


async def _within_deadline(pending: PendingRequest, timeout: float) -> None:
    """Drop the request if none of its items has started computing when the deadline passes."""
    await asyncio.sleep(timeout)
    if pending.first_batch_started is None and not pending.future.done():
        pending.cancel()
        pending.future.set_exception(ApiError(ErrorKind.OVERLOADED, f"the request waited more than {timeout:g} s "
                                              "in the queue and was dropped", retry_after=1))


async def run(ticket: _Ticket, items: list[TokenizedItem], tag: str, timings: Timings,
              wait: WaitHook | None, queue_timeout: float | None = None) -> list[Any]:
    assert ticket.model.batcher is not None
    announced = not ticket.submitted  # a request's second submission (see _run_remembered) was never announced
    ticket.submitted = True
    pending = ticket.model.batcher.submit(items, tag, announced=announced)
    deadline = asyncio.ensure_future(_within_deadline(pending, queue_timeout)) if queue_timeout else None
    try:
        results = await (wait(pending) if wait is not None else pending.future)
    finally:
        if deadline is not None:
            deadline.cancel()
        if not pending.future.done():
            pending.cancel()
    timings.queue = pending.queue_seconds * 1000
    timings.inference = pending.inference_seconds * 1000
    return results


async def process(model: ServedModel, inputs: Sequence[TextOrPair | list[int]], tag: str, *, limits: Limits,
                  truncate: bool | None, direction: Literal["right", "left"], executor: Executor | None,
                  wait: WaitHook | None) -> tuple[list[Any], Usage, Timings]:
    """Admit, tokenize and run a request's inputs on the model's batcher; one result per input."""
    timings = Timings()
    cache = model.cache if tag != TAG_TOKENS else None  # per-token states are too large to keep
    with Admission(model, limits) as ticket:
        items, usage = await tokenize(model, inputs, limits.auto_truncate if truncate is None else truncate,
                                      direction, executor, timings, limits.max_input_characters)
        if cache is None:
            rows = await run(ticket, items, tag, timings, wait, limits.queue_timeout_seconds)
        else:
            rows = await _run_remembered(cache, ticket, items, tag, timings, wait, limits.queue_timeout_seconds)
    return rows, usage, timings


async def _run_remembered(cache: ResultCache, ticket: _Ticket, items: list[TokenizedItem], tag: str,
                          timings: Timings, wait: WaitHook | None, queue_timeout: float | None) -> list[Any]:
    """`run` for the inputs the cache does not hold, each once: a request it holds whole never reaches the
    batcher, and an input another request is computing right now is waited for instead of computed again."""
    keys = [cache.key(item, tag) for item in items]
    rows: list[Any] = [cache.get(key) for key in keys]
    own: dict[Hashable, list[int]] = {}  # each new input once, however often the request repeats it
    shared: dict[Hashable, tuple[asyncio.Future[Any], list[int]]] = {}
    for position, row in enumerate(rows):
        if row is not None:
            continue
        key = keys[position]
        if key in own:
            own[key].append(position)
        elif key in shared:
            shared[key][1].append(position)
        elif (computing := cache.computing.get(key)) is not None:
            shared[key] = (computing, [position])
        else:
            own[key] = [position]
    if own:
        await _compute(cache, ticket, items, own, rows, tag, timings, wait, queue_timeout)
    if not shared:
        return rows
    ticket.withdraw()  # nothing of its own to submit now: the batcher must not wait for it
    again: dict[Hashable, list[int]] = {}
    for key, (computing, positions) in shared.items():
        try:
            row = await asyncio.shield(computing)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not computing.cancelled() or (task is not None and task.cancelling()):
                raise  # this request was cancelled, not the one computing the input
            again[key] = positions  # that request failed or left: compute it here
            continue
        for position in positions:
            rows[position] = row
    if again:
        await _compute(cache, ticket, items, again, rows, tag, timings, wait, queue_timeout)
    return rows


async def _compute(cache: ResultCache, ticket: _Ticket, items: list[TokenizedItem], wanted: dict[Hashable, list[int]],
                   rows: list[Any], tag: str, timings: Timings, wait: WaitHook | None,
                   queue_timeout: float | None) -> None:
    """Run one item per key in `wanted`, remember each result and fill in every position that asked for it;
    other requests wanting the same inputs meanwhile wait on `cache.computing`."""
    loop = asyncio.get_running_loop()
    futures: dict[Hashable, asyncio.Future[Any]] = {}
    for key in wanted:
        futures[key] = cache.computing[key] = loop.create_future()
    try:
        first = [positions[0] for positions in wanted.values()]
        computed = await run(ticket, items if len(first) == len(items) else [items[p] for p in first], tag,
                             timings, wait, queue_timeout)
        for (key, positions), row in zip(wanted.items(), computed, strict=True):
            cache.put(key, row)
            futures[key].set_result(row)
            for position in positions:
                rows[position] = row
    finally:
        for key, future in futures.items():
            if cache.computing.get(key) is future:
                del cache.computing[key]
            if not future.done():
                future.cancel()  # the requests waiting on it compute the input themselves


def _with_prompt(inputs: Sequence[Input], prompt: str) -> list[Input]:
    if not prompt:
        return list(inputs)
    return [prompt + item if isinstance(item, str) else item for item in inputs]


async def embed(model: ServedModel, inputs: Sequence[Input], *, limits: Limits, normalize: bool = True,
                truncate: bool | None = None, direction: Literal["right", "left"] = "right",
                prompt_name: str | None = None, dimensions: int | None = None,
                executor: Executor | None = None, wait: WaitHook | None = None) -> EmbedResult:
    """Sentence embeddings for `inputs`, in order; `dimensions` truncates, then re-normalizes."""
    check_count(len(inputs), limits)
    if dimensions is not None:
        if dimensions <= 0:
            raise ApiError(ErrorKind.VALIDATION, "`dimensions` should be positive", param="dimensions")
        if dimensions > model.manifest.dimensions:
            raise ApiError(ErrorKind.VALIDATION, f"`dimensions` {dimensions} is larger than the model's "
                           f"{model.manifest.dimensions}", param="dimensions")
    prompted = _with_prompt(inputs, resolve_prompt(model, limits, prompt_name))
    shortened = dimensions is not None and dimensions < model.manifest.dimensions
    # full-length unit vectors are normalized by the worker, once per batch; shortened ones after the cut
    tag = TAG_UNIT if normalize and not shortened else TAG_POOLED
    rows, usage, timings = await process(model, prompted, tag, limits=limits, truncate=truncate,
                                         direction=direction, executor=executor, wait=wait)
    # one row (the common single-text request) needs no stacking
    vectors = (rows[0][None, :] if len(rows) == 1 else np.stack(rows)).astype(np.float32, copy=False)
    if shortened:
        vectors = np.ascontiguousarray(vectors[:, :dimensions])
        if normalize:
            vectors = normalize_rows(vectors)
    return EmbedResult(vectors, usage, timings)  # finite: the worker checked each pass


async def embed_tokens(model: ServedModel, inputs: Sequence[Input], *, limits: Limits,
                       truncate: bool | None = None, direction: Literal["right", "left"] = "right",
                       prompt_name: str | None = None, executor: Executor | None = None,
                       wait: WaitHook | None = None) -> TokenEmbeddingsResult:
    """Per-token hidden states (no pooling) for each input."""
    check_count(len(inputs), limits)
    prompted = _with_prompt(inputs, resolve_prompt(model, limits, prompt_name))
    rows, usage, timings = await process(model, prompted, TAG_TOKENS, limits=limits, truncate=truncate,
                                         direction=direction, executor=executor, wait=wait)
    return TokenEmbeddingsResult(rows, usage, timings)


def cosine_to_first(vectors: NDArray[np.float32]) -> list[float]:
    """Cosine similarity of rows 1.. to row 0."""
    normed = normalize_rows(vectors)
    return [float(value) for value in normed[1:] @ normed[0]]
