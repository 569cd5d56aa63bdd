"""Instructions the event loop executes per request, counted by valgrind: serving overhead without the noise.

    python -m loadtests.instructions --bundle models/all-MiniLM-L6-v2 [--http] [--requests 1280]

This machine's speed moves 10-30% within an hour, which hides a change of a few percent in any timed
figure, the loop's CPU time per request included. callgrind counts the instructions the main thread (the
event loop) executes, which does not depend on what else the machine does: the same code gives the same
count within about 1%. The app is set up as in `loadtests.loop_cost` (the real app: every middleware, the
direct routes, the batcher's worker threads, the bundle's real tokenizer), with an engine that answers a
constant at once, so the workers take almost nothing from the loop. It runs under valgrind twice, serving
a warm-up and then N or 3N requests from 32 concurrent clients; the difference of the two counts over 2N
is the loop's instructions per request, free of start-up and shutdown. With --http the app is served by
uvicorn as `embedrank serve` serves it (`service.server.server_config`) on 127.0.0.1 and driven from a
separate process over keep-alive connections, so HTTP parsing and the user-space side of the socket calls
count too (the kernel's side does not). Needs valgrind (apt-get install valgrind); a few minutes.

`--breakdown` says where those instructions go: one HTTP run whose counters are zeroed after the warm-up and
dumped after N requests (`callgrind_control`), summed per shared object and per C function, each function's
own instructions only. Python code shows as the interpreter's functions (`_PyEval_EvalFrameDefault` and what
it calls), so this tells the interpreter apart from orjson, the C library, uvloop, httptools, pydantic-core
and numpy, not one Python function from another.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from loadtests.loop_cost import _app, measure
from loadtests.run import _free_port, short_text
from service.engines.fake import FakeEngine
from service.engines.tokenizer import EncodedBatch

CLIENTS = 32
WARMUP_REQUESTS = 80


class ConstantEngine(FakeEngine):
    """Answers every pass with ones at once: the worker threads cost the loop next to nothing."""

    def forward(self, batch: EncodedBatch, lone: bool = False) -> NDArray[np.float32]:
        rows, width = batch.input_ids.shape
        return np.ones((rows, width, self.hidden_size), dtype=np.float32)


def _requests(port: int) -> list[bytes]:
    bodies = [json.dumps({"inputs": short_text(index)}).encode() for index in range(1000)]
    return [b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (port, len(body), body) for body in bodies]


async def _drive(port: int, total: int) -> None:
    """`total` requests over `CLIENTS` keep-alive connections, each waiting for its answer before the next."""
    requests = _requests(port)

    async def client(number: int, count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for index in range(count):
            writer.write(requests[(number * 97 + index) % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer {head[:60]!r}")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
        writer.close()

    await asyncio.gather(*(client(number, total // CLIENTS) for number in range(CLIENTS)))


def _serve(bundle: Path, port: int) -> None:
    import uvicorn

    from service.config import Settings
    from service.server import server_config, settle_garbage_collector

    app = _app(bundle, ConstantEngine)
    settle_garbage_collector()  # as `embedrank serve` does before it serves
    uvicorn.Server(server_config(app, Settings(port=port, log_level="warning"))).run()


def _in_process(bundle: Path, requests: int) -> None:
    import uvloop

    uvloop.run(measure(_app(bundle, ConstantEngine), requests, CLIENTS, False))


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server under valgrind did not start")


def _main_thread_instructions(out: Path) -> int:
    """The main thread's total from callgrind's per-thread output (thread 1: `<file>-01`)."""
    for line in next(out.parent.glob(out.name + "*-01")).read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in callgrind output {out}")


def _under_callgrind(out: Path, bundle: Path) -> list[str]:
    """This module under callgrind, one output file per thread named after `out`."""
    return ["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}.%p",
            sys.executable, "-m", "loadtests.instructions", "--bundle", str(bundle)]


@contextlib.contextmanager
def _server_under_callgrind(out: Path, bundle: Path) -> Iterator[tuple[int, int]]:
    """The HTTP server under callgrind, warmed up, for the block: (port, process id); stopped after it."""
    port = _free_port()
    server = subprocess.Popen([*_under_callgrind(out, bundle), "--child-server", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, server)
        asyncio.run(_drive(port, WARMUP_REQUESTS))
        yield port, server.pid
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=300)


def count(bundle: Path, requests: int, http: bool, scratch: Path) -> int:
    """The main thread's instructions for a run serving `requests` requests (after the warm-up)."""
    out = scratch / f"callgrind.{requests}"
    if not http:
        subprocess.run([*_under_callgrind(out, bundle), "--child-in-process", str(requests)], check=True,
                       capture_output=True)
        return _main_thread_instructions(out)
    with _server_under_callgrind(out, bundle) as (port, _):
        asyncio.run(_drive(port, requests))
    return _main_thread_instructions(out)


def _own_instructions(dump: Path) -> Counter[tuple[str, str]]:
    """Each (shared object, function)'s own instructions in a callgrind dump: cost lines under `fn=`,
    less the inclusive costs of its calls (the line after each `calls=`). Names are compressed as
    `(id) name` once and `(id)` after, per kind."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}}
    own: Counter[tuple[str, str]] = Counter()
    current = {"ob": "?", "fn": "?"}
    after_call = False
    for line in dump.read_text(errors="replace").splitlines():
        spec = re.match(r"(c?)(ob|fn)=\((\d+)\)(?: (.*))?", line)
        if spec:
            called, kind, number, name = spec.groups()
            if name:
                names[kind][number] = name
            if not called:
                current[kind] = names[kind].get(number, "?")
            continue
        if line.startswith("calls="):
            after_call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            fields = line.split()
            if len(fields) >= 2 and not after_call:
                own[(Path(current["ob"]).name, current["fn"])] += int(fields[1])
            after_call = False
    return own


def breakdown(bundle: Path, requests: int, scratch: Path, top: int = 25) -> dict[str, Any]:
    """Where the event loop's instructions go per HTTP request: by shared object and by function."""
    out = scratch / "callgrind"
    with _server_under_callgrind(out, bundle) as (port, pid):
        subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
        asyncio.run(_drive(port, requests))
        subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    own = _own_instructions(next(scratch.glob(f"callgrind.{pid}.1-01")))
    total = sum(own.values())
    objects: Counter[str] = Counter()
    for (shared_object, _), instructions in own.items():
        objects[shared_object] += instructions
    return {"requests": requests, "loop_instructions_per_request": round(total / requests),
            "by_object": [{"object": name, "per_request": round(value / requests), "share": round(value / total, 4)}
                          for name, value in objects.most_common()],
            "by_function": [{"object": name, "function": function, "per_request": round(value / requests),
                             "share": round(value / total, 4)} for (name, function), value in own.most_common(top)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("models/all-MiniLM-L6-v2"))
    parser.add_argument("--requests", type=int, default=640, help="N: the runs serve N and 3N requests")
    parser.add_argument("--http", action="store_true", help="through uvicorn and real sockets")
    parser.add_argument("--breakdown", action="store_true",
                        help="one HTTP run of N requests: its instructions by shared object and by C function")
    parser.add_argument("--child-in-process", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-server", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_in_process is not None:
        _in_process(args.bundle, args.child_in_process)
        return
    if args.child_server is not None:
        _serve(args.bundle, args.child_server)
        return
    requests = max(CLIENTS, args.requests // CLIENTS * CLIENTS)
    if args.breakdown:
        with tempfile.TemporaryDirectory() as scratch:
            found = breakdown(args.bundle, requests, Path(scratch))
        print(f"{found['loop_instructions_per_request']} instructions per request over {requests} requests "
              "(the whole dump, connection set-up included)")
        for entry in found["by_object"][:12]:
            print(f"{entry['per_request']:>9} {entry['share']:6.1%}  {entry['object']}")
        print()
        for entry in found["by_function"]:
            where = f"{entry['object'][:28]:28} {entry['function'][:80]}"
            print(f"{entry['per_request']:>9} {entry['share']:6.1%}  {where}")
        return
    with tempfile.TemporaryDirectory() as scratch:
        few = count(args.bundle, requests, args.http, Path(scratch))
        many = count(args.bundle, 3 * requests, args.http, Path(scratch))
    result: dict[str, Any] = {"mode": "http" if args.http else "in-process", "requests": [requests, 3 * requests],
                              "loop_instructions_per_request": round((many - few) / (2 * requests))}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
