"""Start-up: find or build each bundle, pick device and variant, warm up, start its batcher."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from service.batching.policy import pass_token_budget
from service.core.manifest import MANIFEST_FILE, ManifestError, load_manifest
from service.core.registry import ModelRegistry, ServedModel
from service.engines.bundle import BundleModel
from service.engines.layout import thread_layout
from service.engines.ort_engine import EngineError, SessionConfig, cuda_available, default_intra_op_threads
from service.engines.priority import set_pass_slot
from service.engines.tokenizer import TokenizedItem

if TYPE_CHECKING:
    from service.config import Settings

logger = logging.getLogger("embedrank.loading")


class StartupError(RuntimeError):
    """The server cannot start as configured; the message says why and what to do."""


def bundle_directory(model_id: str, models_dir: Path) -> Path:
    """A bundle as given, or a Hugging Face directory exported once into `models_dir`."""
    path = Path(model_id).expanduser()
    if (path / MANIFEST_FILE).is_file():
        return path
    if not (path / "config.json").is_file():
        raise StartupError(
            f"--model-id {model_id}: not a bundle ({MANIFEST_FILE} missing) and not a Hugging Face model directory; "
            f"create a bundle with: embedrank export SOURCE --name NAME --output {models_dir}")
    cached = models_dir / path.resolve().name
    if (cached / MANIFEST_FILE).is_file():
        try:
            if load_manifest(cached, verify_files=False).source.get("id") == str(path.resolve()):
                logger.info("using bundle %s exported earlier from %s", cached, path)
                return cached
        except ManifestError:
            pass
    try:
        import torch  # noqa: F401

        import exporters.pipeline  # noqa: F401  (only to learn whether the export extra is installed)
    except ImportError:
        raise StartupError(
            f"{model_id} is a Hugging Face model directory, not a bundle, and the export extra is not installed "
            f"here. Run: pip install 'embedrank[export]' && embedrank export {path} --name {cached.name} "
            f"--int8 --output {models_dir}, then serve --model-id {cached}") from None
    logger.info("exporting %s to %s (once; later starts reuse it)", path, cached)
    # A child process keeps torch out of the server process.
    command = [sys.executable, "-m", "exporters", str(path), "--name", cached.name, "--int8",
               "--output", str(models_dir)]
    if subprocess.run(command, check=False).returncode != 0:
        raise StartupError(f"exporting {model_id} failed (see the exporter's output above)")
    return cached


def choose_device(requested: str) -> str:
    if requested == "cuda":
        if not cuda_available():
            raise StartupError("--device cuda: no usable CUDA device (install the gpu extra, onnxruntime-gpu, "
                               "on a machine with an NVIDIA GPU and driver)")
        return "cuda"
    if requested == "auto":
        device = "cuda" if cuda_available() else "cpu"
        logger.info("device auto: using %s%s", device,
                    "" if device == "cuda" else " (no onnxruntime-gpu with a visible GPU)")
        return device
    return "cpu"


def choose_variant(available: list[str], dtype: str, device: str, bundle: Path) -> str:
    if dtype == "auto":
        if device == "cuda" and "float16" in available:
            return "float16"
        return "float32"
    if dtype not in available:
        raise StartupError(f"--dtype {dtype}: bundle {bundle} has no {dtype} variant (it has "
                           f"{', '.join(available)}); re-export with "
                           f"{'--int8' if dtype == 'int8' else '--fp16'} to add it")
    return dtype


# The lone-pass session is kept (with lone_pass auto) only where a short lone request is at least this much
# faster on it than on a main session: it costs a second copy of the weights and two spinning threads.
LONE_PASS_MIN_GAIN = 0.10
LONE_PASS_TIMING_TEXT = "How long does one short request take on this machine, alone?"


def time_lone_pass(model: ServedModel, samples: int = 20) -> tuple[float, float]:
    """The fastest of `samples` passes of a short lone request on the lone session and on a main one, in
    milliseconds, timed in turn (after one untimed pass each). The fastest, not the median: anything else
    running slows the two-thread lone session far more than the one-thread one (one of its threads waits
    for the other), and a start-up that catches such a spell must not drop a session that is faster."""
    items = model.bundle.tokenizer.encode([LONE_PASS_TIMING_TEXT])
    tags = ["logits" if model.task != "embed" else "pooled"]
    timings: dict[bool, list[float]] = {True: [], False: []}
    for sample in range(samples + 1):
        for lone in (True, False):
            started = time.perf_counter()
            model.run_batch(items, tags, lone)
            if sample:
                timings[lone].append((time.perf_counter() - started) * 1000)
    return min(timings[True]), min(timings[False])


def decide_lone_pass(model: ServedModel, lone_ms: float, main_ms: float) -> bool:
    """Keep the lone-pass session where it was measured at least `LONE_PASS_MIN_GAIN` faster; else drop it."""
    keep = lone_ms <= main_ms * (1 - LONE_PASS_MIN_GAIN)
    if not keep:
        model.bundle.engine.drop_lone_session()  # type: ignore[attr-defined]
        if model.layout is not None:
            model.layout = replace(model.layout, lone_threads=None)
    logger.info("%s: a short lone request takes %.2f ms on the lone-pass session and %.2f ms without; %s",
                model.name, lone_ms, main_ms, "keeping it" if keep else "not keeping it (--lone-pass true keeps it)")
    return keep


def warm_up(model: ServedModel, pass_tokens: int, max_batch_requests: int | None,
            choose_lone_pass: bool = False) -> None:
    """Run the shapes the batcher will use: a lone short input, a full batch of short ones, and the
    longest inputs at the widest batch a pass holds (`pass_tokens`, capped to keep start-up quick).
    With `choose_lone_pass`, keep the lone-pass session only if it is measured faster (`decide_lone_pass`)."""
    max_length = model.manifest.max_length
    limit = max_batch_requests or 1 << 30
    shapes = [(1, 8), (min(32, limit), 16)]
    rows = max(1, min(limit, min(pass_tokens, 4096) // max_length))
    shapes.append((rows, max_length))
    token_id = model.bundle.tokenizer.pad_id + 1 if model.bundle.tokenizer.pad_id == 0 else 5
    tags = "logits" if model.task != "embed" else "pooled"
    for direction in ("right", "left"):  # builds the truncating tokenizers, so no request pays for it
        model.bundle.tokenizer.encode(["warm up"], truncate=True, direction=direction)
    lone_session = getattr(model.bundle.engine, "has_lone_session", False)
    sessions = getattr(model.bundle.engine, "session_count", 1)
    batches = [[TokenizedItem(ids=[token_id] * length, type_ids=[0] * length, truncated=False)] * count
               for count, length in shapes]

    def warm_session(slot: int) -> None:
        """Every shape on main session `slot`, as the batcher worker that will use it."""
        set_pass_slot(slot)
        try:
            for items in batches:
                model.run_batch(items, [tags] * len(items))
        finally:
            set_pass_slot(0)

    # Several main sessions are single-threaded passes meant to run at once: warm them at once too, each
    # on a thread of its own (ONNX Runtime lets go of the GIL while it runs), so start-up does not take
    # one warm-up per session.
    if sessions > 1:
        with ThreadPoolExecutor(max_workers=sessions - 1, thread_name_prefix="warm-up") as pool:
            others = [pool.submit(warm_session, slot) for slot in range(1, sessions)]
            warm_session(0)
            for other in others:
                other.result()
    else:
        warm_session(0)
    if lone_session:  # lone batches are mostly small: its short shapes only, for a quick start
        for items in batches[:2]:
            model.run_batch(items, [tags] * len(items), True)
    if lone_session and choose_lone_pass:
        decide_lone_pass(model, *time_lone_pass(model))
    # The widest warm-up batch grew the arena; give that back so an idle server stays small (traffic
    # with big batches grows it again, up to what --max-batch-tokens allows).
    release = getattr(model.bundle.engine, "release_memory", None)
    if release is not None:
        release()


def load_models(model_ids: list[str], served_names: list[str], models_dir: Path, device: str, dtype: str,
                session_config: SessionConfig, max_batch_tokens: int, max_batch_requests: int | None,
                warmup: bool = True, engine_workers: int | None = None, lone_pass: bool | None = None,
                target_batch_tokens: int | None = None, engine_sessions: int | None = None) -> ModelRegistry:
    """Load every model (batchers are started by the app, which owns the metrics). `lone_pass` None: a
    lone-pass session is made and kept only where warm-up measures it faster (kept without warm-up).
    `engine_sessions`: main sessions per model on CPU (None: as `thread_layout` chooses)."""
    if not model_ids:
        raise StartupError("no model to serve: pass --model-id models/NAME (or set MODEL_ID)")
    chosen_device = choose_device(device)
    served: list[ServedModel] = []
    for position, model_id in enumerate(model_ids):
        started = time.perf_counter()
        try:
            directory = bundle_directory(model_id, models_dir)
            manifest = load_manifest(directory)
        except ManifestError as error:
            raise StartupError(str(error)) from None
        except OSError as error:
            raise StartupError(f"cannot read {model_id}: {error.strerror} ({error.filename})") from None
        variant = choose_variant(list(manifest.variants), dtype, chosen_device, directory)
        layout = thread_layout(variant, chosen_device, default_intra_op_threads(),
                               session_config.intra_op_threads or None, engine_workers, lone_pass is not False,
                               session_config.allow_spinning or session_config.spin_microseconds > 0,
                               engine_sessions)
        if chosen_device == "cuda" and dtype == "auto" and variant != "float16":
            logger.info("%s has no float16 variant; running float32 on CUDA", directory)
        try:
            bundle = BundleModel(directory, variant=variant, device=chosen_device,  # type: ignore[arg-type]
                                 session_config=replace(session_config, intra_op_threads=layout.intra_op_threads,
                                                        cpu_arena=session_config.cpu_arena and layout.arena),
                                 manifest=manifest, lone_session_config=replace(
                                     session_config, intra_op_threads=layout.lone_threads, allow_spinning=True,
                                     spin_microseconds=0, skip_layer_norm_fusion=True) if layout.lone_threads else None,
                                 sessions=layout.sessions)
        except (EngineError, KeyError, ValueError, OSError) as error:
            raise StartupError(f"cannot load {directory}: {error}") from None
        name = served_names[position] if served_names else manifest.name
        model = ServedModel(name=name, bundle=bundle, variant=variant, device=chosen_device, layout=layout,
                            aliases=[alias for alias in {manifest.name, str(model_id), manifest.source.get("id")}
                                     if alias and alias != name])
        if any(existing.name == name for existing in served):
            raise StartupError(f"two models are served as '{name}'; use --served-model-name to tell them apart")
        if warmup:
            warm_up(model, pass_token_budget(chosen_device, max_batch_tokens, target_batch_tokens),
                    max_batch_requests, choose_lone_pass=lone_pass is None)
        logger.info("serving %s (%s, %s %s; %s) from %s, ready in %.2fs", name, manifest.task, chosen_device,
                    variant, (model.layout or layout).describe(), directory, time.perf_counter() - started)
        served.append(model)
    return ModelRegistry(served)


def load_configured(settings: Settings) -> ModelRegistry:
    """`load_models` with the server's settings."""
    config = SessionConfig(intra_op_threads=settings.intra_op_threads or 0, nice=settings.inference_nice,
                           allow_spinning=settings.allow_spinning, spin_microseconds=settings.spin_microseconds)
    return load_models(settings.model_id, settings.served_model_name, settings.models_dir, settings.device,
                       settings.dtype, config, settings.max_batch_tokens, settings.max_batch_requests,
                       warmup=settings.warmup, engine_workers=settings.engine_workers,
                       lone_pass=None if settings.lone_pass == "auto" else bool(settings.lone_pass),
                       target_batch_tokens=settings.target_batch_tokens, engine_sessions=settings.engine_sessions)
