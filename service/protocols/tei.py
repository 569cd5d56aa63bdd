"""Text Embeddings Inference wire schemas (router/src/http/types.rs), with their conversions."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _direction(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


Direction = Annotated[Literal["right", "left"], BeforeValidator(_direction)]
TokenIds = list[Annotated[int, Field(ge=0)]]
InputItem = str | TokenIds
Inputs = str | TokenIds | list[InputItem]


def flatten_inputs(inputs: Inputs) -> list[str | list[int]]:
    """TEI's `Input`: a string, a list of ids, a list of strings, or a list of id lists."""
    if isinstance(inputs, str):
        return [inputs]
    if inputs and all(isinstance(value, int) for value in inputs):
        return [list(inputs)]  # type: ignore[arg-type]
    return list(inputs)  # type: ignore[arg-type]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EmbedRequest(_Request):
    inputs: Inputs = Field(description="A text, a list of texts, token ids, or a list of token-id lists.",
                           examples=["What is Deep Learning?"])
    normalize: bool = Field(True, description="Return unit-length vectors.")
    truncate: bool | None = Field(None, description="Truncate inputs longer than the model's maximum length "
                                  "(default: the server's --auto-truncate).")
    truncation_direction: Direction = "right"
    prompt_name: str | None = Field(None, description="Name of a prompt of the model prepended to each input.")
    dimensions: int | None = Field(None, description="Keep the first N dimensions (Matryoshka), then normalize.")


class EmbedAllRequest(_Request):
    inputs: Inputs
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    prompt_name: str | None = None


class SimilarityInput(BaseModel):
    source_sentence: str
    sentences: list[str]


class SimilarityParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    prompt_name: str | None = None


class SimilarityRequest(_Request):
    inputs: SimilarityInput
    parameters: SimilarityParameters | None = None


class TokenizeRequest(_Request):
    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None


class DecodeRequest(_Request):
    ids: TokenIds | list[TokenIds]
    skip_special_tokens: bool = True


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class EmbeddingModelType(BaseModel):
    pooling: str


class ClassifierModelType(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class Info(BaseModel):
    model_id: str
    model_sha: str | None
    model_dtype: str
    served_model_name: str
    model_type: dict[str, EmbeddingModelType | ClassifierModelType]
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None = None
    docker_label: str | None = None


class RerankRequest(_Request):
    query: str = Field(examples=["What is Deep Learning?"])
    texts: list[str] = Field(examples=[["Deep Learning is a subfield of machine learning.", "Cheese is tasty."]])
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    raw_scores: bool = Field(False, description="Return logits instead of sigmoid scores.")
    return_text: bool = False


class PredictRequest(_Request):
    inputs: str | list[str] | list[list[str]] = Field(
        description="A text, a pair of texts (a 2-element list), or a batch of texts or pairs.",
        examples=["I like you. I love you"])
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    raw_scores: bool = False

    def shaped(self) -> tuple[list[str | tuple[str, str]], bool]:
        """(inputs, is_batch). As in TEI a list of two strings is one pair, not a batch of two."""
        value = self.inputs
        if isinstance(value, str):
            return [value], False
        if value and all(isinstance(item, str) for item in value):
            texts = [str(item) for item in value]
            if len(texts) == 2:
                return [(texts[0], texts[1])], False
            return list(texts), True
        batch: list[str | tuple[str, str]] = []
        for item in value:
            if isinstance(item, str) or len(item) not in (1, 2):
                raise ValueError("each batch entry must be [text] or [text, text_pair]")
            batch.append(item[0] if len(item) == 1 else (item[0], item[1]))
        return batch, True
