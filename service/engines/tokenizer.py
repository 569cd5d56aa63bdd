"""Tokenization with the `tokenizers` library from a bundle's tokenizer.json.

The `tokenizers` Tokenizer keeps truncation as mutable state, so one configured instance is kept per
truncation mode instead of toggling a shared one (the instances are used from several threads).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import numpy as np
from numpy.typing import NDArray
from tokenizers import Encoding, Tokenizer

from service.engines.wordpiece import WordPieceFastPath

TruncationDirection = Literal["right", "left"]
TextOrPair = str | tuple[str, str]


class TokenizedItem:
    """One input after tokenization: ids (with special tokens), their type ids, and whether it was cut.

    (A plain class with slots rather than a frozen dataclass: one is made per input on the event loop, and a
    frozen dataclass sets each field through `object.__setattr__`.)"""

    __slots__ = ("ids", "truncated", "type_ids")

    def __init__(self, ids: list[int], type_ids: list[int], truncated: bool) -> None:
        self.ids = ids
        self.type_ids = type_ids
        self.truncated = truncated

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenizedItem):
            return NotImplemented
        return (self.ids, self.type_ids, self.truncated) == (other.ids, other.type_ids, other.truncated)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TokenizedItem(ids={self.ids!r}, type_ids={self.type_ids!r}, truncated={self.truncated!r})"


@dataclass(frozen=True)
class EncodedBatch:
    """Right-padded model inputs for one forward pass."""

    input_ids: NDArray[np.int64]
    attention_mask: NDArray[np.int64]
    token_type_ids: NDArray[np.int64]


class TextTokenizer:
    """Encodes texts and text pairs to ids as the exported model expects them."""

    def __init__(self, tokenizer_file: Path, max_length: int, lowercase_input: bool = False,
                 fast_path: bool = True) -> None:
        self.max_length = max_length
        self.lowercase_input = lowercase_input
        self._file = tokenizer_file
        base = Tokenizer.from_file(str(tokenizer_file))
        base.no_padding()
        base.no_truncation()
        self._plain = base
        self._fast = WordPieceFastPath.for_tokenizer(base) if fast_path else None
        self._truncating: dict[str, Tokenizer] = {}
        self._lock = threading.Lock()
        padding = Tokenizer.from_file(str(tokenizer_file)).padding
        # Read once: `tokenizers` builds the whole vocabulary map to count it (4.5 ms for BERT's 30,522 tokens).
        self.vocabulary_size = int(base.get_vocab_size(with_added_tokens=True))
        self.pad_id: int = int(padding["pad_id"]) if padding else self._guess_pad_id(base)

    @staticmethod
    def _guess_pad_id(tokenizer: Tokenizer) -> int:
        for token in ("[PAD]", "<pad>", "<|endoftext|>", "</s>"):
            token_id = tokenizer.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        return 0

    def _tokenizer(self, truncate: bool, direction: TruncationDirection) -> Tokenizer:
        if not truncate:
            return self._plain
        tokenizer = self._truncating.get(direction)  # made once per direction: the lock is for making it
        if tokenizer is not None:
            return tokenizer
        with self._lock:
            tokenizer = self._truncating.get(direction)
            if tokenizer is None:
                tokenizer = Tokenizer.from_file(str(self._file))
                tokenizer.no_padding()
                tokenizer.enable_truncation(self.max_length, strategy="longest_first", direction=direction)
                self._truncating[direction] = tokenizer
            return tokenizer

    def _prepare(self, item: TextOrPair) -> TextOrPair:
        if not self.lowercase_input:
            return item
        if isinstance(item, tuple):
            return (item[0].lower(), item[1].lower())
        return item.lower()

    def encode(
        self,
        items: Sequence[TextOrPair],
        truncate: bool = True,
        direction: TruncationDirection = "right",
        add_special_tokens: bool = True,
    ) -> list[TokenizedItem]:
        """Tokenize texts or (query, document) pairs; `truncated` tells whether tokens were dropped.

        Where the tokenizer is BERT's WordPiece, ASCII inputs take the Python fast path (the same ids,
        several times cheaper: see `wordpiece`); the rest go to `tokenizers`.
        """
        prepared = [self._prepare(item) for item in items] if self.lowercase_input else items
        fast = self._fast
        if fast is None:
            return self._encode_with_library(prepared, truncate, direction, add_special_tokens)
        max_length = self.max_length if truncate else None
        results: list[TokenizedItem | None] = []
        left: list[int] = []
        for item in prepared:
            encoded = fast.encode(item, max_length, direction, add_special_tokens)
            if encoded is None:
                left.append(len(results))
                results.append(None)
            else:
                results.append(TokenizedItem(*encoded))
        if not left:
            return cast(list[TokenizedItem], results)
        from_library = iter(self._encode_with_library([prepared[index] for index in left], truncate, direction,
                                                      add_special_tokens))
        return [item if item is not None else next(from_library) for item in results]

    def _encode_with_library(self, prepared: Sequence[TextOrPair], truncate: bool, direction: TruncationDirection,
                             add_special_tokens: bool) -> list[TokenizedItem]:
        tokenizer = self._tokenizer(truncate, direction)
        encodings: list[Encoding]
        if len(prepared) == 1:  # encode_batch hands even one input to a thread pool
            single = prepared[0]
            encodings = [tokenizer.encode(*single, add_special_tokens=add_special_tokens) if isinstance(single, tuple)
                         else tokenizer.encode(single, add_special_tokens=add_special_tokens)]
        else:
            encodings = tokenizer.encode_batch(prepared, add_special_tokens=add_special_tokens)
        return [
            TokenizedItem(
                ids=encoding.ids,
                type_ids=encoding.type_ids,
                truncated=bool(encoding.overflowing),
            )
            for encoding in encodings
        ]

    def encode_raw(self, items: list[str], add_special_tokens: bool = True) -> list[Encoding]:
        """Full `tokenizers` encodings (offsets, tokens) for the tokenize route."""
        prepared = [self._prepare(item) for item in items]
        encodings: list[Encoding] = self._plain.encode_batch(prepared, add_special_tokens=add_special_tokens)
        return encodings

    def decode(self, ids: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        texts: list[str] = self._plain.decode_batch(ids, skip_special_tokens=skip_special_tokens)
        return texts

    def special_token_ids(self) -> set[int]:
        return {
            int(token_id)
            for token_id, added in self._plain.get_added_tokens_decoder().items()
            if added.special
        }

    def pad(self, items: list[TokenizedItem], pad_to: int | None = None) -> EncodedBatch:
        """Right-pad a batch to its longest item (or `pad_to`)."""
        width = max(pad_to or 0, max(len(item) for item in items))
        input_ids = np.full((len(items), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(items), width), dtype=np.int64)
        token_type_ids = np.zeros((len(items), width), dtype=np.int64)
        for row, item in enumerate(items):
            length = len(item)
            input_ids[row, :length] = item.ids
            attention_mask[row, :length] = 1
            token_type_ids[row, :length] = item.type_ids
        return EncodedBatch(input_ids, attention_mask, token_type_ids)
