"""OpenAI embeddings wire schemas."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

TokenIds = list[Annotated[int, Field(ge=0)]]


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | TokenIds | list[str] | list[TokenIds] = Field(
        description="A text, a list of texts, token ids, or a list of token-id lists.", examples=["hello world"])
    model: str | None = Field(None, description="Served model name; optional when one embedding model is served.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes of each vector.")
    dimensions: int | None = Field(None, description="Keep the first N dimensions, then re-normalize.")
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(item, int) for item in value):
            return [list(value)]  # type: ignore[arg-type]
        return list(value)  # type: ignore[arg-type]


def embeddings_response(vectors: NDArray[np.float32], model: str, tokens: int,
                        encoding_format: str) -> dict[str, Any]:
    """The response body; vectors stay numpy arrays for orjson's fast path."""
    if encoding_format == "base64":
        little_endian = vectors.astype("<f4", copy=False)
        embeddings: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little_endian]
    else:
        embeddings = list(vectors)
    return {
        "object": "list",
        "data": [{"object": "embedding", "embedding": embedding, "index": index}
                 for index, embedding in enumerate(embeddings)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        # Infinity's clients read these two as well; OpenAI's ignore them.
        "id": f"embd-{uuid.uuid4().hex}",
        "created": int(time.time()),
    }


def models_response(models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": models}
