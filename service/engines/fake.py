"""A deterministic engine for tests: outputs depend only on each row's own tokens."""

from __future__ import annotations

import threading
import time

import numpy as np
from numpy.typing import NDArray

from service.engines.ort_engine import Device
from service.engines.tokenizer import EncodedBatch


class FakeEngine:
    """Token t's hidden state is a fixed function of its id and of its row's tokens, so pooled vectors
    never depend on what else shares the batch. Logits (for rerank/classify bundles) are functions of the row's ids.

    `delay_seconds` makes every forward pass slow (overload tests); a batch containing
    `fail_on_token` raises (error-isolation tests); a row containing `non_finite_on_token` comes out NaN.
    `batch_sizes` records every batch it ran.
    """

    device: Device = "cpu"

    def __init__(self, hidden_size: int, labels: int = 0, delay_seconds: float = 0.0,
                 fail_on_token: int | None = None, non_finite_on_token: int | None = None) -> None:
        self.hidden_size = hidden_size
        self.labels = labels
        self.delay_seconds = delay_seconds
        self.fail_on_token = fail_on_token
        self.non_finite_on_token = non_finite_on_token
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()

    def forward(self, batch: EncodedBatch, lone: bool = False) -> NDArray[np.float32]:
        with self._lock:
            self.batch_sizes.append(int(batch.input_ids.shape[0]))
        if self.delay_seconds:
            time.sleep(self.delay_seconds)
        if self.fail_on_token is not None and bool((batch.input_ids == self.fail_on_token).any()):
            raise RuntimeError("injected engine failure")
        ids = batch.input_ids.astype(np.float64)
        columns = np.arange(1, self.hidden_size + 1, dtype=np.float64)
        tokens = np.sin(ids[:, :, None] * 0.37 * columns[None, None, :] + columns * 0.11)
        mask = batch.attention_mask[:, :, None].astype(np.float64)
        context = (tokens * mask).sum(axis=1, keepdims=True) / mask.sum(axis=1, keepdims=True)
        hidden = tokens + 0.5 * context  # every token sees its own row, as attention would
        if self.non_finite_on_token is not None:
            hidden[(batch.input_ids == self.non_finite_on_token).any(axis=1)] = np.nan
        if not self.labels:
            return np.asarray(hidden, dtype=np.float32)
        pooled = (hidden * mask).sum(axis=1) / mask.sum(axis=1)
        return np.asarray(pooled[:, : self.labels] * 4.0, dtype=np.float32)
