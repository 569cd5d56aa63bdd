"""Inference threads run at a lower priority than the event loop (Linux keeps nice per thread)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from service.engines.priority import lower_thread_priority, with_nice

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")


def _nice_of(thread_id: int) -> int:
    return int(open(f"/proc/self/task/{thread_id}/stat").read().rsplit(")", 1)[1].split()[16])


def test_threads_started_under_with_nice_inherit_it_and_the_caller_keeps_its_own() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    seen: dict[str, int] = {}

    def create() -> threading.Thread:
        # stands in for ONNX Runtime starting its thread pool while the session is created
        worker = threading.Thread(target=lambda: seen.setdefault("pool", os.getpriority(os.PRIO_PROCESS, 0)))
        worker.start()
        worker.join()
        seen["creator"] = os.getpriority(os.PRIO_PROCESS, 0)
        return worker

    with_nice(5, create)
    assert seen == {"creator": base + 5, "pool": base + 5}
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the event loop's thread is untouched
    assert with_nice(0, lambda: os.getpriority(os.PRIO_PROCESS, 0)) == base


def test_errors_in_the_niced_thread_reach_the_caller() -> None:
    def fail() -> None:
        raise ValueError("cannot load")

    with pytest.raises(ValueError, match="cannot load"):
        with_nice(3, fail)


def test_lower_thread_priority_affects_only_the_calling_thread() -> None:
    lowered, release = threading.Event(), threading.Event()
    ids: list[int] = []

    def run() -> None:
        lower_thread_priority(7)
        ids.append(threading.get_native_id())
        lowered.set()
        release.wait(5)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert lowered.wait(5)
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert _nice_of(ids[0]) == base + 7
        assert _nice_of(threading.get_native_id()) == base
    finally:
        release.set()
        thread.join()
