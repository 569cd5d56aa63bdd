"""DynamicBatcher: asyncio admission on the event loop, worker threads running the engine.

Requests are split into items; items wait in one queue per model. A worker takes the next batch
as soon as it is free. There is no fixed wait: a lone request runs at once. The only wait is for
requests already admitted and being tokenized (announced), bounded by `max_wait_seconds`, so that a
burst of requests forms one full batch, not several small ones. Each request learns its result
through one asyncio future, resolved from the worker with `call_soon_threadsafe` once its last
item is done (one call for all the requests a pass finishes). An item whose output the batch runner
returns as an `ApiError` fails its own request only.
A failed forward pass fails the requests in that batch only; the worker keeps serving.

A lone small request (one item of at most `inline_tokens` tokens, nothing else queued, running or
announced, and no request overlapping another for `INLINE_QUIET_SECONDS`) runs on the event loop's
own thread instead, right after the requests that arrived with it have been seen: handing it to a
worker and the answer back costs two thread wake-ups, which on a small virtual machine are slow
(an idle vCPU halts and must be woken by the hypervisor). Any other request arriving in that moment
sends it to the workers as usual, and the quiet period keeps steady concurrent load, whose requests
arrive one at a time too, on the workers.
After `idle_seconds` with nothing to do following some work, one worker calls `on_idle` once (the
server hands the engine's unused memory back to the system there), so memory grown by a burst of
large batches does not stay resident while the server is quiet.

With `workers > 1`, a second batch may run while one is running, on the same ONNX Runtime session,
but only a small one (at most `overlap_tokens` padded tokens). For many small requests on a small
CPU this beats one batch at a time: the event loop's work preempts one of the engine's threads now
and then, a single parallel forward pass stalls at every barrier when that happens, and a second
independent pass keeps the cores busy. Wide batches never overlap: two of them only slow each other
down and stretch the tail latency. The bound, 256 padded tokens (e.g. 16 short texts), was measured
on 2 cores: with 2048, 8 clients x 32 texts in fp32 ran 11% slower (three pairs of runs) because
their batches of ~60 texts overlapped; 32 single-text clients were unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.batching.policy import LOOKAHEAD_LIMIT, select_batch
from service.engines.priority import lower_thread_priority, set_pass_slot
from service.engines.tokenizer import TokenizedItem
from service.errors import ApiError, ErrorKind

logger = logging.getLogger("embedrank.batcher")

# How long no two requests may have overlapped before a lone small request runs on the event loop's
# thread. Under steady load from a few clients a request often finds the engine idle for a moment;
# running it on the loop then keeps the loop from reading the others (8 single-text clients: 0.65x
# when every such request ran there, 0.9x when only those that found no other request in flight did).
INLINE_QUIET_SECONDS = 0.05

_IDLE = -1  # what `_wait_for_work` returns when the worker should run `on_idle`

# Runs one forward pass: the items' tokens, per item the tag its request was submitted with, and
# whether the pass is lone (no other pass running, nothing queued or announced when it was formed); one
# output per item, or an `ApiError` that fails that item's request alone.
BatchRunner = Callable[[list[TokenizedItem], list[str], bool], Sequence[Any]]


@dataclass
class BatchStats:
    """What the worker reports after each forward pass (for metrics)."""

    size: int
    padded_tokens: int
    real_tokens: int
    seconds: float
    queue_depth: int


@dataclass(eq=False)
class PendingRequest:
    """One client request in flight: its items' results and the future its handler awaits."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Any]]
    results: list[Any]
    remaining: int
    submitted: float = field(default_factory=time.perf_counter)
    first_batch_started: float | None = None
    last_batch_ended: float | None = None
    inference_seconds: float = 0.0
    tag: str = ""
    cancelled: bool = False
    failed: bool = False

    @property
    def queue_seconds(self) -> float:
        return (self.first_batch_started or self.submitted) - self.submitted

    def cancel(self) -> None:
        """The caller went away: its queued items are dropped instead of computed."""
        self.cancelled = True


@dataclass(eq=False)
class _Item:
    request: PendingRequest
    index: int
    tokens: TokenizedItem


def _resolve(requests: list[PendingRequest]) -> None:
    for request in requests:
        if not request.future.done():
            request.future.set_result(request.results)


def _fail(request: PendingRequest, error: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(error)


class DynamicBatcher:
    """One per model. `submit` is called on the event loop; `run_batch` runs on the worker thread."""

    def __init__(self, name: str, run_batch: BatchRunner, max_batch_tokens: int, max_batch_requests: int | None,
                 on_batch: Callable[[BatchStats], None] | None = None, max_wait_seconds: float = 0.01,
                 workers: int = 1, overlap_tokens: int = 256, nice: int = 0,
                 target_tokens: int | None = None, on_idle: Callable[[], None] | None = None,
                 idle_seconds: float = 2.0, inline_tokens: int = 0, keep_requests_whole: bool = False) -> None:
        self.name = name
        self.nice = nice
        self._run_batch = run_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self._on_batch = on_batch
        self._queue: deque[_Item] = deque()
        # The condition's own lock, taken directly where nothing waits (`with condition` adds two Python calls).
        self._lock = threading.RLock()
        self._condition = threading.Condition(self._lock)
        self._stopping = False
        self._busy = 0
        self._announced = 0
        self.max_wait_seconds = max_wait_seconds
        self.overlap_tokens = overlap_tokens
        # A batch stops growing at this many padded tokens even when more is queued: on a CPU the time
        # per item is lowest around a thousand padded tokens and rises beyond (cache misses).
        self.target_tokens = min(target_tokens or max_batch_tokens, max_batch_tokens)
        self._on_idle = on_idle
        self.inline_tokens = inline_tokens
        # Where a pass costs about the same for a few items as for a hundred (a GPU), a batch takes all its
        # budget allows rather than its share of the queue, and only a request small as a whole may run
        # beside another pass: slices of a big one (two pairs of a 20-pair rerank) beside its own pass, or
        # shares of 8, split it into many passes, each as slow as a full one. On an H200, 8 clients
        # reranking 20 pairs each got 0.07x of the in-process ceiling that way.
        self.keep_requests_whole = keep_requests_whole
        self._held: _Item | None = None  # a lone small request about to run on the event loop
        self._overlap_at = float("-inf")  # when a request last arrived while another was in the batcher
        self.idle_seconds = idle_seconds
        self._worked = False  # a pass ran since `on_idle` was last called
        # Worker `index` runs its passes on the model's session `index` where it has one per pass.
        self._threads = [threading.Thread(target=self._work, args=(index,), name=f"batcher-{name}-{index}",
                                          daemon=True) for index in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def alive(self) -> bool:
        """Every worker thread is running (they end only when the batcher is stopped)."""
        return all(thread.is_alive() for thread in self._threads)

    def announce(self) -> None:
        """A request was admitted and will submit soon (it is being parsed or tokenized)."""
        with self._lock:
            self._announced += 1

    def withdraw(self) -> None:
        """An announced request ended before submitting (e.g. it failed validation)."""
        with self._lock:
            self._announced -= 1
            self._condition.notify()

    def submit(self, items: Sequence[TokenizedItem], tag: str = "", announced: bool = False) -> PendingRequest:
        """Queue a request's items; await `request.future` for the results in input order.

        `tag` travels with every item to the batch runner (e.g. pooled vectors vs token embeddings).
        """
        loop = asyncio.get_running_loop()
        request = PendingRequest(loop=loop, future=loop.create_future(), results=[None] * len(items),
                                 remaining=len(items), tag=tag)
        if not items:
            request.future.set_result([])
            return request
        with self._lock:
            if announced:
                self._announced -= 1
            if self._stopping:
                raise ApiError(ErrorKind.UNHEALTHY, "the server is shutting down")
            now = time.perf_counter()
            held = self._held
            if held is not None or self._busy or self._queue or self._announced > 0:
                self._overlap_at = now
                if held is not None:  # it came first, so it goes to the workers first
                    self._held = None
                    self._queue.append(held)
            elif (len(items) == 1 and len(items[0]) <= self.inline_tokens
                  and now - self._overlap_at > INLINE_QUIET_SECONDS):
                # Run on this thread once the requests that arrived with it have been seen.
                self._held = _Item(request, 0, items[0])
                loop.call_soon(self._run_held, self._held)
                return request
            self._queue.extend(_Item(request, index, tokens) for index, tokens in enumerate(items))
            self._condition.notify()
        return request

    def _run_held(self, item: _Item) -> None:
        """On the event loop: run the held lone request here, unless another request came meanwhile."""
        with self._lock:
            if self._held is not item:
                return  # a later request sent it to the workers
            self._held = None
            if item.request.cancelled:
                return
            if self._busy or self._queue or self._announced > 0:
                self._overlap_at = time.perf_counter()
                self._queue.appendleft(item)
                self._condition.notify()
                return
            self._busy += 1
        try:
            self._run([item], True, on_loop=True)
        finally:
            self._pass_ended()

    def _pass_ended(self) -> None:
        with self._lock:
            self._busy -= 1
            self._worked = True
            self._condition.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then end the worker."""
        with self._lock:
            self._stopping = True
            self._condition.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _next_batch(self) -> tuple[list[_Item], bool] | int | None:
        with self._lock:
            while True:
                budget = self._wait_for_work()
                if budget is None or budget == _IDLE:
                    return budget
                # Counted as running from here on, so that another worker deciding while this one waits
                # for announced requests sees an overlap, not an idle engine.
                self._busy += 1
                self._wait_for_announced()
                lookahead = max(LOOKAHEAD_LIMIT, 4 * (self.max_batch_requests or 0))
                window = [self._queue[i] for i in range(min(len(self._queue), lookahead))]
                live = [item for item in window if not (item.request.cancelled or item.request.failed)]
                chosen_positions = select_batch([len(item.tokens) for item in live], budget,
                                                self._share(len(live)), lookahead,
                                                groups=[id(item.request) for item in live])
                chosen = [live[position] for position in chosen_positions]
                chosen_ids = {id(item) for item in chosen}
                # Cancelled and failed items are dropped here; only live, unchosen items go back.
                remaining = [item for item in live if id(item) not in chosen_ids]
                for _ in range(len(window)):
                    self._queue.popleft()
                self._queue.extendleft(reversed(remaining))
                if chosen:
                    if self._queue and self.overlap_tokens >= self.target_tokens:
                        # Where any batch may overlap, an idle worker takes what is left beside this pass.
                        # (Where only small ones may, waking it early cost fp32 rerank 12%: two-pair passes
                        # beside every 20-pair pass.)
                        self._condition.notify()
                    lone = self._busy == 1 and not self._queue and self._announced <= 0
                    return chosen, lone
                self._busy -= 1  # everything it looked at was cancelled meanwhile

    def _wait_for_work(self) -> int | None:
        """Wait until the queue holds work this worker may take; return its token budget (None: stop)."""
        while True:
            while self._queue and (self._queue[0].request.cancelled or self._queue[0].request.failed):
                self._queue.popleft()
            if self._queue:
                if self._busy == 0:
                    return self.target_tokens
                # Another pass is running: overlap only small work, so long batches never share
                # the cores (which would slow both and stretch the tail latency). Keeping requests
                # whole, the oldest request must be small as a whole, not just its next item.
                budget = min(self.target_tokens, self.overlap_tokens)
                head = self._queue[0]
                if len(head.tokens) <= budget and not (
                        self.keep_requests_whole and head.request.remaining * len(head.tokens) > budget):
                    return budget
            elif self._stopping:
                return None
            elif self._worked and self._on_idle is not None and self._busy == 0 and self.idle_seconds > 0:
                if not self._condition.wait(self.idle_seconds) and not self._queue and self._busy == 0 \
                        and self._worked and not self._stopping:
                    self._worked = False
                    return _IDLE
                continue
            self._condition.wait()

    def _share(self, queued: int) -> int | None:
        """With several workers, one batch takes at most its share of the queue, so the other workers
        get work too instead of idling beside one giant batch (not when keeping requests whole)."""
        if len(self._threads) == 1 or self.keep_requests_whole:
            return self.max_batch_requests
        share = max(8, -(-queued // len(self._threads)))
        return min(share, self.max_batch_requests) if self.max_batch_requests else share

    def _wait_for_announced(self) -> None:
        """Requests already admitted but still being tokenized will join the queue in a moment: wait
        for them (bounded), instead of running a small batch now and leaving them for the next one.
        With nothing announced, nothing waits: a lone request runs at once."""
        deadline = time.perf_counter() + self.max_wait_seconds
        limit = self.max_batch_requests or 1 << 30
        while self._announced > 0 and len(self._queue) < limit and not self._stopping:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._condition.wait(remaining)

    def _work(self, index: int = 0) -> None:
        lower_thread_priority(self.nice)
        set_pass_slot(index)
        while True:
            taken = self._next_batch()
            if taken is None:
                return
            if taken == _IDLE:
                self._idle()
                continue
            assert isinstance(taken, tuple)
            try:
                self._run(*taken)
            finally:
                self._pass_ended()

    def _idle(self) -> None:
        assert self._on_idle is not None
        try:
            self._on_idle()
        except Exception:  # never let housekeeping end a worker
            logger.exception("idle callback failed")

    def _run(self, batch: list[_Item], lone: bool, on_loop: bool = False) -> None:
        started = time.perf_counter()
        for item in batch:
            if item.request.first_batch_started is None:
                item.request.first_batch_started = started
        try:
            outputs = self._run_batch([item.tokens for item in batch], [item.request.tag for item in batch], lone)
            if len(outputs) != len(batch):
                raise RuntimeError(f"engine returned {len(outputs)} results for {len(batch)} inputs")
        except Exception as error:  # any engine failure fails this batch only
            logger.exception("forward pass failed for a batch of %d items", len(batch))
            failure = ApiError(ErrorKind.BACKEND, f"Inference failed: {type(error).__name__}: {error}")
            for request in {id(item.request): item.request for item in batch}.values():
                request.failed = True
                (request.loop.call_soon if on_loop else request.loop.call_soon_threadsafe)(_fail, request, failure)
            return
        ended = time.perf_counter()
        elapsed = ended - started
        finished: dict[int, PendingRequest] = {}
        touched: dict[int, PendingRequest] = {}
        for item, output in zip(batch, outputs, strict=True):
            request = item.request
            touched[id(request)] = request
            if request.failed:
                continue
            if isinstance(output, ApiError):  # this item's output is unusable: its request fails, not the batch
                request.failed = True
                (request.loop.call_soon if on_loop else request.loop.call_soon_threadsafe)(_fail, request, output)
                continue
            request.results[item.index] = output
            request.remaining -= 1
            if request.remaining == 0:
                finished[id(request)] = request
        for request in touched.values():
            request.inference_seconds += elapsed
            request.last_batch_ended = ended
        by_loop: dict[asyncio.AbstractEventLoop, list[PendingRequest]] = {}
        for request in finished.values():
            by_loop.setdefault(request.loop, []).append(request)
        for loop, requests in by_loop.items():  # one wake-up of the event loop for all the requests it finished
            (loop.call_soon if on_loop else loop.call_soon_threadsafe)(_resolve, requests)
        if self._on_batch is not None:
            padded = max(len(item.tokens) for item in batch) * len(batch)
            self._on_batch(BatchStats(size=len(batch), padded_tokens=padded,
                                      real_tokens=sum(len(item.tokens) for item in batch),
                                      seconds=elapsed, queue_depth=len(self._queue)))
