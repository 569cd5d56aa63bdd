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
    with running_server(["--model-id", str(minilm_bundle), "--model-id", str(cross_encoder_bundle),
                         "--served-model-name", infinity.EMBEDDER, "--served-model-name", infinity.RERANKER],
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
