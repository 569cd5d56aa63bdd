"""The exporter end to end on tiny random models and on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from exporters import onnx_export
from exporters.errors import ExportFailure
from service.core.manifest import load_manifest, sha256_file
from service.engines.bundle import BundleModel
from tests.conftest import export_quietly
from tests.helpers import tiny_models

NEW_TEXTS = ["a sentence the probes never saw", "another one about rivers and mountains", "北京的天气", "x"]


def _st_encode(source: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(source), device="cpu").encode(texts, convert_to_numpy=True)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def test_minilm_bundle_manifest_and_parity(minilm_bundle: Path, minilm_source: Path) -> None:
    manifest = load_manifest(minilm_bundle)
    assert manifest.task == "embed"
    assert (manifest.pooling, manifest.normalize, manifest.dimensions, manifest.max_length) == ("mean", True, 384, 256)
    assert manifest.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert set(manifest.variants) == {"float32", "int8", "float16"}
    for variant in manifest.variants.values():
        assert variant.sha256 == sha256_file(minilm_bundle / variant.file)
        assert variant.passed and not variant.forced
        assert variant.opset >= 17
    fp32 = manifest.variants["float32"]
    assert fp32.parity["min_cosine"] >= 0.99999
    assert fp32.graph_optimization in ("O1", "O2")
    assert fp32.ms_per_batch["batch_32"] > 0
    int8 = manifest.variants["int8"]
    assert int8.parity["mean_cosine"] >= 0.99 and int8.parity["min_cosine"] >= 0.97
    assert int8.parity["top10_overlap"] >= 0.90
    assert int8.quantization is not None and int8.quantization["candidates"]
    assert int8.quantization["corpus"]["passages"] == 1000
    # Smoothing plus per-row (rowwise or blockwise) FFN outputs divides plain per-channel int8's error by
    # about five (mean cosine 0.9934 -> 0.9987 here). Top-10 overlap moves by +-0.01 with float noise at
    # rank 10, and the speed-up depends on the CPU, so the target itself is reported in the manifest, not asserted here.
    tried = int8.quantization["candidates"]
    assert tried[0]["name"] == "per-channel" and tried[0]["mean_cosine"] < 0.995
    smoothed = [entry for entry in tried if entry.get("smooth_alpha") is not None]
    assert smoothed and smoothed[0]["mean_cosine"] >= 0.998 and smoothed[0]["top10_overlap"] >= 0.94
    assert (1 - smoothed[0]["mean_cosine"]) * 3 < 1 - tried[0]["mean_cosine"]
    by_alpha = smoothed[0]["calibration_agreement_by_alpha"]
    assert smoothed[0]["smooth_alpha"] == float(max(by_alpha, key=by_alpha.get))
    import onnx

    int8_ops = [node.op_type for node in onnx.load(str(minilm_bundle / int8.file)).graph.node]
    assert int8_ops.count("MatMulNBits") == len(int8.quantization["blockwise_nodes"])
    assert int8_ops.count("MatMulIntegerToFloat") == len(int8.quantization["rowwise_nodes"])
    assert set(int8.quantization["rowwise_floors"]) == set(int8.quantization["rowwise_nodes"])
    assert all(-1.0 < floor <= 0.0 for floor in int8.quantization["rowwise_floors"].values())
    # Every MatMul the dynamic quantizer wrote per-channel has its weights rounded against calibration inputs:
    # 36 weight MatMuls (six per layer), less the rowwise and blockwise ones.
    assert int8.quantization["compensated_nodes"] == int8_ops.count("MatMulInteger") == 36 - len(
        int8.quantization["rowwise_nodes"]) - len(int8.quantization["blockwise_nodes"])
    assert all(entry["compensated_nodes"] == 36 - entry["rowwise_nodes"] - entry["blockwise_nodes"]
               for entry in tried if "error" not in entry)
    # The chosen model runs its token-wise operators on real tokens only, measured again before it is kept;
    # the manifest's parity is the packed model's. The padded graph stays beside it for lone passes.
    packed = int8.quantization["packed_tokens"]
    assert packed["kept"] and packed["layers"] == 6 and int8_ops.count("NonZero") == 1
    assert int8.parity["mean_cosine"] == pytest.approx(packed["mean_cosine"], abs=1e-5)
    assert int8.padded_file == "model_int8_padded.onnx"
    padded_file = minilm_bundle / int8.padded_file
    assert int8.padded_sha256 == sha256_file(padded_file) and int8.padded_size_bytes == padded_file.stat().st_size
    padded_ops = [node.op_type for node in onnx.load(str(padded_file)).graph.node]
    assert "NonZero" not in padded_ops and padded_ops.count("MatMulIntegerToFloat") == int8_ops.count(
        "MatMulIntegerToFloat")

    # fp32 (O2) keeps each residual Add and its LayerNormalization apart for the CPU; fp16, for CUDA, fuses
    # them; the int8 graph is quantized from the export with its shape arithmetic made static.
    def ops(variant: str) -> set[str]:
        return {node.op_type for node in onnx.load(str(minilm_bundle / manifest.variants[variant].file)).graph.node}

    assert {"Attention", "LayerNormalization"} <= ops("float32") and "SkipLayerNormalization" not in ops("float32")
    assert {"Attention", "SkipLayerNormalization"} <= ops("float16")
    # fp32 packs its tokens too (see test_packed_float32_export); fp16 is converted from the padded graph.
    assert int8.packed_tokens == 6 and manifest.variants["float32"].packed_tokens == 6
    assert "NonZero" in ops("float32") and "NonZero" not in ops("float16")
    assert sorted(path.name for path in minilm_bundle.glob("*.onnx")) == [
        "model.onnx", "model_fp16.onnx", "model_int8.onnx", "model_int8_padded.onnx"]
    assert int8.quantization["static_shape_values"] == 30
    int8_graph = onnx.load(str(minilm_bundle / int8.file)).graph
    # 22 as exported; packing adds one of its own (the padded output's shape, from input_ids)
    assert sum(node.op_type == "Shape" and not node.name.startswith("packed/") for node in int8_graph.node) <= 4
    assert manifest.exporter["libraries"]["onnxruntime"]
    assert manifest.tokenizer["sha256"] == sha256_file(minilm_bundle / "tokenizer.json")
    # What the server will compute equals sentence-transformers on texts outside the probe set.
    ours = BundleModel(minilm_bundle).embed(NEW_TEXTS)
    assert _cosines(ours, _st_encode(minilm_source, NEW_TEXTS)).min() >= 0.9999
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    int8_vectors = BundleModel(minilm_bundle, variant="int8").embed(NEW_TEXTS)
    assert _cosines(int8_vectors, ours).mean() >= 0.97


def test_bge_style_cls_pooling_normalize_and_prompts(bge_style_bundle: Path, bge_style_source: Path) -> None:
    manifest = load_manifest(bge_style_bundle)
    assert (manifest.pooling, manifest.normalize, manifest.dimensions) == ("cls", True, 32)
    assert manifest.prompts["query"].startswith("Represent this sentence")
    assert manifest.max_length == 64
    ours = BundleModel(bge_style_bundle).embed(NEW_TEXTS)
    assert _cosines(ours, _st_encode(bge_style_source, NEW_TEXTS)).min() >= 0.99999


def test_dense_module_after_pooling_is_part_of_the_model(work_dir: Path) -> None:
    source = tiny_models.bert_embedder(work_dir / "src-zpoint", pooling="mean", normalize=True, dense_out=56,
                                       dense_activation="Tanh", seed=3)
    bundle = export_quietly(source, "tiny-zpoint", work_dir / "models").bundle_dir
    manifest = load_manifest(bundle)
    assert manifest.dimensions == 56 and manifest.hidden_size == 32
    assert [(d.in_features, d.out_features, d.activation) for d in manifest.dense_layers] == [(32, 56, "tanh")]
    assert manifest.dense_layers[0].bias_file is not None
    ours = BundleModel(bundle).embed(NEW_TEXTS)
    assert ours.shape == (len(NEW_TEXTS), 56)
    assert _cosines(ours, _st_encode(source, NEW_TEXTS)).min() >= 0.99999


def test_xlm_roberta_encoder(work_dir: Path) -> None:
    source = tiny_models.xlmr_embedder(work_dir / "src-xlmr")
    bundle = export_quietly(source, "tiny-xlmr", work_dir / "models", int8=True).bundle_dir
    manifest = load_manifest(bundle)
    assert manifest.model_type == "xlm-roberta"
    assert manifest.input_names == ["input_ids", "attention_mask"]
    assert manifest.max_length == 96
    assert manifest.variants["float32"].parity["min_cosine"] >= 0.99999
    ours = BundleModel(bundle).embed(NEW_TEXTS)
    assert _cosines(ours, _st_encode(source, NEW_TEXTS)).min() >= 0.99999


@pytest.mark.parametrize("model_type", ["roberta", "mpnet", "distilbert"])
def test_other_supported_architectures(work_dir: Path, model_type: str) -> None:
    source = tiny_models.other_encoder(work_dir / f"src-{model_type}", model_type)
    bundle = export_quietly(source, f"tiny-{model_type}", work_dir / "models").bundle_dir
    manifest = load_manifest(bundle)
    assert manifest.model_type == model_type and manifest.pooling == "mean"
    assert manifest.variants["float32"].parity["min_cosine"] >= 0.99999
    ours = BundleModel(bundle).embed(NEW_TEXTS)
    assert _cosines(ours, _st_encode(source, NEW_TEXTS)).min() >= 0.99999


def test_chinese_vocabulary_is_tokenized(bge_style_bundle: Path) -> None:
    model = BundleModel(bge_style_bundle)
    ids = model.tokenizer.encode(["北京是中华人民共和国的首都。"])[0].ids
    unk = model.tokenizer._plain.token_to_id("[UNK]")
    assert len(ids) > 5 and ids.count(unk) == 0


def test_cross_encoder_logits_match_torch(cross_encoder_bundle: Path, cross_encoder_source: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    manifest = load_manifest(cross_encoder_bundle)
    assert manifest.task == "rerank" and manifest.labels == ["LABEL_0"] and manifest.output_name == "logits"
    assert manifest.variants["float32"].parity["max_abs_diff"] <= 1e-4
    assert "int8" in manifest.variants or "int8" in manifest.refused_variants
    pairs = [("what is deep learning", "deep learning learns representations"), ("capital of france", "paris")]
    ours = BundleModel(cross_encoder_bundle).logits(pairs)
    tokenizer = AutoTokenizer.from_pretrained(str(cross_encoder_source))
    model = AutoModelForSequenceClassification.from_pretrained(str(cross_encoder_source)).eval()
    with torch.inference_mode():
        encoded = tokenizer([p[0] for p in pairs], [p[1] for p in pairs], padding=True, return_tensors="pt")
        expected = model(**encoded).logits.numpy()
    assert np.abs(ours - expected).max() <= 1e-4


def test_classifier_labels(classifier_bundle: Path) -> None:
    manifest = load_manifest(classifier_bundle)
    assert manifest.task == "classify"
    assert manifest.labels == ["negative", "neutral", "positive"]
    assert manifest.dimensions == 3
    assert BundleModel(classifier_bundle).logits(["good", "bad"]).shape == (2, 3)


def test_int8_below_its_bar_is_refused_or_forced(work_dir: Path, bge_style_source: Path) -> None:
    impossible = {"int8": {"mean_cosine": 1.5}}
    refused = export_quietly(bge_style_source, "tiny-refused", work_dir / "models", int8=True,
                             bar_overrides=impossible)
    manifest = load_manifest(refused.bundle_dir)
    assert "int8" not in manifest.variants
    assert not (refused.bundle_dir / "model_int8.onnx").exists()
    assert manifest.refused_variants["int8"]["bars"]["mean_cosine"] == 1.5
    forced = export_quietly(bge_style_source, "tiny-forced", work_dir / "models", int8=True,
                            bar_overrides=impossible, force=True)
    forced_manifest = load_manifest(forced.bundle_dir)
    assert forced_manifest.variants["int8"].forced and not forced_manifest.variants["int8"].passed
    assert json.loads((forced.bundle_dir / "manifest.json").read_text())["variants"]["int8"]["forced"] is True


def test_failed_export_leaves_existing_bundle_untouched(work_dir: Path, bge_style_source: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    output = work_dir / "atomic"
    first = export_quietly(bge_style_source, "model", output).bundle_dir
    before = {p.name: sha256_file(p) for p in first.iterdir()}

    def broken(*args: object, **kwargs: object) -> Path:
        raise ExportFailure("injected failure during fp16 conversion")

    monkeypatch.setattr(onnx_export, "convert_fp16", broken)
    with pytest.raises(ExportFailure, match="injected"):
        export_quietly(bge_style_source, "model", output, fp16=True)
    with pytest.raises(ExportFailure, match="injected"):
        export_quietly(bge_style_source, "fresh", output, fp16=True)
    assert {p.name: sha256_file(p) for p in first.iterdir()} == before
    assert sorted(p.name for p in output.iterdir() if not p.name.endswith(".lock")) == ["model"]


def test_reexport_replaces_bundle(work_dir: Path, bge_style_source: Path) -> None:
    output = work_dir / "replace"
    export_quietly(bge_style_source, "model", output)
    (output / "model" / "stray-file").write_text("from the old bundle")
    export_quietly(bge_style_source, "model", output, optimize="none")
    assert not (output / "model" / "stray-file").exists()
    assert load_manifest(output / "model").variants["float32"].graph_optimization == "none"
    shutil.rmtree(output)


def test_models_with_external_weight_files(work_dir: Path, bge_style_source: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Models over 2 GB (bge-m3 in fp32) come out of the ONNX export with their weights in a side
    file; a small model re-saved that way takes the same path through optimize, quantize and fp16."""
    import onnx

    original = onnx_export.export_onnx

    def export_with_side_file(source: object, work: Path) -> Path:
        path = original(source, work)  # type: ignore[arg-type]
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx_data", size_threshold=0)
        return path

    monkeypatch.setattr(onnx_export, "export_onnx", export_with_side_file)
    bundle = export_quietly(bge_style_source, "tiny-external", work_dir / "models", int8=True, fp16=True).bundle_dir
    manifest = load_manifest(bundle)
    fp32 = manifest.variants["float32"]
    assert fp32.external_data, "the fp32 variant should keep its weights in a side file"
    assert fp32.padded_file is None and fp32.packed_tokens == 0  # not packed: one copy of the weights
    for name, digest in fp32.external_data.items():
        assert sha256_file(bundle / name) == digest
    assert fp32.parity["min_cosine"] >= 0.99999
    assert {"int8", "float16"} <= set(manifest.variants) | set(manifest.refused_variants)
    ours = BundleModel(bundle).embed(NEW_TEXTS)
    assert _cosines(ours, _st_encode(bge_style_source, NEW_TEXTS)).min() >= 0.99999
    (bundle / next(iter(fp32.external_data))).unlink()
    from service.core.manifest import ManifestError

    with pytest.raises(ManifestError, match="weight file"):
        load_manifest(bundle)


def test_packed_float32_export(work_dir: Path, bge_style_source: Path) -> None:
    """By default the fused fp32 graph runs its token-wise operators on real tokens, checked against the
    source model like any fp32 graph, in one file every session runs; fp16 is converted from the padded
    graph, and int8 is searched against the padded fp32 graph's speed, as with --no-packed-float32."""
    import onnx

    bundle = export_quietly(bge_style_source, "tiny-packed-fp32", work_dir / "models", int8=True,
                            fp16=True).bundle_dir
    manifest = load_manifest(bundle, verify_files=True)
    fp32 = manifest.variants["float32"]
    assert fp32.packed_tokens == 2 and fp32.padded_file is None and fp32.graph_optimization == "O2"
    assert fp32.passed and fp32.parity["min_cosine"] >= 0.99999

    def ops(variant: str) -> list[str]:
        return [node.op_type for node in onnx.load(str(bundle / manifest.variants[variant].file)).graph.node]

    assert ops("float32").count("NonZero") == 1 and {"Attention", "EmbedLayerNormalization"} <= set(ops("float32"))
    assert "NonZero" not in ops("float16") and "SkipLayerNormalization" in ops("float16")
    texts = ["short", "a longer text than the first one, so that the batch has padding in it", "x y"]
    ours = BundleModel(bundle, "float32").embed(texts)
    assert _cosines(ours, _st_encode(bge_style_source, texts)).min() >= 0.99999


def test_lone_passes_run_the_padded_int8_graph(minilm_bundle: Path, tmp_path: Path) -> None:
    """Worker sessions run the packed int8 graph, the lone-pass session the padded one; both give the same
    embeddings. A bundle whose padded graph is missing or changed is refused at load."""
    from service.core.manifest import ManifestError
    from service.engines.ort_engine import OrtEngine, SessionConfig

    model = BundleModel(minilm_bundle, variant="int8", session_config=SessionConfig(intra_op_threads=1),
                        lone_session_config=SessionConfig(intra_op_threads=2))
    engine = model.engine
    assert isinstance(engine, OrtEngine) and engine.has_lone_session
    assert engine.model_path.name == "model_int8.onnx" and engine.lone_model_path.name == "model_int8_padded.onnx"
    texts = ["a short one", "a somewhat longer text that pads the first one in the same batch"]
    batch = model.tokenizer.pad(model.tokenizer.encode(texts))
    worker, lone = model.forward_pooled(batch), model.forward_pooled(batch, lone=True)
    cosines = (worker * lone).sum(axis=1) / np.linalg.norm(worker, axis=1) / np.linalg.norm(lone, axis=1)
    assert cosines.min() > 0.995  # int8 both; the padded graph's dynamic scales also cover the padding rows

    copy = tmp_path / "bundle"
    shutil.copytree(minilm_bundle, copy)
    with (copy / "model_int8_padded.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ManifestError, match=r"model_int8_padded\.onnx has changed"):
        load_manifest(copy, verify_files=True)
    (copy / "model_int8_padded.onnx").unlink()
    with pytest.raises(ManifestError, match=r"model_int8_padded\.onnx is missing"):
        load_manifest(copy, verify_files=True)
