"""`loadtests.infinity`: the side-by-side with Infinity sends Infinity the very scenarios of
`loadtests.run`, checks each server's answer before timing it, and tabulates the two. Infinity itself
is not installed here (it needs its own environment); embedrank answers the same requests, on the
routes the two servers share, in Infinity's format."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests import infinity
from loadtests import run as scenarios
from tests.helpers.server import RunningServer, running_server


def _lines(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_bodies_are_the_load_tests_own(tmp_path: Path) -> None:
    loads = infinity.embed_loads(tmp_path, 10.0)
    assert [load.name for load in loads] == [scenario.name for scenario in scenarios.SCENARIOS]
    for load, scenario in zip(loads, scenarios.SCENARIOS, strict=True):
        assert (load.connections, load.items, load.route) == (scenario.connections, scenario.texts_per_request,
                                                              "/embeddings")
        theirs = _lines(load.bodies)
        ours = _lines(scenarios._bodies(tmp_path, scenario.texts_per_request, scenario.kind))
        assert len(theirs) == len(ours) == 2000
        for sent, own in zip(theirs, ours, strict=True):
            texts = own["inputs"] if isinstance(own["inputs"], list) else [own["inputs"]]
            assert sent == {"model": infinity.EMBEDDER, "input": texts}
    rerank = infinity.rerank_load(tmp_path, 10.0)
    assert (rerank.connections, rerank.items, rerank.route) == (8, 20, "/rerank")
    assert rerank.seconds == 10.0 * scenarios.RERANK_WINDOW_FACTOR
    for sent, own in zip(_lines(rerank.bodies), _lines(scenarios.rerank_bodies(tmp_path)), strict=True):
        assert sent == {"model": infinity.RERANKER, "query": own["query"], "documents": own["texts"],
                        "return_documents": False}
    embed, rerank_part = infinity.mixed_load(tmp_path, 10.0).parts  # loadtests.run's mixed scenario, both parts
    assert (embed.name, embed.connections, embed.route, embed.items, embed.seconds) == (
        scenarios.mixed_part("embed", 16), 16, "/embeddings", 1, 10.0)
    assert (rerank_part.name, rerank_part.connections, rerank_part.route, rerank_part.items, rerank_part.seconds) == (
        scenarios.mixed_part("rerank", 4), 4, "/rerank", 20, 10.0)
    single = next(load for load in loads if load.name == "32 clients x 1 text")
    assert _lines(embed.bodies) == _lines(single.bodies)
    assert _lines(rerank_part.bodies) == _lines(rerank.bodies)


@pytest.fixture(scope="module")
def both(minilm_bundle: Path, cross_encoder_bundle: Path, work_dir: Path) -> Iterator[RunningServer]:
    # the settings the script serves both models with, under Infinity's names
    models = (infinity.Served(infinity.EMBEDDER, minilm_bundle, work_dir),
              infinity.Served(infinity.RERANKER, cross_encoder_bundle, work_dir))
    with running_server(["--model-id", str(minilm_bundle), *infinity.embedrank_arguments(models)],
                        work_dir / "logs") as running:
        yield running


def test_embedrank_answers_every_scenario_in_infinitys_format(both: RunningServer, tmp_path: Path) -> None:
    for load in [*infinity.embed_loads(tmp_path, 1.0), infinity.rerank_load(tmp_path, 1.0),
                 *infinity.mixed_load(tmp_path, 1.0).parts]:
        infinity.check_answer(both.url, load)  # raises on anything but Infinity's answer


def test_a_wrong_answer_is_not_timed(both: RunningServer, tmp_path: Path) -> None:
    one_text = infinity.embed_loads(tmp_path, 1.0)[0]
    with pytest.raises(RuntimeError, match="unexpected body"):  # one embedding back where 32 were expected
        infinity.check_answer(both.url, infinity.Load("x", one_text.bodies, 1, "/embeddings", 32, 1.0))
    rerank = infinity.rerank_load(tmp_path, 1.0)
    with pytest.raises(RuntimeError, match="unexpected body"):  # 20 scores where 21 were expected
        infinity.check_answer(both.url, infinity.Load("x", rerank.bodies, 1, "/rerank", 21, 1.0))
    body = tmp_path / "unknown.jsonl"
    body.write_text(json.dumps({"model": infinity.EMBEDDER, "input": []}) + "\n")
    with pytest.raises(RuntimeError, match="answered 4"):
        infinity.check_answer(both.url, infinity.Load("x", body, 1, "/embeddings", 1, 1.0))


def test_the_table_puts_both_side_by_side() -> None:
    def figures(per_second: float) -> dict[str, float]:
        return {"items_per_s": per_second, "p50_ms": 12.34, "socket_errors": 0, "non_2xx": 0,
                "requests": per_second / 10, "seconds": 10.0}

    report = {"machine": "a CPU, 2 cores", "seconds": 10.0, "scenarios": ["32 clients x 1 text", "rerank"],
              "servers": {"Infinity ONNX fp32": {"32 clients x 1 text": figures(300.0), "rerank": "failed: boom"},
                          "Infinity ONNX int8": {"32 clients x 1 text": figures(500.0), "rerank": figures(100.0)},
                          "embedrank float32": {"32 clients x 1 text": figures(600.0), "rerank": figures(90.0)},
                          "embedrank int8": {"32 clients x 1 text": figures(1250.0), "rerank": figures(210.0)}}}
    table = infinity.markdown(report)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["32 clients x 1 text"].endswith("| 300/s, p50 12.3 ms | 500/s, p50 12.3 ms | 600/s, p50 12.3 ms "
                                                "| 1,250/s, p50 12.3 ms | 2.00x | 2.50x |")
    assert rows["rerank"].endswith("| failed | 100/s, p50 12.3 ms | 90/s, p50 12.3 ms | 210/s, p50 12.3 ms "
                                   "| - | 2.10x |")
    assert "rerank 30 s" in table
    report["servers"]["Infinity ONNX int8"]["rerank"] = figures(0.0)  # not one request came back in the window
    rows = {line.split(" | ")[0].lstrip("| "): line for line in infinity.markdown(report).splitlines()
            if line.startswith("| ")}
    assert rows["rerank"].endswith("| failed | none answered in 10 s | 90/s, p50 12.3 ms | 210/s, p50 12.3 ms "
                                   "| - | - |")


def test_rounds_alternate_the_servers_and_swap_the_order(both: RunningServer, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import time

    import httpx

    def drive(url: str, pid: int, parts: tuple[infinity.Load, ...]) -> dict[str, dict[str, float]]:
        """A window in miniature: each part's first ten requests, one at a time (wrk is no test dependency)."""
        figures = {}
        for part in parts:
            bodies = _lines(part.bodies)[:10]
            began = time.monotonic()
            statuses = [httpx.post(url + part.route, json=body, timeout=60).status_code for body in bodies]
            elapsed = time.monotonic() - began
            figures[part.name] = {"items_per_s": len(bodies) * part.items / elapsed, "p50_ms": elapsed * 100,
                                  "socket_errors": 0, "non_2xx": sum(status != 200 for status in statuses)}
        return figures

    single = next(load for load in infinity.embed_loads(tmp_path, 1.0) if load.name == "32 clients x 1 text")
    mixed = infinity.mixed_load(tmp_path, 1.0)
    # the same real server under two labels: what is checked is the order and the bookkeeping
    servers = {"first": (both.url, both.process.pid), "second": (both.url, both.process.pid)}
    runs = infinity.alternate(servers, [single, mixed], rounds=2, drive=drive)
    assert list(runs) == [single.name, *(part.name for part in mixed.parts)]
    for sides in runs.values():
        assert {label: len(entries) for label, entries in sides.items()} == {"first": 2, "second": 2}
        for entries in sides.values():
            assert all(entry["items_per_s"] > 0 and entry["socket_errors"] + entry["non_2xx"] == 0
                       for entry in entries)
    windows = [line.split()[1:3] for line in capsys.readouterr().out.splitlines()
               if line.strip().startswith("round") and single.name in line]
    assert windows == [["1", "first"], ["1", "second"], ["2", "second"], ["2", "first"]]
    compared = infinity.compare(runs[single.name], "second", "first")
    assert compared["rounds"] == 2 and compared["errors"] == 0 and 0 <= compared["ahead"] <= 2
    assert compared["ratio"] == pytest.approx(compared["ours"] / compared["theirs"])


def test_waiting_for_a_server_to_finish_what_was_in_flight() -> None:
    import subprocess
    import sys
    import time

    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # both started
        began = time.monotonic()
        infinity.wait_quiet(idle.pid, timeout=5.0)
        assert time.monotonic() - began < 1.0
        began = time.monotonic()
        infinity.wait_quiet(busy.pid, timeout=1.0)  # never quiet: waits out its timeout
        assert time.monotonic() - began >= 1.0
    finally:
        idle.kill()
        busy.kill()


def test_the_interleaved_table_gives_each_pair_and_the_rounds_ahead() -> None:
    def rounds(*per_second: float, p50: float = 10.0) -> list[dict[str, float]]:
        return [{"items_per_s": value, "p50_ms": p50, "socket_errors": 0, "non_2xx": 0} for value in per_second]

    fp32 = infinity.compare({"embedrank float32": rounds(600, 500, 700, p50=20.0),
                             "Infinity ONNX fp32": rounds(300, 550, 350, p50=40.0)},
                            "embedrank float32", "Infinity ONNX fp32")
    assert (fp32["ours"], fp32["theirs"], fp32["ahead"], fp32["rounds"]) == (600, 400, 2, 3)
    assert (fp32["ratio"], fp32["ours_p50_ms"], fp32["theirs_p50_ms"]) == (1.5, 20.0, 40.0)
    report = {"machine": "a CPU, 2 cores", "seconds": 10.0, "rounds": 3, "scenarios": ["32 clients x 1 text", "rerank"],
              "pairs": {"float32": {"32 clients x 1 text": fp32, "rerank": "failed: boom"},
                        "int8": {"32 clients x 1 text": fp32}}}
    table = infinity.interleaved_markdown(report)
    assert "3 alternated rounds of 10 s" in table and "rerank 30 s" in table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["32 clients x 1 text"].endswith("| 400/s, p50 40.0 ms | 600/s, p50 20.0 ms | 1.50x (2 of 3) "
                                                "| 400/s, p50 40.0 ms | 600/s, p50 20.0 ms | 1.50x (2 of 3) |")
    assert rows["rerank"].endswith("| failed | failed | failed | - | - | - |")
