"""Pooling, post-pooling Dense layers and normalization in numpy, as the bundle manifest says."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.core.manifest import DenseLayer

FloatArray = NDArray[np.float32]


def _f32(values: Any) -> FloatArray:
    return np.asarray(values, dtype=np.float32)


def pool(hidden: FloatArray, attention_mask: NDArray[np.int64], mode: str) -> FloatArray:
    """Reduce token embeddings [batch, tokens, hidden] to one vector per row (right padding assumed)."""
    mask = attention_mask.astype(np.float32)[:, :, None]
    if mode == "cls":
        return _f32(np.ascontiguousarray(hidden[:, 0, :]))
    if mode in ("mean", "mean_sqrt_len_tokens"):
        summed = (hidden * mask).sum(axis=1)
        counts = np.clip(mask.sum(axis=1), 1e-9, None)
        divisor = np.sqrt(counts) if mode == "mean_sqrt_len_tokens" else counts
        return _f32(summed / divisor)
    if mode == "max":
        masked = np.where(mask > 0, hidden, np.float32(-1e9))
        return _f32(masked.max(axis=1))
    if mode == "lasttoken":
        last = attention_mask.sum(axis=1).astype(np.int64) - 1
        return _f32(np.ascontiguousarray(hidden[np.arange(hidden.shape[0]), last, :]))
    if mode == "weightedmean":
        positions = np.arange(1, hidden.shape[1] + 1, dtype=np.float32)[None, :, None] * mask
        summed = (hidden * positions).sum(axis=1)
        return _f32(summed / np.clip(positions.sum(axis=1), 1e-9, None))
    raise ValueError(f"unsupported pooling mode {mode!r}")


def _activation(name: str, values: FloatArray) -> FloatArray:
    if name == "identity":
        return values
    if name == "tanh":
        return np.tanh(values)
    if name == "relu":
        return np.maximum(values, 0)
    if name == "sigmoid":
        return _f32(1.0 / (1.0 + np.exp(-values)))
    if name == "gelu":
        # Exact (erf) GELU as torch.nn.GELU computes it; rare enough that a vectorized math.erf will do.
        erf = np.vectorize(math.erf, otypes=[np.float32])
        return _f32(0.5 * values * (1.0 + erf(values / math.sqrt(2.0))))
    raise ValueError(f"unsupported activation {name!r}")


class DenseStack:
    """The Dense modules that follow pooling, loaded from the bundle's .npy files."""

    def __init__(self, bundle_dir: Path, layers: list[DenseLayer]) -> None:
        self._layers: list[tuple[FloatArray, FloatArray | None, str]] = []
        for layer in layers:
            weight = np.load(bundle_dir / layer.weight_file, allow_pickle=False).astype(np.float32)
            if weight.shape != (layer.out_features, layer.in_features):
                raise ValueError(f"{layer.weight_file} has shape {weight.shape}, manifest says "
                                 f"{(layer.out_features, layer.in_features)}")
            bias = (
                np.load(bundle_dir / layer.bias_file, allow_pickle=False).astype(np.float32)
                if layer.bias_file
                else None
            )
            self._layers.append((np.ascontiguousarray(weight.T), bias, layer.activation))

    def __call__(self, vectors: FloatArray) -> FloatArray:
        for weight_t, bias, activation in self._layers:
            vectors = vectors @ weight_t
            if bias is not None:
                vectors = vectors + bias
            vectors = _activation(activation, vectors.astype(np.float32))
        return vectors


def normalize(vectors: FloatArray) -> FloatArray:
    """Rows scaled to unit length (rows of zeros stay zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))[:, None]  # cheaper than linalg.norm on small batches
    np.maximum(norms, 1e-12, out=norms)
    return _f32(vectors / norms)


def sigmoid(values: FloatArray) -> FloatArray:
    return _f32(1.0 / (1.0 + np.exp(-values.astype(np.float64))))


def softmax(values: FloatArray) -> FloatArray:
    shifted = values.astype(np.float64) - values.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return _f32(exp / exp.sum(axis=-1, keepdims=True))
