"""ONNX Runtime engine: the sessions of one model variant; CPU and CUDA differ only in providers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from service.engines.priority import pass_slot, with_nice
from service.engines.tokenizer import EncodedBatch

Device = Literal["cpu", "cuda"]


class EngineError(RuntimeError):
    """The engine could not be created or a forward pass failed."""


class Engine(Protocol):
    """What the batcher needs from a model: one forward pass over a padded batch."""

    device: Device

    def forward(self, batch: EncodedBatch, lone: bool = False) -> NDArray[np.float32]:
        """Return the model output for the batch: token embeddings [B, T, H] or logits [B, L].
        `lone`: nothing else runs or waits, so the pass may use the whole machine."""
        ...


@dataclass(frozen=True)
class SessionConfig:
    """ONNX Runtime session settings.

    `memory_pattern` pre-plans buffers per input shape: with ever-changing sequence lengths it only
    adds plans, so it is off by default. The CPU arena keeps freed blocks for reuse; with
    `arena_extend_strategy=kSameAsRequested` it grows only by what is asked for, which keeps RSS close
    to the largest batch seen instead of doubling (a float32 session that passes share goes without it:
    see service.engines.layout). ONNX Runtime's worker threads spin between
    operators by default; in a server that burns the CPU the event loop needs to feed the next batch,
    so spinning is off unless asked for; `spin_microseconds` bounds each spin, which keeps most of the
    latency gain at a smaller cost. Spinning threads stop the moment the last running pass ends
    (`session.force_spinning_stop`), so an idle server never spins.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    nice: int = 0
    allow_spinning: bool = False
    spin_microseconds: int = 0  # > 0: spin at most this long between operators (implies spinning)
    memory_pattern: bool = False
    cpu_arena: bool = True
    cuda_device_id: int = 0
    # The CUDA provider's `sdpa_kernel` bitmask: which attention kernels ONNX Runtime may pick (0: its own
    # choice). See FP16_ATTENTION_KERNELS.
    cuda_attention_kernels: int = 0
    # On CPU, let ONNX Runtime fuse each residual Add and its LayerNormalization into SkipLayerNormalization
    # (see disabled_optimizers below). Always on for CUDA.
    skip_layer_norm_fusion: bool = False


# ONNX Runtime's CPU SkipLayerNormalization kernel is slower than the Add and LayerNormalization it replaces,
# except for the smallest passes. Profiled single-threaded on the 2-core Zen 4 EPYC (ONNX Runtime 1.32,
# all-MiniLM-L6-v2, 8 texts of 13 tokens a pass): 12 SkipLayerNormalization nodes took 2.5 ms of a 27.5 ms
# fp32 pass; in the int8 graph, where they were not fused, 12 LayerNormalization nodes took 0.35 ms and
# the residual Adds ~0.2 ms. With the fusion off, in alternated in-process windows: fp32 1.085x at 8 texts
# a pass, 1.052x at 32, 1.076x for 4 texts of 256 tokens, 0.977x at one text; int8 (one fused node)
# 1.016x / 1.022x / 0.986x. So sessions that serve load run without it, and the lone-pass session, which
# runs single requests, with it.
SKIP_LAYER_NORM_FUSION = "SkipLayerNormFusion"


def disabled_optimizers(config: SessionConfig, device: Device) -> list[str]:
    """ONNX Runtime graph optimizers a session with these settings runs without."""
    return [SKIP_LAYER_NORM_FUSION] if device == "cpu" and not config.skip_layer_norm_fusion else []


# ONNX Runtime 1.31's attention kernels, as bits of the CUDA provider's `sdpa_kernel` option.
FLASH_ATTENTION = 1
EFFICIENT_ATTENTION = 2
TRT_FUSED_ATTENTION = 4
CUDNN_FLASH_ATTENTION = 8
MATH_ATTENTION = 16
TRT_FLASH_ATTENTION = 32
# Every kernel but cuDNN's flash attention, for float16 models. Left to itself, ONNX Runtime 1.31 runs the
# fp16 BERT Attention op on an H200 with cuDNN's, which builds a plan for each new input shape: about 70 ms
# of CPU the first time a (batch, length) pair is seen, so a server fed texts of many lengths kept paying
# it (32 clients of 5-250 words got 29 texts/s in fp16 against 1,097 in fp32). Without it, a new shape's
# first pass took 10.5 ms and a repeat 1.5 ms, against 68.6 and 1.8 (20 shapes of 4 texts, in-process).
FP16_ATTENTION_KERNELS = (FLASH_ATTENTION | EFFICIENT_ATTENTION | TRT_FUSED_ATTENTION | MATH_ATTENTION
                          | TRT_FLASH_ATTENTION)


def cuda_provider_options(config: SessionConfig) -> dict[str, Any]:
    """The CUDA execution provider's options for a session with these settings."""
    options: dict[str, Any] = {
        "device_id": config.cuda_device_id,
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
    }
    if config.cuda_attention_kernels:
        options["sdpa_kernel"] = str(config.cuda_attention_kernels)
    return options


def session_options(config: SessionConfig) -> Any:
    """ONNX Runtime's SessionOptions for a session with these settings (the providers and the disabled
    optimizers are given when the session is made)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = config.intra_op_threads or default_intra_op_threads()
    options.inter_op_num_threads = config.inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_mem_pattern = config.memory_pattern
    options.enable_cpu_mem_arena = config.cpu_arena
    options.log_severity_level = 3
    spinning = config.allow_spinning or config.spin_microseconds > 0
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if config.spin_microseconds:
        options.add_session_config_entry("session.intra_op.spin_duration_us", str(config.spin_microseconds))
    return options


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def cuda_available() -> bool:
    """True when onnxruntime-gpu is installed and a CUDA device can be used."""
    if "CUDAExecutionProvider" not in available_providers():
        return False
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def trim_heap() -> None:
    """Return the C heap's free memory to the system (glibc's malloc_trim; a no-op elsewhere). Buffers
    that ONNX Runtime and numpy freed stay mapped in malloc's arenas otherwise."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: libc is already loaded


def default_intra_op_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


class OrtEngine:
    """Runs one ONNX file. Inputs are bound once per call; on CUDA through IO binding.

    On CPU it may hold `sessions` main sessions, so that passes running at once each have their own: a
    thread's passes run on session `pass_slot() % sessions` (service.engines.priority). Each has its own
    weights and its own arena, whose blocks then stay with the core that last used them.
    """

    def __init__(
        self,
        model_path: Path,
        input_names: list[str],
        output_name: str,
        device: Device = "cpu",
        config: SessionConfig | None = None,
        lone_config: SessionConfig | None = None,
        sessions: int = 1,
        lone_model_path: Path | None = None,
    ) -> None:
        config = config or SessionConfig()
        self._cuda_device_id = config.cuda_device_id
        self.device: Device = device
        self.model_path = model_path
        self._session = self._open(model_path, config, device)
        # More main sessions (CPU only), one per pass that runs at once; the first is `_session`.
        self._sessions = [self._session] + [self._open(model_path, config, device)
                                            for _ in range(max(1, sessions) - 1 if device == "cpu" else 0)]
        # A lone pass (nothing else running or waiting) may use a second, wider session that spins.
        # `lone_model_path`: the same model as another graph for it (see Variant.padded_file).
        self.lone_model_path = lone_model_path or model_path
        self._lone_session = (self._open(self.lone_model_path, lone_config, device)
                              if lone_config and device == "cpu" else None)
        # The graph optimizers each kind of session runs without (see disabled_optimizers).
        self.disabled_optimizers = disabled_optimizers(config, device)
        self.lone_disabled_optimizers = (disabled_optimizers(lone_config, device)
                                         if lone_config and self._lone_session else [])
        session_inputs = {node.name for node in self._session.get_inputs()}
        missing = [name for name in input_names if name not in session_inputs]
        if missing:
            raise EngineError(f"{model_path.name} lacks inputs {missing}")
        self.input_names = [name for name in ("input_ids", "attention_mask", "token_type_ids")
                            if name in session_inputs]
        self.output_name = output_name

    @staticmethod
    def _open(model_path: Path, config: SessionConfig, device: Device) -> Any:
        import onnxruntime as ort

        options = session_options(config)
        providers: list[Any]
        if device == "cuda":
            if "CUDAExecutionProvider" not in available_providers():
                raise EngineError(
                    "CUDA was requested but onnxruntime has no CUDAExecutionProvider; "
                    "install the gpu extra (onnxruntime-gpu) on a machine with an NVIDIA GPU"
                )
            providers = [("CUDAExecutionProvider", cuda_provider_options(config)), "CPUExecutionProvider"]
        else:
            providers = [("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]
        disabled = disabled_optimizers(config, device)
        try:
            session = with_nice(config.nice, lambda: ort.InferenceSession(
                str(model_path), options, providers=providers, disabled_optimizers=disabled))
        except Exception as error:  # onnxruntime raises its own exception types
            raise EngineError(f"cannot load {model_path}: {error}") from error
        if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            raise EngineError("onnxruntime could not initialise the CUDA provider (is a GPU visible?)")
        return session

    def session_config_entry(self, key: str) -> str:
        """A session option as ONNX Runtime holds it (empty when unset)."""
        try:
            return str(self._session.get_session_options().get_session_config_entry(key))
        except Exception:  # onnxruntime raises its own error type for an unset key
            return ""

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def _feeds(self, batch: EncodedBatch) -> dict[str, NDArray[np.int64]]:
        arrays = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "token_type_ids": batch.token_type_ids,
        }
        return {name: arrays[name] for name in self.input_names}

    def release_memory(self) -> None:
        """Hand the arenas' free blocks back to the system (one tiny forward pass with arena shrinkage on each
        session that has an arena), and the C heap's free memory (where sessions without one allocate).
        Called after warm-up, whose widest batch would otherwise stay resident for good, and by the
        batcher when the server has been quiet for a while after a burst."""
        import onnxruntime as ort

        options = ort.RunOptions()
        arenas = f"cpu:0;gpu:{self._cuda_device_id}" if self.device == "cuda" else "cpu:0"
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)
        one = np.ones((1, 1), dtype=np.int64)
        for session in (*self._sessions, self._lone_session):
            # ONNX Runtime refuses the shrinkage option for a CPU session without an arena.
            if session is not None and (self.device == "cuda" or session.get_session_options().enable_cpu_mem_arena):
                session.run([self.output_name], self._feeds(EncodedBatch(one, one, np.zeros_like(one))), options)
        if self.device == "cpu":
            trim_heap()

    @property
    def session_count(self) -> int:
        """Main sessions (the lone-pass session not counted)."""
        return len(self._sessions)

    @property
    def has_lone_session(self) -> bool:
        return self._lone_session is not None

    def drop_lone_session(self) -> None:
        """Serve lone passes on the main session from now on (the second session's memory goes with it)."""
        self._lone_session = None

    def forward(self, batch: EncodedBatch, lone: bool = False) -> NDArray[np.float32]:
        feeds = self._feeds(batch)
        if lone and self._lone_session is not None:
            return np.asarray(self._lone_session.run([self.output_name], feeds)[0], dtype=np.float32)
        if self.device == "cuda":
            binding = self._session.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)
            binding.bind_output(self.output_name, "cpu")
            self._session.run_with_iobinding(binding)
            output = binding.copy_outputs_to_cpu()[0]
        else:
            sessions = self._sessions
            session = sessions[pass_slot() % len(sessions)] if len(sessions) > 1 else self._session
            output = session.run([self.output_name], feeds)[0]
        return np.asarray(output, dtype=np.float32)
