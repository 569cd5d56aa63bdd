"""The load tests' throughput ceilings, `loadtests.paired`, which measures a ceiling between the
server's wrk runs: the configurations each ceiling tries on real (tiny) bundles, the choice among them,
the loads, the arithmetic of the alternated windows, and `loadtests.padding`'s batches. The wrk runs
themselves are benchmarks, not suite tests (wrk is not a test dependency)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests import paired
from loadtests import run as scenarios


def test_rerank_ceiling_tries_every_batch_in_every_layout(cross_encoder_bundle: Path) -> None:
    result = scenarios.rerank_ceiling(cross_encoder_bundle, "float32", 0.02, rounds=1)
    keys = {f"batch{size}_pairs_per_s_{label}" for label in scenarios._layouts("cpu") for size in (10, 20, 32)}
    assert keys <= set(result)
    assert result["pairs_per_s"] == max(result[key] for key in keys) > 0
    assert result["tokens_per_pair"] > 20  # a short query and a ~100-word document, truncated to the tiny model's limit


def test_embedding_ceiling_takes_the_best_of_each_kind(bge_style_bundle: Path) -> None:
    result = scenarios.ceiling(bge_style_bundle, "float32", 0.05, rounds=1)
    labels = list(scenarios._layouts("cpu"))
    assert result["batch32_items_per_s"] == max(result[f"batch32_items_per_s_{label}"] for label in labels) > 0
    assert result["long_items_per_s"] == max(result[f"long{size}_items_per_s_{label}"]
                                             for label in labels for size in (4, 8)) > 0
    assert result["long_items_per_s"] < result["batch32_items_per_s"]
    assert result["batch1_p50_ms"] > 0 and result["long_tokens_per_text"] > 50


def test_the_paired_ceiling_is_the_configuration_that_measured_best(cross_encoder_bundle: Path) -> None:
    configurations = scenarios.throughput_configurations(cross_encoder_bundle, "float32", "cpu", "rerank")
    assert {configuration.kind for configuration in configurations} == {"rerank"}
    assert len(configurations) == 3 * len(scenarios._layouts("cpu"))
    chosen, best = paired.choose(configurations, 0.02, rounds=2)
    assert set(best) == {configuration.key for configuration in configurations}
    assert best[chosen.key] == max(best.values()) > 0
    # Each configuration scores the batch it names.
    assert {configuration.batches[0].input_ids.shape[0] for configuration in configurations} == {10, 20, 32}


def test_each_load_is_the_scenarios_own(tmp_path: Path) -> None:
    rerank = paired.load_for("rerank", tmp_path)
    assert (rerank.ceiling, rerank.connections, rerank.route, rerank.items_per_request, rerank.window_factor) == (
        "rerank", 8, "/rerank", scenarios.RERANK_DOCUMENTS, scenarios.RERANK_WINDOW_FACTOR)
    (tmp_path / "run").mkdir()
    assert rerank.bodies.read_text() == scenarios.rerank_bodies(tmp_path / "run").read_text()
    short = paired.load_for("8 clients x 32 texts", tmp_path)
    assert (short.ceiling, short.connections, short.route, short.items_per_request, short.window_factor) == (
        "batch32", 8, "/embed", 32, 1)
    assert [len(json.loads(line)["inputs"]) for line in short.bodies.read_text().splitlines()[:3]] == [32] * 3
    assert paired.load_for("8 clients x 1 long text (~256 tokens)", tmp_path).ceiling == "long"
    with pytest.raises(SystemExit, match=r"no throughput ceiling for scenario '1 client x 1 text'.*'rerank'"):
        paired.load_for("1 client x 1 text", tmp_path)
    # loadtests.interleave drives any scenario, those without a throughput ceiling too.
    assert scenarios.scenario_load("1 client x 1 text", tmp_path).ceiling == "batch1"
    with pytest.raises(SystemExit, match=r"unknown scenario 'nope'"):
        scenarios.scenario_load("nope", tmp_path)


def test_alternated_windows_give_ratios_of_the_same_minutes() -> None:
    summary = paired.summarize([100.0, 200.0, 160.0], [90.0, 150.0, 160.0], target=0.9)
    assert summary["ratio_of_means"] == pytest.approx(400 / 460)
    assert summary["round_ratios"] == pytest.approx([0.9, 0.75, 1.0])
    assert summary["round_ratio_median"] == pytest.approx(0.9)
    assert summary["round_ratio_range"] == pytest.approx([0.75, 1.0])
    assert summary["rounds_at_target"] == 2
    assert summary["ratio_to_best_ceiling_window"] == pytest.approx((400 / 3) / 200)
    with pytest.raises(ValueError):
        paired.summarize([100.0], [90.0, 80.0], target=0.9)


def test_cuda_without_a_gpu_is_refused_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.engines.ort_engine import cuda_available

    if cuda_available():
        pytest.skip("a CUDA GPU is usable here")
    monkeypatch.setattr("sys.argv", ["paired", "--scenario", "rerank", "--device", "cuda"])
    with pytest.raises(SystemExit, match="--device cuda needs onnxruntime-gpu and an NVIDIA GPU"):
        paired.main()


def test_the_padding_tool_compares_the_ceilings_batches_with_the_same_texts_sorted(bge_style_bundle: Path) -> None:
    from loadtests import padding
    from service.engines.bundle import BundleModel

    tokenizer = BundleModel(bge_style_bundle, variant="float32").tokenizer
    chosen = padding.arrangements(tokenizer)
    as_sent, size, waste = chosen["as sent, 32"]
    assert size == 32 and len(as_sent) == scenarios.CEILING_BATCHES
    texts = sorted(row[:int(mask.sum())].tolist() for batch in as_sent
                   for row, mask in zip(batch.input_ids, batch.attention_mask, strict=True))
    for name in ("sorted by length, 32", "sorted by length, 64"):
        batches, size, sorted_waste = chosen[name]
        assert all(batch.input_ids.shape[0] == size for batch in batches)
        assert sorted(row[:int(mask.sum())].tolist() for batch in batches
                      for row, mask in zip(batch.input_ids, batch.attention_mask, strict=True)) == texts
        assert 0 <= sorted_waste < waste
    real = sum(len(text) for text in texts)
    assert waste == pytest.approx(1 - real / sum(batch.input_ids.size for batch in as_sent))
    measured = padding.measure(bge_style_bundle, "float32", rounds=1, seconds=0.02)
    assert measured["as sent, 32"]["against_as_sent"] == pytest.approx(1.0)
    assert all(figures["mean"] > 0 for figures in measured.values())


def test_interleave_gives_each_server_the_shared_settings_then_its_own() -> None:
    import argparse

    from loadtests import interleave
    from service.cli import _add_serve_arguments

    options = interleave.build_parser().parse_args([
        "--baseline", ".", "--dtype", "float32", "--server-arg=--engine-workers=2",
        "--candidate-arg=--engine-sessions=2", "--candidate-arg=--dtype=int8", "--baseline-arg=--lone-pass=false"])
    assert options.baseline_bundle is None  # both serve --bundle unless told otherwise
    assert interleave.build_parser().parse_args(
        ["--baseline", ".", "--baseline-bundle", "/tmp/older-export"]).baseline_bundle == Path("/tmp/older-export")
    arguments = interleave.server_arguments(options)
    assert arguments == {
        "baseline": ("--dtype", "float32", "--engine-workers=2", "--lone-pass=false"),
        "candidate": ("--dtype", "float32", "--engine-workers=2", "--engine-sessions=2", "--dtype=int8")}
    # Each list is what `embedrank serve` parses: a server's own setting wins over the shared one.
    serve = argparse.ArgumentParser()
    _add_serve_arguments(serve)
    candidate = serve.parse_args(arguments["candidate"])
    assert (candidate.dtype, candidate.engine_sessions, candidate.engine_workers) == ("int8", 2, 2)
    baseline = serve.parse_args(arguments["baseline"])
    assert (baseline.dtype, baseline.lone_pass, "engine_sessions" in vars(baseline)) == ("float32", False, False)


def test_a_same_minutes_ceiling_window_runs_on_the_side_asked_and_as_long(cross_encoder_bundle: Path) -> None:
    import dataclasses
    import time

    configurations = scenarios.throughput_configurations(cross_encoder_bundle, "float32", "cpu", "rerank")
    figures = {configuration.key: float(position) for position, configuration in enumerate(configurations)}
    best = scenarios.best_of_each_kind(configurations, figures)
    assert best == {"rerank": configurations[-1]}  # the highest figure, not the first or the last measured
    figures[configurations[1].key] = 1e9
    assert scenarios.best_of_each_kind(configurations, figures)["rerank"] is configurations[1]

    events: list[tuple[str, float]] = []
    chosen = configurations[0]

    def forward(batch: object) -> object:
        events.append(("ceiling", time.perf_counter()))
        return chosen.forward(batch)

    def drive() -> dict[str, float]:
        events.append(("server", time.perf_counter()))
        return {"requests": 1.0}

    held = dataclasses.replace(chosen, forward=forward)
    for ceiling_first in (True, False):
        events.clear()
        measured, alongside = scenarios.beside_ceiling(drive, held, 0.2, ceiling_first)
        assert measured == {"requests": 1.0} and alongside is not None and alongside > 0
        sides = [side for side, _ in events]
        server_at = sides.index("server")
        assert sides.count("server") == 1 and len(sides) > 2
        assert set(sides[:server_at]) == ({"ceiling"} if ceiling_first else set())
        ceiling_times = [moment for side, moment in events if side == "ceiling"]
        assert ceiling_times[-1] - ceiling_times[0] >= 0.15  # a window of the length asked, not one pass
        fields = scenarios._same_minutes(2 * alongside, held, alongside, ceiling_first)
        assert fields["ratio_same_minutes"] == pytest.approx(2.0)
        assert fields["same_minutes"] == {"configuration": chosen.key, "items_per_s": alongside,
                                          "ceiling_first": ceiling_first}
    assert scenarios.beside_ceiling(drive, None, 0.2, True)[1] is None
    assert scenarios._same_minutes(1.0, None, None, True) == {}
    assert [scenarios._ceiling_first(round_number, index) for round_number in (1, 2) for index in (0, 1)] == [
        False, True, True, False]


def test_the_report_shows_the_same_minutes_ratio_only_where_it_was_measured() -> None:
    def entry(dtype: str, round_number: int, served: float, alongside: float | None) -> dict[str, object]:
        figures: dict[str, object] = {
            "dtype": dtype, "scenario": "32 clients x 1 text", "round": round_number, "texts_per_s": served,
            "p50_ms": 20.0, "p90_ms": 25.0, "p99_ms": 30.0, "socket_errors": 0, "non_2xx": 0,
            "wrk_cpu_cores": 0.1, "loop_cpu_us_per_request": 150.0, "engine_cpu_ms_per_request": 1.7,
            "ceiling": {"batch32_items_per_s": 1000.0}, "ratio_to_ceiling": served / 1000.0}
        if alongside is not None:
            figures["same_minutes"] = {"configuration": "batch32_items_per_s_2_single_thread_sessions",
                                       "items_per_s": alongside, "ceiling_first": round_number == 2}
            figures["ratio_same_minutes"] = served / alongside
        return figures

    report = {"machine": {"cpu": "a CPU", "cores": 2}, "device": "cpu", "bundle": "b", "reranker": "r",
              "seconds_per_scenario": 10.0, "rounds": 3, "same_minutes": True, "servers": [],
              "results": [entry("int8", 1, 850.0, 1000.0), entry("int8", 2, 900.0, 900.0),
                          entry("int8", 3, 800.0, 1000.0)]}
    text = scenarios.markdown(report)
    assert "| vs ceiling, same minutes |" in text and "| 0.85x [0.80, 0.90] | 0.85x [0.80, 1.00] |" in text
    assert "| 1000/s after: 0.85x |" in text and "| 900/s before: 1.00x |" in text
    plain = {**report, "same_minutes": False,
             "results": [entry("int8", number, 850.0, None) for number in (1, 2, 3)]}
    assert "same minutes" not in scenarios.markdown(plain)
    assert "same minutes" not in scenarios._row(plain["results"][0])
    assert "(0.85x in the same minutes)" in scenarios._row(report["results"][0])


def test_interleave_reads_pass_size_and_padding_from_a_real_servers_counters(bge_style_bundle: Path) -> None:
    """Two texts of different lengths in one request run as one pass of two, the shorter padded to the
    longer; the figures come from the server's own /metrics, read the way each wrk run reads them."""
    import httpx

    from loadtests import interleave
    from service.core.registry import ServedModel
    from service.engines.bundle import BundleModel
    from tests.api.test_http_lane import serving

    model = ServedModel(name="tiny-bge", bundle=BundleModel(bge_style_bundle), variant="float32", device="cpu")
    texts = ["short", "a much longer text with many more words in it than the other one"]
    with serving([model], engine_workers=1, inline_pass_tokens=0, warmup=False) as served:
        url = f"http://127.0.0.1:{served.port}"
        before = interleave._pass_counters(url)
        lengths = [len(item) for item in httpx.post(url + "/tokenize", json={"inputs": texts}).json()]
        response = httpx.post(url + "/embed", json={"inputs": texts})
        assert response.status_code == 200
        figures = interleave.pass_figures(before, interleave._pass_counters(url))
    assert lengths[0] < lengths[1]
    assert figures["items"] == 2 and figures["items_per_pass"] == 2
    assert figures["padding_waste"] == pytest.approx((lengths[1] - lengths[0]) / (2 * lengths[1]))
    assert interleave.pass_figures(before, before) == {"items": 0, "items_per_pass": 0, "padding_waste": 0}
