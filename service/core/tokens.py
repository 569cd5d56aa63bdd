"""The tokenize and decode use cases (TEI's /tokenize and /decode)."""

from __future__ import annotations

from dataclasses import dataclass

from service.core.registry import ServedModel
from service.errors import ApiError, ErrorKind


@dataclass
class Token:
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


def tokens_of(model: ServedModel, texts: list[str], prompt: str, add_special_tokens: bool) -> list[list[Token]]:
    """Each text's tokens with the text they cover; special tokens have no offsets."""
    tokenizer = model.bundle.tokenizer
    special = tokenizer.special_token_ids()
    full_texts = [prompt + text for text in texts]
    try:
        encodings = tokenizer.encode_raw(full_texts, add_special_tokens=add_special_tokens)
    except Exception as error:  # tokenizers raises TypeError/Exception for text it cannot take
        raise ApiError(ErrorKind.TOKENIZER, f"cannot tokenize the input: {error}") from None
    result = []
    for full, encoding in zip(full_texts, encodings, strict=True):
        tokens = []
        for position, (token_id, (start, stop)) in enumerate(zip(encoding.ids, encoding.offsets, strict=True)):
            if token_id in special:
                tokens.append(Token(token_id, encoding.tokens[position], True, None, None))
            else:
                tokens.append(Token(token_id, full[start:stop], False, start, stop))
        result.append(tokens)
    return result


def decode(model: ServedModel, batches: list[list[int]], skip_special_tokens: bool) -> list[str]:
    if not batches or not any(batches):
        raise ApiError(ErrorKind.EMPTY, "`ids` cannot be empty", param="ids")
    for ids in batches:
        check_token_ids(model, ids, param="ids")
    return model.bundle.tokenizer.decode(batches, skip_special_tokens)


def check_token_ids(model: ServedModel, ids: list[int], param: str | None = None) -> None:
    """Refuse ids the model's vocabulary lacks: the model would fail on them, or quietly compute garbage."""
    vocabulary = model.bundle.tokenizer.vocabulary_size
    if ids and max(ids) >= vocabulary:
        raise ApiError(ErrorKind.VALIDATION, f"token id {max(ids)} is outside the vocabulary (size {vocabulary})",
                       param=param)
