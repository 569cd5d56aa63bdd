from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporters.atomic import staged_directory
from exporters.errors import ExportFailure
from exporters.validate import passes, spearman, top_k_overlap
from service.core.manifest import ManifestError, load_manifest
from service.engines.pooling import normalize, pool, sigmoid, softmax

HIDDEN = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
MASK = np.array([[1, 1, 1], [1, 1, 0]], dtype=np.int64)


def test_pooling_modes_follow_the_mask() -> None:
    assert pool(HIDDEN, MASK, "cls").tolist() == [[0, 1], [6, 7]]
    assert pool(HIDDEN, MASK, "mean").tolist() == [[2, 3], [7, 8]]
    assert pool(HIDDEN, MASK, "max").tolist() == [[4, 5], [8, 9]]
    assert pool(HIDDEN, MASK, "lasttoken").tolist() == [[4, 5], [8, 9]]
    np.testing.assert_allclose(pool(HIDDEN, MASK, "mean_sqrt_len_tokens")[1], np.array([14, 16]) / np.sqrt(2))
    with pytest.raises(ValueError):
        pool(HIDDEN, MASK, "nope")


def test_normalize_and_activations() -> None:
    vectors = normalize(np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32))
    assert vectors[0].tolist() == pytest.approx([0.6, 0.8])
    assert np.isfinite(vectors).all()
    assert sigmoid(np.array([0.0], dtype=np.float32))[0] == pytest.approx(0.5)
    assert softmax(np.array([[1.0, 1.0]], dtype=np.float32)).tolist() == [[0.5, 0.5]]


def test_metrics() -> None:
    assert spearman(np.array([1, 2, 3]), np.array([10, 20, 30])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3]), np.array([3, 2, 1])) == pytest.approx(-1.0)
    vectors = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    assert top_k_overlap(vectors, vectors, passages=25, k=5) == 1.0
    assert passes({"min_cosine": 0.99999}, {"min_cosine": 0.99999})
    assert not passes({"max_abs_diff": 0.1}, {"max_abs_diff": 1e-4})
    assert not passes({"mean_cosine": float("nan")}, {"mean_cosine": 0.9})


def test_manifest_refuses_foreign_or_future_formats(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ManifestError, match="not an embedrank bundle"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "embedrank-bundle", "format_version": 99}))
    with pytest.raises(ManifestError, match="re-export"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path)


def test_staged_directory_swaps_in_whole_or_not_at_all(tmp_path: Path) -> None:
    with staged_directory(tmp_path, "bundle") as stage:
        (stage / "a").write_text("one")
    assert (tmp_path / "bundle" / "a").read_text() == "one"
    assert (tmp_path / "bundle").stat().st_mode & 0o777 == 0o755, "bundles must be readable by other users"
    with pytest.raises(RuntimeError), staged_directory(tmp_path, "bundle") as stage:
        (stage / "a").write_text("two")
        raise RuntimeError("interrupted")
    assert (tmp_path / "bundle" / "a").read_text() == "one"
    with staged_directory(tmp_path, "bundle") as stage:
        (stage / "b").write_text("three")
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name or "retired" in p.name] == []


def test_concurrent_export_of_same_name_is_refused(tmp_path: Path) -> None:
    with staged_directory(tmp_path, "bundle"), pytest.raises(ExportFailure, match="another export"), \
            staged_directory(tmp_path, "bundle"):
        pass
