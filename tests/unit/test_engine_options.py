"""Session options as ONNX Runtime receives them, on a real tiny bundle."""

from __future__ import annotations

from pathlib import Path


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
