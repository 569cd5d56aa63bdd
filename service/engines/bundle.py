"""A loaded bundle: tokenizer + one ONNX variant + the post-processing its manifest prescribes.

The exporter verifies bundles through this class and the server serves them through it, so what was
verified is exactly what is served.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from service.core.manifest import Manifest, load_manifest
from service.engines.ort_engine import FP16_ATTENTION_KERNELS, Device, Engine, OrtEngine, SessionConfig
from service.engines.pooling import DenseStack, normalize, pool
from service.engines.tokenizer import EncodedBatch, TextOrPair, TextTokenizer, TokenizedItem


def variant_session_config(variant: str, device: Device, config: SessionConfig | None) -> SessionConfig | None:
    """The session settings a variant runs with: float16 on CUDA keeps away from cuDNN's attention
    (FP16_ATTENTION_KERNELS) unless the settings name their own attention kernels."""
    if device == "cuda" and variant == "float16":
        settings = config or SessionConfig()
        if not settings.cuda_attention_kernels:
            return replace(settings, cuda_attention_kernels=FP16_ATTENTION_KERNELS)
    return config


def lone_model_file(bundle_dir: Path, manifest: Manifest, variant: str) -> Path:
    """The file a lone pass runs: the variant's padded graph where it has one (Variant.padded_file), else its file."""
    record = manifest.variants[variant]
    return bundle_dir / (record.padded_file or record.file)


class BundleModel:
    """Everything needed to turn tokens into the bundle's outputs."""

    def __init__(
        self,
        bundle_dir: Path,
        variant: str = "float32",
        device: Device = "cpu",
        session_config: SessionConfig | None = None,
        manifest: Manifest | None = None,
        lone_session_config: SessionConfig | None = None,
        engine: Engine | None = None,
        model_file: Path | None = None,
        sessions: int = 1,
    ) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest or load_manifest(bundle_dir)
        if variant not in self.manifest.variants:
            raise KeyError(
                f"bundle {self.manifest.name} has no {variant} variant "
                f"(it has: {', '.join(self.manifest.variants)})"
            )
        self.variant = variant
        self.tokenizer = TextTokenizer(
            bundle_dir / self.manifest.tokenizer["file"],
            max_length=self.manifest.max_length,
            lowercase_input=self.manifest.lowercase_input,
        )
        session_config = variant_session_config(variant, device, session_config)
        record = self.manifest.variants[variant]
        self.engine: Engine = engine or OrtEngine(
            model_file or bundle_dir / record.file,
            input_names=self.manifest.input_names,
            output_name=self.manifest.output_name,
            device=device,
            config=session_config,
            lone_config=lone_session_config,
            sessions=sessions,
            lone_model_path=None if model_file is not None else lone_model_file(bundle_dir, self.manifest, variant),
        )
        self._dense = DenseStack(bundle_dir, self.manifest.dense_layers)

    @property
    def task(self) -> str:
        return self.manifest.task

    def forward_pooled(self, batch: EncodedBatch, lone: bool = False) -> NDArray[np.float32]:
        """Sentence embeddings before normalization (pooling and Dense applied)."""
        return self.pool_hidden(self.engine.forward(batch, lone), batch)

    def pool_hidden(self, hidden: NDArray[np.float32], batch: EncodedBatch) -> NDArray[np.float32]:
        assert self.manifest.pooling is not None
        return self._dense(pool(hidden, batch.attention_mask, self.manifest.pooling))

    def forward_logits(self, batch: EncodedBatch, lone: bool = False) -> NDArray[np.float32]:
        return self.engine.forward(batch, lone)

    def forward_tokens(self, batch: EncodedBatch, lone: bool = False) -> NDArray[np.float32]:
        return self.engine.forward(batch, lone)

    def _batches(self, items: Sequence[TokenizedItem], batch_size: int) -> list[EncodedBatch]:
        return [self.tokenizer.pad(list(items[i:i + batch_size])) for i in range(0, len(items), batch_size)]

    def embed(self, texts: Sequence[str], batch_size: int = 32, normalized: bool | None = None) -> NDArray[np.float32]:
        """Embed texts as the source model would (normalized when the model normalizes)."""
        items = self.tokenizer.encode(list(texts))
        vectors = np.concatenate([self.forward_pooled(b) for b in self._batches(items, batch_size)])
        if self.manifest.normalize if normalized is None else normalized:
            vectors = normalize(vectors)
        return vectors

    def logits(self, inputs: Sequence[TextOrPair], batch_size: int = 32) -> NDArray[np.float32]:
        items = self.tokenizer.encode(list(inputs))
        return np.concatenate([self.forward_logits(b) for b in self._batches(items, batch_size)])
