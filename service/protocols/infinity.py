"""Infinity wire schemas (libs/infinity_emb/infinity_emb/fastapi_schemas/pymodels.py)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: str = Field(examples=["Where is Munich?"])
    documents: list[str] = Field(examples=[["Munich is in Germany.", "The sky is blue."]])
    return_documents: bool = False
    raw_scores: bool = False
    model: str | None = None
    top_n: int | None = Field(None, description="Keep the N best documents (at least 1).")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: list[str] = Field(examples=[["I love this!", "This is awful."]])
    model: str | None = None
    raw_scores: bool = False


def envelope(kind: str, body: dict[str, Any], model: str, tokens: int) -> dict[str, Any]:
    return {"object": kind, **body, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "id": f"infinity-{uuid.uuid4()}", "created": int(time.time())}
