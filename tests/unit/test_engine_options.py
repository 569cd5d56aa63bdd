"""Session options as ONNX Runtime receives them, on a real tiny bundle."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any


class Counting:
    """An ONNX Runtime session that counts the passes run on it."""

    def __init__(self, session: object) -> None:
        self.session, self.runs = session, 0

    def run(self, *args: object) -> object:
        self.runs += 1
        return self.session.run(*args)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)  # the session's options and the rest, as they are


class Meeting(Counting):
    """A counting session whose first pass waits at `barrier`, and which notes the thread that ran it."""

    def __init__(self, session: object, barrier: threading.Barrier) -> None:
        super().__init__(session)
        self.barrier, self.first_thread = barrier, 0

    def run(self, *args: object) -> object:
        if not self.runs:
            self.first_thread = threading.get_ident()
            self.barrier.wait()
        return super().run(*args)


def test_spinning_settings_reach_onnx_runtime(bge_style_bundle: Path) -> None:
    from service.engines.bundle import BundleModel
    from service.engines.ort_engine import SessionConfig

    def entries(config: SessionConfig) -> tuple[str, str]:
        engine = BundleModel(bge_style_bundle, session_config=config).engine
        return (engine.session_config_entry("session.intra_op.allow_spinning"),  # type: ignore[attr-defined]
                engine.session_config_entry("session.intra_op.spin_duration_us"))  # type: ignore[attr-defined]

    assert entries(SessionConfig()) == ("0", "")
    assert entries(SessionConfig(allow_spinning=True)) == ("1", "")
    assert entries(SessionConfig(spin_microseconds=50)) == ("1", "50")


def test_lone_session_is_wide_spins_and_agrees(bge_style_bundle: Path) -> None:
    """With a lone-pass config the engine holds a second session (every core, spinning, stopped when the
    pass ends) whose outputs equal the narrow session's; without one, `lone` changes nothing."""
    import numpy as np

    from service.engines.bundle import BundleModel
    from service.engines.ort_engine import SessionConfig

    model = BundleModel(bge_style_bundle, session_config=SessionConfig(intra_op_threads=1),
                        lone_session_config=SessionConfig(intra_op_threads=2, allow_spinning=True))
    engine = model.engine
    assert engine.has_lone_session  # type: ignore[attr-defined]
    lone = engine._lone_session.get_session_options()  # type: ignore[attr-defined]
    assert lone.intra_op_num_threads == 2
    assert lone.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert lone.get_session_config_entry("session.force_spinning_stop") == "1"
    assert engine.session_config_entry("session.intra_op.allow_spinning") == "0"  # type: ignore[attr-defined]
    batch = model.tokenizer.pad(model.tokenizer.encode(["a lone request", "and another, longer one"]))
    np.testing.assert_allclose(model.forward_pooled(batch, lone=True), model.forward_pooled(batch), rtol=1e-5,
                               atol=1e-6)

    wide, narrow = Counting(engine._lone_session), Counting(engine._session)  # type: ignore[attr-defined]
    engine._lone_session, engine._session = wide, narrow  # type: ignore[attr-defined]
    model.forward_pooled(batch, lone=True)
    assert (wide.runs, narrow.runs) == (1, 0)
    model.forward_pooled(batch)
    assert (wide.runs, narrow.runs) == (1, 1)
    plain = BundleModel(bge_style_bundle, session_config=SessionConfig(intra_op_threads=1))
    assert not plain.engine.has_lone_session  # type: ignore[attr-defined]
    np.testing.assert_array_equal(plain.forward_pooled(batch, lone=True), plain.forward_pooled(batch))


def test_passes_run_on_the_session_of_their_slot(bge_style_bundle: Path) -> None:
    """With one session per pass, a thread's passes run on session `slot % sessions` (the batcher's worker i
    is slot i), all agreeing; on one session every slot runs there. The lone session is apart from them."""
    import numpy as np

    from service.engines.bundle import BundleModel
    from service.engines.ort_engine import SessionConfig
    from service.engines.priority import set_pass_slot

    model = BundleModel(bge_style_bundle, session_config=SessionConfig(intra_op_threads=1), sessions=2,
                        lone_session_config=SessionConfig(intra_op_threads=2, allow_spinning=True))
    engine = model.engine
    assert engine.session_count == 2  # type: ignore[attr-defined]
    sessions = engine._sessions  # type: ignore[attr-defined]
    assert sessions[0] is engine._session and sessions[1] is not sessions[0]  # type: ignore[attr-defined]
    assert sessions[1].get_session_options().intra_op_num_threads == 1

    first, second = Counting(sessions[0]), Counting(sessions[1])
    engine._sessions = [first, second]  # type: ignore[attr-defined]
    batch = model.tokenizer.pad(model.tokenizer.encode(["one pass", "and another one, longer"]))
    outputs: dict[int, object] = {}

    def on_slot(slot: int) -> None:
        set_pass_slot(slot)
        outputs[slot] = model.forward_pooled(batch)

    for slot in (1, 3, 0, 2):
        thread = threading.Thread(target=on_slot, args=(slot,))
        thread.start()
        thread.join()
    assert (first.runs, second.runs) == (2, 2)
    outputs[-1] = model.forward_pooled(batch)  # this thread: slot 0
    model.forward_pooled(batch, lone=True)  # the lone session, not a main one
    assert (first.runs, second.runs) == (3, 2)
    for output in outputs.values():
        np.testing.assert_allclose(output, outputs[0], rtol=1e-5, atol=1e-6)  # type: ignore[arg-type]
    assert BundleModel(bge_style_bundle).engine.session_count == 1  # type: ignore[attr-defined]


def test_engine_sessions_follow_the_layout_and_the_setting(bge_style_bundle: Path) -> None:
    """The server makes as many main sessions as its layout names: float32 shares one unless
    --engine-sessions says otherwise, and warm-up has run each of them."""
    from service.config import Settings
    from service.core.loading import load_configured, warm_up

    def load(**settings: object) -> Any:
        registry = load_configured(Settings(model_id=[str(bge_style_bundle)], lone_pass=False,  # type: ignore[arg-type]
                                            **settings))
        return registry.models[0]

    shared = load(engine_workers=2)
    assert shared.layout.sessions == 1 and shared.bundle.engine.session_count == 1  # type: ignore[attr-defined]
    model = load(engine_workers=2, engine_sessions=2)
    assert model.layout.sessions == 2 and model.bundle.engine.session_count == 2  # type: ignore[attr-defined]
    assert "on 2 sessions" in model.layout.describe()  # type: ignore[attr-defined]

    cold = load(engine_workers=2, engine_sessions=2, warmup=False)
    engine = cold.bundle.engine
    engine._sessions = [Counting(session) for session in engine._sessions]
    warm_up(cold, 1024, None)
    assert min(session.runs for session in engine._sessions) >= 3  # every warm-up shape on each session

    # The sessions warm up at once: each one's first pass waits until the other's has begun, which a
    # warm-up that ran the sessions one after the other would never see (the barrier would time out).
    meeting = threading.Barrier(2, timeout=10)
    engine._sessions = [Meeting(session.session, meeting) for session in engine._sessions]
    warm_up(cold, 1024, None)
    first, second = engine._sessions
    assert first.runs == second.runs >= 3 and not meeting.broken
    assert first.first_thread == threading.get_ident() != second.first_thread


def test_a_session_that_passes_share_runs_without_its_arena(bge_style_bundle: Path,
                                                            minilm_bundle: Path) -> None:
    """float32 passes that run at once on one main session would share its CPU arena, so that session goes
    without one (its buffers come from the C heap, per thread); a session of its own per pass, the lone-pass
    session and int8 keep theirs. Handing memory back still works with both kinds (ONNX Runtime refuses the
    arena shrinkage option on a session without an arena)."""
    from service.config import Settings
    from service.core.loading import load_configured

    def load(bundle: Path = bge_style_bundle, **settings: object) -> Any:
        registry = load_configured(Settings(model_id=[str(bundle)], engine_workers=2,  # type: ignore[arg-type]
                                            lone_pass=True, **settings))
        return registry.models[0]

    def arenas(sessions: list[Any]) -> list[bool]:
        return [bool(session.get_session_options().enable_cpu_mem_arena) for session in sessions]

    shared = load()
    engine = shared.bundle.engine
    assert not shared.layout.arena and engine.session_count == 1
    assert arenas(engine._sessions) == [False] and arenas([engine._lone_session]) == [True]
    lone = engine._lone_session = Counting(engine._lone_session)
    engine.release_memory()  # shrinks the lone session's arena; the shrink option on the other would raise
    assert lone.runs == 1
    engine.drop_lone_session()
    engine.release_memory()
    batch = shared.bundle.tokenizer.pad(shared.bundle.tokenizer.encode(["still answered", "after release"]))
    assert shared.bundle.forward_pooled(batch).shape == (2, 32)

    own = load(engine_sessions=2)
    engine = own.bundle.engine
    assert own.layout.arena and engine.session_count == 2
    assert arenas(engine._sessions) == [True, True] and arenas([engine._lone_session]) == [True]
    engine._sessions = [Counting(session) for session in engine._sessions]
    engine.release_memory()
    assert [session.runs for session in engine._sessions] == [1, 1]

    int8 = load(minilm_bundle, dtype="int8", engine_sessions=1)
    assert int8.variant == "int8" and int8.layout.arena and int8.bundle.engine.session_count == 1
    assert arenas(int8.bundle.engine._sessions) == [True]
    int8.bundle.engine.release_memory()


def test_lone_pass_session_is_kept_only_where_it_was_measured_faster(bge_style_bundle: Path) -> None:
    """With --lone-pass auto the server loads both sessions, times a short lone request on each during
    warm-up, and keeps the second only if it was at least 10% faster; a dropped one serves nothing more."""
    from service.config import Settings
    from service.core.loading import decide_lone_pass, load_configured, time_lone_pass

    def load(**settings: object) -> object:
        registry = load_configured(Settings(model_id=[str(bge_style_bundle)], **settings))  # type: ignore[arg-type]
        return registry.models[0]

    model = load(lone_pass=True, warmup=False)
    engine = model.bundle.engine  # type: ignore[attr-defined]
    lone_ms, main_ms = time_lone_pass(model, samples=3)  # type: ignore[arg-type]
    assert lone_ms > 0 and main_ms > 0
    assert decide_lone_pass(model, lone_ms=0.9, main_ms=1.0)  # type: ignore[arg-type]
    assert engine.has_lone_session and model.layout.lone_threads == 2  # type: ignore[attr-defined]
    assert not decide_lone_pass(model, lone_ms=0.95, main_ms=1.0)  # type: ignore[arg-type]
    assert not engine.has_lone_session and model.layout.lone_threads is None  # type: ignore[attr-defined]
    assert "lone batch" not in model.layout.describe()  # type: ignore[attr-defined]
    batch = model.bundle.tokenizer.pad(model.bundle.tokenizer.encode(["still answered"]))  # type: ignore[attr-defined]
    assert model.bundle.forward_pooled(batch, lone=True).shape == (1, 32)  # type: ignore[attr-defined]

    measured = load(warmup=True)  # auto: whichever the timing chose, the engine and the layout agree
    assert measured.bundle.engine.has_lone_session == (measured.layout.lone_threads is not None)  # type: ignore[attr-defined]
    assert not load(lone_pass=False, warmup=True).bundle.engine.has_lone_session  # type: ignore[attr-defined]
    assert load(lone_pass=True, warmup=True).bundle.engine.has_lone_session  # type: ignore[attr-defined]


def test_lone_pass_flag_takes_auto_true_and_false() -> None:
    import argparse

    from service.cli import _add_serve_arguments

    parser = argparse.ArgumentParser()
    _add_serve_arguments(parser)
    assert not hasattr(parser.parse_args([]), "lone_pass")  # the setting's default, auto, applies
    assert parser.parse_args(["--lone-pass", "auto"]).lone_pass == "auto"
    assert parser.parse_args(["--lone-pass"]).lone_pass is True
    assert parser.parse_args(["--lone-pass", "false"]).lone_pass is False


def test_float16_on_cuda_keeps_away_from_cudnn_attention() -> None:
    """cuDNN's flash attention plans every new input shape anew (~70 ms of CPU each on an H200): a
    float16 session on CUDA names every other attention kernel; other variants and devices keep
    ONNX Runtime's own choice, and settings that name kernels themselves win."""
    from service.engines.bundle import variant_session_config
    from service.engines.ort_engine import (
        CUDNN_FLASH_ATTENTION,
        FP16_ATTENTION_KERNELS,
        MATH_ATTENTION,
        SessionConfig,
        cuda_provider_options,
    )

    chosen = variant_session_config("float16", "cuda", None)
    assert chosen is not None and chosen.cuda_attention_kernels == FP16_ATTENTION_KERNELS
    assert not FP16_ATTENTION_KERNELS & CUDNN_FLASH_ATTENTION and FP16_ATTENTION_KERNELS & MATH_ATTENTION
    assert cuda_provider_options(chosen)["sdpa_kernel"] == str(FP16_ATTENTION_KERNELS)
    kept = variant_session_config("float16", "cuda", SessionConfig(intra_op_threads=3))
    assert kept == SessionConfig(intra_op_threads=3, cuda_attention_kernels=FP16_ATTENTION_KERNELS)
    assert variant_session_config("float16", "cuda", SessionConfig(cuda_attention_kernels=MATH_ATTENTION)) == \
        SessionConfig(cuda_attention_kernels=MATH_ATTENTION)
    for variant, device in (("float32", "cuda"), ("float16", "cpu"), ("int8", "cpu")):
        assert variant_session_config(variant, device, None) is None
        assert "sdpa_kernel" not in cuda_provider_options(variant_session_config(variant, device, None)
                                                          or SessionConfig())


def test_skip_layer_norm_fusion_is_off_for_load_and_on_for_lone_requests(bge_style_bundle: Path, bge_style_source: Path,
                                                                          tmp_path: Path) -> None:
    """The sessions that serve load run without ONNX Runtime's SkipLayerNormalization fusion (slower on
    CPUs for passes of several texts); the lone-pass session and CUDA keep it. The optimizer's name is
    checked against ONNX Runtime itself: the padded graph it optimizes keeps LayerNormalization apart with it.
    A graph with packed tokens has nothing to fuse (its residuals are rows of real tokens, not 3-D)."""
    import onnx
    import onnxruntime as ort

    from service.config import Settings
    from service.core.loading import load_configured
    from service.engines.ort_engine import SKIP_LAYER_NORM_FUSION, SessionConfig, disabled_optimizers, session_options
    from tests.conftest import export_quietly

    assert disabled_optimizers(SessionConfig(), "cpu") == [SKIP_LAYER_NORM_FUSION]
    assert disabled_optimizers(SessionConfig(skip_layer_norm_fusion=True), "cpu") == []
    assert disabled_optimizers(SessionConfig(), "cuda") == []

    padded = export_quietly(bge_style_source, "tiny-padded", tmp_path / "models", packed_float32=False).bundle_dir

    def optimized_ops(config: SessionConfig, bundle: Path = padded) -> set[str]:
        options = session_options(config)
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled_optimizers(config, "cpu"))
        return {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}

    # The exported fp32 graph leaves them apart; ONNX Runtime fuses them when loading unless told not to.
    exported = {node.op_type for node in onnx.load(str(padded / "model.onnx")).graph.node}
    assert "LayerNormalization" in exported and "SkipLayerNormalization" not in exported and "Attention" in exported
    apart = optimized_ops(SessionConfig(intra_op_threads=1))
    assert "LayerNormalization" in apart and "SkipLayerNormalization" not in apart
    assert "SkipLayerNormalization" in optimized_ops(SessionConfig(intra_op_threads=1, skip_layer_norm_fusion=True))
    packed = optimized_ops(SessionConfig(intra_op_threads=1, skip_layer_norm_fusion=True), bge_style_bundle)
    assert "NonZero" in packed and "LayerNormalization" in packed and "SkipLayerNormalization" not in packed

    registry = load_configured(Settings(model_id=[str(bge_style_bundle)], lone_pass=True, warmup=False))  # type: ignore[call-arg]
    engine = registry.models[0].bundle.engine  # type: ignore[attr-defined]
    assert engine.has_lone_session
    assert engine.disabled_optimizers == [SKIP_LAYER_NORM_FUSION] and engine.lone_disabled_optimizers == []
