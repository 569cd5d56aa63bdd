from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from service.batching.batcher import INLINE_QUIET_SECONDS, DynamicBatcher
from service.batching.policy import select_batch
from service.engines.tokenizer import TokenizedItem
from service.errors import ApiError, ErrorKind


def item(length: int, marker: int = 1) -> TokenizedItem:
    return TokenizedItem(ids=[marker] * length, type_ids=[0] * length, truncated=False)


def test_policy_always_takes_the_oldest_and_respects_the_budget() -> None:
    lengths = [10, 200, 11, 12, 300, 9]
    chosen = select_batch(lengths, max_batch_tokens=48, max_batch_requests=None)
    assert 0 in chosen
    assert max(lengths[i] for i in chosen) * len(chosen) <= 48
    assert set(chosen) <= {0, 2, 3, 5}
    assert select_batch([500], max_batch_tokens=48, max_batch_requests=None) == [0]
    assert len(select_batch([5] * 100, max_batch_tokens=10_000, max_batch_requests=8)) == 8
    assert select_batch([], 100, None) == []


def test_policy_groups_similar_lengths() -> None:
    lengths = [50, 5, 48, 6, 49, 7]
    chosen = select_batch(lengths, max_batch_tokens=3 * 50, max_batch_requests=None)
    assert sorted(lengths[i] for i in chosen) == [48, 49, 50]
    short_first = select_batch([5, 50, 6, 48, 7], max_batch_tokens=3 * 50, max_batch_requests=None)
    assert sorted(short_first) == [0, 2, 4]


def test_policy_serves_the_oldest_request_first() -> None:
    # Request A (items 0-2, long) came first; B's short items (3-6) must not push A's out of the batch.
    lengths = [90, 95, 100, 10, 11, 12, 13]
    groups = [1, 1, 1, 2, 2, 2, 2]
    chosen = select_batch(lengths, max_batch_tokens=400, max_batch_requests=None, groups=groups)
    assert {0, 1, 2} <= set(chosen)
    assert max(lengths[i] for i in chosen) * len(chosen) <= 400
    # Without request identities the short neighbours of the oldest item win, as before.
    assert set(select_batch(lengths, max_batch_tokens=400, max_batch_requests=None)) == {0, 4, 5, 6}
    # A request larger than the budget runs alone, shortest items first, the rest next time.
    chosen = select_batch([30, 10, 20, 40, 5], max_batch_tokens=60, max_batch_requests=None,
                          groups=[1, 1, 1, 1, 2])
    assert chosen == [1, 2]


def test_policy_fills_the_rest_with_similar_lengths() -> None:
    lengths = [50, 60, 5, 49, 48, 6]
    chosen = select_batch(lengths, max_batch_tokens=4 * 60, max_batch_requests=None, groups=[1, 1, 2, 3, 4, 5])
    assert sorted(lengths[i] for i in chosen) == [48, 49, 50, 60]


class Recorder:
    def __init__(self, fail_marker: int | None = None, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.lone: list[bool] = []
        self.threads: list[str] = []
        self.fail_marker = fail_marker
        self.gate = gate

    def __call__(self, items: list[TokenizedItem], tags: list[str], lone: bool = False) -> list[Any]:
        if self.gate is not None:
            self.gate.wait(5)
        markers = [entry.ids[0] for entry in items]
        self.batches.append(markers)
        self.lone.append(lone)
        self.threads.append(threading.current_thread().name)
        if self.fail_marker in markers:
            raise RuntimeError("boom")
        return [marker * 10 + len(entry) for marker, entry in zip(markers, items, strict=True)]


def test_large_request_is_split_and_reassembled_in_order() -> None:
    recorder = Recorder()
    batcher = DynamicBatcher("t", recorder, max_batch_tokens=40, max_batch_requests=None)

    async def scenario() -> list[Any]:
        pending = batcher.submit([item(length, marker=index) for index, length in
                                  enumerate([10, 3, 10, 7, 10, 2, 10, 9])])
        return await pending.future

    results = asyncio.run(scenario())
    batcher.stop()
    assert results == [index * 10 + length for index, length in enumerate([10, 3, 10, 7, 10, 2, 10, 9])]
    assert len(recorder.batches) > 1


def test_failed_batch_fails_its_requests_only_and_the_worker_goes_on() -> None:
    gate = threading.Event()
    recorder = Recorder(fail_marker=9, gate=gate)
    batcher = DynamicBatcher("t", recorder, max_batch_tokens=10, max_batch_requests=1)

    async def scenario() -> tuple[BaseException | None, list[Any]]:
        bad = batcher.submit([item(5, marker=9)])
        good = batcher.submit([item(5, marker=2)])
        gate.set()
        error = None
        try:
            await bad.future
        except ApiError as caught:
            error = caught
        return error, await good.future

    error, good = asyncio.run(scenario())
    batcher.stop()
    assert isinstance(error, ApiError) and error.status == 424 and "boom" in error.message
    assert good == [25]


def test_an_item_returned_as_an_error_fails_its_request_alone_in_a_shared_pass() -> None:
    gate = threading.Event()

    def runner(items: list[TokenizedItem], tags: list[str], lone: bool = False) -> list[Any]:
        gate.wait(5)
        return [ApiError(ErrorKind.BACKEND, "unusable output") if entry.ids[0] == 9 else entry.ids[0] * 10
                for entry in items]

    batcher = DynamicBatcher("t", runner, max_batch_tokens=1000, max_batch_requests=None)

    async def scenario() -> tuple[ApiError, list[Any], list[Any]]:
        first = batcher.submit([item(3, marker=1)])  # the pass holds it while the other two queue up
        bad = batcher.submit([item(3, marker=4), item(3, marker=9), item(3, marker=5)])
        good = batcher.submit([item(3, marker=2), item(3, marker=3)])
        gate.set()
        with pytest.raises(ApiError) as raised:
            await bad.future
        return raised.value, await first.future, await good.future

    error, first, good = asyncio.run(scenario())
    batcher.stop()
    assert error.status == 424 and error.message == "unusable output"
    assert first == [10] and good == [20, 30]


def test_requests_a_pass_finishes_are_resolved_together_in_order() -> None:
    recorder = Recorder()
    batcher = DynamicBatcher("t", recorder, max_batch_tokens=1000, max_batch_requests=None)

    async def scenario() -> list[list[Any]]:
        pending = [batcher.submit([item(2, marker=marker)]) for marker in range(1, 9)]
        return [await request.future for request in pending]

    results = asyncio.run(scenario())
    batcher.stop()
    assert results == [[marker * 10 + 2] for marker in range(1, 9)]


def test_cancelled_requests_are_dropped_from_the_queue() -> None:
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    batcher = DynamicBatcher("t", recorder, max_batch_tokens=10, max_batch_requests=1)

    async def scenario() -> list[Any]:
        first = batcher.submit([item(5, marker=1)])  # occupies the worker until the gate opens
        await asyncio.sleep(0.05)
        gone = batcher.submit([item(5, marker=7), item(5, marker=7)])
        gone.cancel()
        kept = batcher.submit([item(5, marker=3)])
        gate.set()
        await first.future
        return await kept.future

    assert asyncio.run(scenario()) == [35]
    batcher.stop()
    assert [7] not in recorder.batches


class OverlapCounter:
    """A runner that takes `seconds` per pass and records batch sizes and the most passes at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.running = 0
        self.most = 0
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, items: list[TokenizedItem], tags: list[str], lone: bool = False) -> list[Any]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.sizes.append(len(items))
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        return [0] * len(items)


def test_wide_batches_never_overlap_even_while_announced_requests_are_awaited() -> None:
    """Two workers, small-overlap layout: while one worker waits for announced requests, the other must
    see a pass in progress (before, both formed full batches at once)."""
    runner = OverlapCounter(0.02)
    batcher = DynamicBatcher("t", runner, max_batch_tokens=4096, max_batch_requests=None, workers=2,
                             overlap_tokens=64, max_wait_seconds=0.05)

    async def scenario() -> None:
        for _ in range(4):
            batcher.announce()
        waits = []
        for _ in range(4):
            await asyncio.sleep(0.01)
            waits.append(batcher.submit([item(100, marker=2) for _ in range(5)], announced=True).future)
        await asyncio.gather(*waits)

    for _ in range(3):
        asyncio.run(scenario())
    batcher.stop()
    assert runner.most == 1, f"wide batches overlapped (batch sizes {runner.sizes})"


class FirstPassHeld:
    """Records each pass's markers as it starts; the first pass waits at the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started: list[list[int]] = []
        self.running = 0
        self.most = 0
        self.lock = threading.Lock()

    def __call__(self, items: list[TokenizedItem], tags: list[str], lone: bool = False) -> list[Any]:
        with self.lock:
            first = not self.started
            self.started.append([entry.ids[0] for entry in items])
            self.running += 1
            self.most = max(self.most, self.running)
        if first:
            self.gate.wait(5)
        with self.lock:
            self.running -= 1
        return [0] * len(items)


def test_keeping_requests_whole_runs_a_big_request_in_one_pass() -> None:
    """Two workers where only small batches may run beside another, keeping requests whole (CUDA): a big
    request queued behind a running pass is neither sliced into small passes beside it nor split into
    shares; it runs whole once the pass ends (on an H200, 20-pair reranks went as two-pair passes beside
    each other's and as 8-pair shares, at 0.07x of the ceiling). A small request still runs beside."""
    runner = FirstPassHeld()
    batcher = DynamicBatcher("t", runner, max_batch_tokens=4096, max_batch_requests=None, workers=2,
                             overlap_tokens=64, keep_requests_whole=True)

    async def scenario() -> None:
        first = batcher.submit([item(10, marker=1)])
        while not runner.started:
            await asyncio.sleep(0.005)
        big = batcher.submit([item(10, marker=2) for _ in range(30)])
        await asyncio.sleep(0.1)  # time enough for the idle worker to take slices, if it would
        assert runner.started == [[1]], f"passes beside the held one: {runner.started[1:]}"
        runner.gate.set()
        await asyncio.gather(first.future, big.future)

    asyncio.run(scenario())
    assert runner.started == [[1], [2] * 30]

    runner = FirstPassHeld()
    batcher.stop()
    batcher = DynamicBatcher("t", runner, max_batch_tokens=4096, max_batch_requests=None, workers=2,
                             overlap_tokens=64, keep_requests_whole=True)

    async def small_beside() -> None:
        big = batcher.submit([item(10, marker=2) for _ in range(30)])
        while not runner.started:
            await asyncio.sleep(0.005)
        small = batcher.submit([item(10, marker=3), item(12, marker=3)])  # 24 padded tokens: small
        await small.future  # answered while the big pass is still held
        runner.gate.set()
        await big.future

    asyncio.run(small_beside())
    batcher.stop()
    assert runner.started == [[2] * 30, [3, 3]] and runner.most == 2


def test_target_tokens_bound_batches_while_more_is_queued() -> None:
    recorder = Recorder()
    batcher = DynamicBatcher("t", recorder, max_batch_tokens=10_000, max_batch_requests=None, target_tokens=100)

    async def scenario() -> list[Any]:
        return await batcher.submit([item(10, marker=1) for _ in range(35)]).future

    assert len(asyncio.run(scenario())) == 35
    batcher.stop()
    assert [len(batch) for batch in recorder.batches] == [10, 10, 10, 5]


def test_stopped_batcher_refuses_new_work() -> None:
    batcher = DynamicBatcher("t", Recorder(), max_batch_tokens=10, max_batch_requests=None)
    batcher.stop()

    async def scenario() -> None:
        batcher.submit([item(3)])

    with pytest.raises(ApiError):
        asyncio.run(scenario())


def test_thread_layout_per_variant() -> None:
    from service.engines.layout import SMALL_OVERLAP_TOKENS, ThreadLayout, thread_layout

    # On CPU both dtypes run narrow passes side by side; a lone batch gets the wide spinning session.
    # int8 passes each run on a session of their own, float32 passes share one.
    assert thread_layout("float32", "cpu", 2) == ThreadLayout(1, 2, None, lone_threads=2, arena=False)
    assert thread_layout("float32", "cpu", 2, spinning=True) == ThreadLayout(1, 2, None, lone_threads=2, arena=False)
    assert thread_layout("float32", "cpu", 2, intra_op_threads=2, spinning=True) == \
        ThreadLayout(2, 2, SMALL_OVERLAP_TOKENS, arena=False)
    assert thread_layout("int8", "cpu", 2, spinning=True) == ThreadLayout(1, 2, None, lone_threads=2, sessions=2)
    assert thread_layout("float32", "cpu", 2, lone_pass=False) == ThreadLayout(1, 2, None, arena=False)
    assert thread_layout("int8", "cpu", 2) == ThreadLayout(1, 2, None, lone_threads=2, sessions=2)
    # On more cores: still one single-threaded pass per core, unless --engine-workers says otherwise.
    assert thread_layout("int8", "cpu", 16) == ThreadLayout(1, 16, None, lone_threads=16, sessions=16)
    assert thread_layout("float32", "cpu", 16) == ThreadLayout(1, 16, None, lone_threads=16, arena=False)
    assert thread_layout("int8", "cpu", 16, workers=2) == ThreadLayout(8, 2, None, lone_threads=16, sessions=2)
    assert thread_layout("float32", "cpu", 16, workers=4) == ThreadLayout(4, 4, None, lone_threads=16, arena=False)
    assert thread_layout("float32", "cpu", 16, intra_op_threads=16) == \
        ThreadLayout(16, 2, SMALL_OVERLAP_TOKENS, 16, arena=False)
    assert thread_layout("int8", "cpu", 16, intra_op_threads=4) == ThreadLayout(4, 4, None, lone_threads=16,
                                                                                 sessions=4)
    assert thread_layout("int8", "cpu", 2, lone_pass=False) == ThreadLayout(1, 2, None, sessions=2)
    assert thread_layout("float16", "cuda", 8) == ThreadLayout(8, 2, SMALL_OVERLAP_TOKENS)
    assert thread_layout("int8", "cuda", 8) == ThreadLayout(8, 2, SMALL_OVERLAP_TOKENS)
    assert thread_layout("float32", "cpu", 2, intra_op_threads=1) == \
        ThreadLayout(1, 2, None, lone_threads=2, arena=False)
    assert thread_layout("float32", "cpu", 2, workers=1) == ThreadLayout(2, 1, None)  # one pass at a time
    assert thread_layout("int8", "cpu", 2, workers=1) == ThreadLayout(1, 1, None)  # one pass: nothing to widen
    assert thread_layout("int8", "cpu", 1) == ThreadLayout(1, 1, None)
    # --engine-sessions: any number up to the passes (more would never be used); never on CUDA.
    assert thread_layout("float32", "cpu", 4, sessions=4).sessions == 4
    assert thread_layout("int8", "cpu", 4, sessions=1).sessions == 1
    assert thread_layout("int8", "cpu", 4, sessions=9).sessions == 4
    assert thread_layout("float32", "cuda", 8, sessions=2).sessions == 1
    assert "on 2 sessions" in thread_layout("int8", "cpu", 2).describe()
    assert "sessions" not in thread_layout("float32", "cpu", 2).describe()
    # float32 passes sharing one session go without its CPU arena; a session per pass, one pass, int8 and
    # CUDA keep it.
    assert "without the CPU arena" in thread_layout("float32", "cpu", 2).describe()
    assert thread_layout("float32", "cpu", 2, sessions=2).arena
    assert thread_layout("int8", "cpu", 2, sessions=1).arena
    assert thread_layout("float16", "cuda", 8).arena and thread_layout("float32", "cuda", 8).arena


def test_each_worker_names_its_own_session_slot() -> None:
    """Worker i of a batcher runs its passes as slot i (the engine picks session i % sessions); any other
    thread, such as the event loop's, is slot 0."""
    from service.engines.priority import pass_slot

    slots: set[int] = set()
    both = threading.Event()
    lock = threading.Lock()

    def runner(items: list[TokenizedItem], tags: list[str], lone: bool = False) -> list[Any]:
        with lock:
            slots.add(pass_slot())
            if len(slots) == 2:
                both.set()
        both.wait(5)  # hold the first pass until the other worker runs one too
        return [len(entry) for entry in items]

    batcher = DynamicBatcher("t", runner, max_batch_tokens=100, max_batch_requests=None, workers=2,
                             overlap_tokens=100, target_tokens=10)

    async def scenario() -> None:
        pending = [batcher.submit([item(8)]) for _ in range(6)]
        await asyncio.gather(*(request.future for request in pending))

    asyncio.run(scenario())
    batcher.stop()
    assert slots == {0, 1}
    assert pass_slot() == 0


def test_a_pass_is_lone_only_when_nothing_else_runs_or_waits() -> None:
    """The lone flag (the engine may then give the pass the whole machine) is set only for a batch
    formed while no other pass ran and nothing was queued or announced."""
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    batcher = DynamicBatcher("t", recorder, max_batch_tokens=100, max_batch_requests=None, workers=2,
                             overlap_tokens=100, target_tokens=10)

    async def scenario() -> None:
        first = batcher.submit([item(5, marker=1)])  # idle batcher: lone
        for _ in range(100):
            if recorder.batches or batcher.queue_depth == 0:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # the first pass is now held at the gate
        second = batcher.submit([item(5, marker=2)])  # formed while the first runs: not lone
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first.future, second.future)
        await asyncio.sleep(0.05)  # the workers count themselves idle just after answering
        await batcher.submit([item(5, marker=4)]).future  # idle again: lone

    asyncio.run(scenario())
    batcher.stop()
    lone_by_marker = dict(zip([batch[0] for batch in recorder.batches], recorder.lone, strict=True))
    assert lone_by_marker == {1: True, 2: False, 4: True}

    # One worker, room for two items per batch: the first batch leaves one queued, so it is not lone;
    # the last, formed with nothing else left, is.
    recorder = Recorder()
    batcher = DynamicBatcher("t", recorder, max_batch_tokens=100, max_batch_requests=None, target_tokens=10)
    asyncio.run(_submit_and_wait(batcher, [item(5, marker=3) for _ in range(3)]))
    batcher.stop()
    assert [len(batch) for batch in recorder.batches] == [2, 1] and recorder.lone == [False, True]


async def _submit_and_wait(batcher: DynamicBatcher, items: list[TokenizedItem]) -> list[Any]:
    return await batcher.submit(items).future


def test_an_idle_worker_takes_what_a_batch_left_queued() -> None:
    """A request larger than one batch is spread over the idle workers at once, not run batch after batch."""
    runner = OverlapCounter(0.05)
    batcher = DynamicBatcher("t", runner, max_batch_tokens=100, max_batch_requests=None, workers=2,
                             overlap_tokens=100, target_tokens=10)
    asyncio.run(_submit_and_wait(batcher, [item(5) for _ in range(4)]))
    batcher.stop()
    assert runner.most == 2


def test_on_idle_runs_once_after_a_quiet_spell_and_never_during_work() -> None:
    """After work and `idle_seconds` of quiet, one worker calls `on_idle` once; a quiet batcher that has
    done nothing since does not call it again, and a pass running keeps it from being called."""
    lock = threading.Lock()
    events: list[str] = []

    def runner(items: list[TokenizedItem], tags: list[str], lone: bool = False) -> list[Any]:
        with lock:
            events.append("start")
        time.sleep(0.15)  # longer than idle_seconds: a running pass must not count as quiet
        with lock:
            events.append("end")
        return [0] * len(items)

    def on_idle() -> None:
        with lock:
            events.append("idle")

    batcher = DynamicBatcher("t", runner, max_batch_tokens=100, max_batch_requests=None, workers=2,
                             on_idle=on_idle, idle_seconds=0.05)
    time.sleep(0.2)
    assert events == []  # nothing done yet: nothing to release
    asyncio.run(_submit_and_wait(batcher, [item(5)]))
    time.sleep(0.3)
    assert events == ["start", "end", "idle"]
    time.sleep(0.2)
    assert events.count("idle") == 1  # quiet since: not called again
    asyncio.run(_submit_and_wait(batcher, [item(5)]))
    time.sleep(0.3)
    batcher.stop()
    assert events == ["start", "end", "idle", "start", "end", "idle"]


def test_pass_token_budget() -> None:
    from service.batching.policy import CPU_TARGET_BATCH_TOKENS, pass_token_budget

    assert pass_token_budget("cpu", 16384, None) == CPU_TARGET_BATCH_TOKENS
    assert pass_token_budget("cpu", 1000, None) == 1000
    assert pass_token_budget("cpu", 16384, 4096) == 4096
    assert pass_token_budget("cuda", 16384, None) == 16384
    assert pass_token_budget("cuda", 16384, 8192) == 8192


LOOP_THREAD = threading.main_thread().name  # asyncio.run runs the loop on the calling (main) thread


def test_a_lone_small_request_runs_on_the_event_loop_thread() -> None:
    """One input within the token bound, nothing else in the batcher: the pass runs on the loop's own
    thread (as a lone pass); larger or multi-input requests, and every request without the bound, go to
    the workers."""
    recorder = Recorder()
    batcher = DynamicBatcher("t", recorder, max_batch_tokens=100, max_batch_requests=None, workers=2,
                             inline_tokens=16)

    async def scenario() -> list[list[Any]]:
        answers = [await batcher.submit([item(5, marker=1)]).future]
        answers.append(await batcher.submit([item(16, marker=2)]).future)
        answers.append(await batcher.submit([item(17, marker=3)]).future)  # over the bound
        answers.append(await batcher.submit([item(5, marker=4), item(5, marker=5)]).future)  # two inputs
        return answers

    assert asyncio.run(scenario()) == [[15], [36], [47], [45, 55]]
    batcher.stop()
    threads = dict(zip([batch[0] for batch in recorder.batches], recorder.threads, strict=True))
    assert threads[1] == threads[2] == LOOP_THREAD
    assert threads[3] != LOOP_THREAD and threads[4] != LOOP_THREAD
    assert recorder.lone[:2] == [True, True]

    recorder = Recorder()
    batcher = DynamicBatcher("t", recorder, max_batch_tokens=100, max_batch_requests=None, workers=2)
    assert asyncio.run(_submit_and_wait(batcher, [item(5, marker=1)])) == [15]
    batcher.stop()
    assert recorder.threads[0] != LOOP_THREAD  # inline_tokens defaults to 0: never on the loop


def test_requests_arriving_together_go_to_the_workers_and_load_keeps_them_there() -> None:
    """A second request arriving before the held one has run sends both to the workers, the first one
    first; for the quiet period after two requests overlapped, lone requests stay on the workers too."""
    recorder = Recorder()
    batcher = DynamicBatcher("t", recorder, max_batch_tokens=100, max_batch_requests=None, workers=1,
                             inline_tokens=16, target_tokens=100)

    async def scenario() -> None:
        first = batcher.submit([item(5, marker=1)])
        second = batcher.submit([item(5, marker=2)])  # same turn of the loop
        assert await asyncio.gather(first.future, second.future) == [[15], [25]]
        assert await batcher.submit([item(5, marker=3)]).future == [35]  # within the quiet period
        await asyncio.sleep(INLINE_QUIET_SECONDS + 0.05)
        assert await batcher.submit([item(5, marker=4)]).future == [45]

    asyncio.run(scenario())
    batcher.stop()
    assert recorder.batches[0] == [1, 2]  # one pass, oldest first
    threads = dict(zip([batch[0] for batch in recorder.batches], recorder.threads, strict=True))
    assert threads[1] != LOOP_THREAD and threads[3] != LOOP_THREAD
    assert threads[4] == LOOP_THREAD


def test_a_failed_pass_on_the_loop_fails_its_request_and_serving_goes_on() -> None:
    recorder = Recorder(fail_marker=9)
    batcher = DynamicBatcher("t", recorder, max_batch_tokens=100, max_batch_requests=None, workers=2,
                             inline_tokens=16)

    async def scenario() -> tuple[BaseException | None, list[Any], list[Any]]:
        error = None
        try:
            await batcher.submit([item(5, marker=9)]).future
        except ApiError as caught:
            error = caught
        after = await batcher.submit([item(5, marker=2)]).future
        cancelled = batcher.submit([item(5, marker=7)])
        cancelled.cancel()  # its client went away before the pass: nothing runs for it
        await asyncio.sleep(0.01)
        return error, after, await batcher.submit([item(20, marker=3)]).future

    error, after, larger = asyncio.run(scenario())
    batcher.stop()
    assert isinstance(error, ApiError) and error.status == 424 and "boom" in error.message
    assert after == [25] and larger == [50]
    assert [batch[0] for batch in recorder.batches] == [9, 2, 3]
    assert recorder.threads[:2] == [LOOP_THREAD, LOOP_THREAD]


def test_a_flat_cost_engine_gets_whole_requests_when_they_are_kept_whole() -> None:
    """`loadtests.flat_engine`: closed-loop clients reranking 20 pairs each against an engine whose pass
    costs the same at any size (a GPU). Kept whole, several requests share a pass; otherwise they are cut
    into slices of two and shares of eight, and throughput falls with the pass count."""
    from loadtests.flat_engine import drive

    kept = drive(True, 8, 20, 117, seconds=0.5)
    sliced = drive(False, 8, 20, 117, seconds=0.5)
    assert kept.items_per_pass >= 20 and kept.passes_per_request <= 1, kept
    assert sliced.items_per_pass < 8 and sliced.passes_per_request > 2, sliced
    assert kept.items_per_s > 3 * sliced.items_per_s, (kept, sliced)
