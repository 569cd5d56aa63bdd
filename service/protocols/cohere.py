"""Cohere rerank v1/v2 and Jina rerank wire schemas.

Cohere v1 and Jina share `POST /v1/rerank` with compatible requests (documents as strings or
`{"text": ...}` objects, `top_n`, `return_documents`). One response serves both: Cohere's `id`,
`results` and `meta`, Jina's `model` and `usage`; each client reads its own fields.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class DocumentObject(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str


class RerankV1Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: str = Field(examples=["What is the capital of the United States?"])
    documents: list[str | DocumentObject] = Field(
        examples=[["Carson City is the capital city of Nevada.", "Washington, D.C. is the capital of the US."]])
    model: str | None = None
    top_n: int | None = None
    return_documents: bool = False
    max_chunks_per_doc: int | None = None
    max_tokens_per_doc: int | None = None

    def texts(self) -> list[str]:
        return [doc if isinstance(doc, str) else doc.text for doc in self.documents]


class RerankV2Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    query: str
    documents: list[str | DocumentObject]
    top_n: int | None = None
    max_tokens_per_doc: int | None = None
    return_documents: bool = False

    def texts(self) -> list[str]:
        return [doc if isinstance(doc, str) else doc.text for doc in self.documents]


def rerank_response(order: list[int], scores: list[float], documents: list[str], return_documents: bool,
                    model: str, tokens: int, api_version: str, truncated: int) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    for index in order:
        result: dict[str, Any] = {"index": index, "relevance_score": scores[index]}
        if return_documents:
            result["document"] = {"text": documents[index]}
        results.append(result)
    meta: dict[str, Any] = {"api_version": {"version": api_version}, "billed_units": {"search_units": 1,
                                                                                       "input_tokens": tokens}}
    if truncated:
        meta["warnings"] = [f"{truncated} document(s) were truncated to fit the model's maximum length"]
    return {"id": str(uuid.uuid4()), "results": results, "meta": meta, "model": model,
            "usage": {"total_tokens": tokens, "prompt_tokens": tokens}, "truncated_documents": truncated}
