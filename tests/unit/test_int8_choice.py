"""Which int8 candidate the search keeps when none meets the target (mean cosine >= 0.995, top-10 overlap
>= 0.95, >= 1.6x fp32): the candidates' figures are the ones all-MiniLM-L6-v2 measured on a 2-core AVX2
CPU without VNNI, where every candidate fell short of the speed-up."""

from __future__ import annotations

from exporters import validate
from exporters.int8_search import preference

BARS = validate.bars_for("int8", "embed")
SCORE_BARS = validate.bars_for("int8", "rerank")
AVX2_CANDIDATES = {
    "per-channel": {"min_cosine": 0.9823, "mean_cosine": 0.9919, "top10_overlap": 0.9040, "speedup": 1.4331},
    "smoothed, FFN output blockwise": {"min_cosine": 0.9966, "mean_cosine": 0.9982, "top10_overlap": 0.9440,
                                       "speedup": 1.2797},
    "smoothed, FFN input and output blockwise": {"min_cosine": 0.9976, "mean_cosine": 0.9988,
                                                 "top10_overlap": 0.9540, "speedup": 0.8979},
    "all MatMuls blockwise": {"min_cosine": 0.9984, "mean_cosine": 0.9992, "top10_overlap": 0.9700,
                              "speedup": 0.7066},
}


def _kept(candidates: dict[str, dict[str, float]], bars: dict[str, float] = BARS) -> str:
    """The search's choice: the first of the best, in the order tried."""
    best = None
    for name, metrics in candidates.items():
        if best is None or preference(metrics, bars) > preference(candidates[best], bars):
            best = name
    assert best is not None
    return best


def test_the_most_accurate_candidate_that_is_faster_than_fp32_is_kept() -> None:
    # The two most accurate are slower than fp32 here; serving them would lose to fp32 on both counts.
    assert _kept(AVX2_CANDIDATES) == "smoothed, FFN output blockwise"


def test_a_candidate_reaching_the_speed_up_beats_a_more_accurate_slower_one() -> None:
    candidates = dict(AVX2_CANDIDATES)
    candidates["per-channel"] = {**candidates["per-channel"], "speedup": 1.7}
    assert _kept(candidates) == "per-channel"


def test_when_none_is_faster_than_fp32_the_fastest_is_kept() -> None:
    slow = {name: {**metrics, "speedup": metrics["speedup"] / 2} for name, metrics in AVX2_CANDIDATES.items()}
    assert _kept(slow) == "per-channel"


def test_passing_the_bar_comes_before_speed() -> None:
    candidates = dict(AVX2_CANDIDATES)
    candidates["per-channel"] = {**candidates["per-channel"], "top10_overlap": 0.85, "speedup": 2.2}
    assert _kept(candidates) == "smoothed, FFN output blockwise"


def test_scores_rank_by_spearman_among_the_candidates_faster_than_fp32() -> None:
    # The cross-encoder's figures from the same CPU.
    candidates = {"per-channel": {"spearman": 0.9786, "speedup": 1.2811},
                  "smoothed, FFN output blockwise": {"spearman": 0.9940, "speedup": 1.1610},
                  "smoothed, FFN input and output blockwise": {"spearman": 0.9946, "speedup": 0.8189},
                  "all MatMuls blockwise": {"spearman": 0.9963, "speedup": 0.6595}}
    assert _kept(candidates, SCORE_BARS) == "smoothed, FFN output blockwise"
