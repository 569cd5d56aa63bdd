"""The Python WordPiece fast path gives exactly what `tokenizers` gives, on every text it takes."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest

from service.engines.tokenizer import TextTokenizer, TruncationDirection
from service.engines.wordpiece import WordPieceFastPath
from tests.helpers.tiny_models import write_bert_vocab

EXOTIC = ["é", "中文", "\x00", "ß", "\u00a0", "naïve", "\x0b", "\x7f", "[MASK]", "[mask]", "[CLS]", "<s>"]


def _hf_tokenizer_file(directory: Path, kind: str) -> Path:
    from transformers import BertTokenizerFast, DistilBertTokenizerFast, MPNetTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = str(write_bert_vocab(directory, with_cjk=False))
    if kind == "bert-cased":
        tokenizer = BertTokenizerFast(vocab_file=vocab, do_lower_case=False, model_max_length=64)
    elif kind == "mpnet":
        tokenizer = MPNetTokenizerFast(vocab_file=vocab, model_max_length=64)
    else:
        tokenizer = DistilBertTokenizerFast(vocab_file=vocab, model_max_length=64)
    tokenizer.save_pretrained(directory)
    return directory / "tokenizer.json"


def _random_text(rng: random.Random, vocab: list[str]) -> str:
    parts = []
    for _ in range(rng.randint(0, 40)):
        roll = rng.random()
        if roll < 0.5:
            word = rng.choice(vocab).replace("##", "")
            part = word.upper() if rng.random() < 0.1 else word.capitalize() if rng.random() < 0.1 else word
        elif roll < 0.7:
            part = rng.choice(string.punctuation) * rng.randint(1, 3)
        elif roll < 0.8:
            part = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(1, 12)))
        elif roll < 0.84:
            part = rng.choice(string.ascii_lowercase) * rng.randint(95, 105)  # around the per-word limit
        elif roll < 0.93:
            part = rng.choice(["\t", "\n", "\r\n", "  ", ""])
        elif roll < 0.94:
            part = rng.choice(EXOTIC)
        else:
            part = str(rng.randint(0, 10**6))
        parts.append(part + rng.choice([" ", "", " ", "-"]))
    return "".join(parts)


def _compare(tokenizer_file: Path, max_length: int, cases: int, seed: int) -> tuple[int, int]:
    """(inputs compared, inputs the fast path took); fails on the first difference."""
    fast = TextTokenizer(tokenizer_file, max_length, fast_path=True)
    library = TextTokenizer(tokenizer_file, max_length, fast_path=False)
    assert fast._fast is not None
    vocab = list(library._plain.get_vocab(with_added_tokens=False))
    rng = random.Random(seed)
    taken = 0
    for _ in range(cases):
        first = _random_text(rng, vocab)
        item: str | tuple[str, str] = (first, _random_text(rng, vocab)) if rng.random() < 0.3 else first
        truncate = rng.random() < 0.7
        direction: TruncationDirection = rng.choice(["right", "left"])
        special = rng.random() < 0.85
        if fast._fast.encode(item, max_length if truncate else None, direction, special) is not None:
            taken += 1
        assert fast.encode([item], truncate, direction, special) == library.encode([item], truncate, direction,
                                                                                   special), repr(item)
    return cases, taken


def test_minilm_tokenizer_fast_path_matches_the_library(minilm_source: Path) -> None:
    cases, taken = _compare(minilm_source / "tokenizer.json", 32, 3000, seed=7)
    assert taken > cases // 5  # the comparison exercised the fast path, truncation included (32 tokens)


@pytest.mark.parametrize("kind", ["bert-cased", "mpnet", "distilbert"])
def test_other_wordpiece_tokenizers_match_the_library(tmp_path: Path, kind: str) -> None:
    cases, taken = _compare(_hf_tokenizer_file(tmp_path / kind, kind), 24, 1500, seed=11)
    assert taken > cases // 5


def test_batches_mix_fast_and_library_items_in_order(minilm_source: Path) -> None:
    fast = TextTokenizer(minilm_source / "tokenizer.json", 16, fast_path=True)
    library = TextTokenizer(minilm_source / "tokenizer.json", 16, fast_path=False)
    items: list[str | tuple[str, str]] = [
        "plain ascii text", "naïve café", "What is [MASK]?", ("a query", "a document"),
        ("一个问题", "a document"), "word " * 40, ("long " * 20, "pair " * 20), "",
    ]
    for direction in ("right", "left"):
        assert fast.encode(items, True, direction) == library.encode(items, True, direction)
    assert fast.encode(items, False) == library.encode(items, False)
    assert fast.encode(["word " * 40])[0].truncated and len(fast.encode(["word " * 40])[0]) == 16


def test_pipelines_other_than_bert_wordpiece_get_no_fast_path(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "##s": 3, "tiny": 4, "vocab": 5}
    plain = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    plain.normalizer = normalizers.BertNormalizer()
    plain.pre_tokenizer = pre_tokenizers.Whitespace()  # splits differently from BERT's pre-tokenizer
    assert WordPieceFastPath.for_tokenizer(plain) is None
    plain.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    plain.normalizer = normalizers.NFKC()
    assert WordPieceFastPath.for_tokenizer(plain) is None
    assert WordPieceFastPath.for_tokenizer(Tokenizer(models.BPE())) is None
    plain.normalizer = normalizers.BertNormalizer(lowercase=True)
    fast = WordPieceFastPath.for_tokenizer(plain)
    assert fast is not None
    # no post-processor: no special tokens, and the library's own type ids for a pair
    assert fast.encode("Hello worlds", None, "right", True) == ([1, 2, 3], [0, 0, 0], False)
    pair = plain.encode("hello", "tiny vocab")
    assert fast.encode(("hello", "tiny vocab"), None, "right", True) == (pair.ids, pair.type_ids, False)


def test_pairs_are_truncated_longest_first_as_the_library_does(minilm_source: Path) -> None:
    """Every split of the room between query and document: the shorter part whole or both halved, the odd
    token to the longer part, each direction, with and without special tokens."""
    library_file = minilm_source / "tokenizer.json"
    words = ["river", "bank", "model", "server", "quick", "token"]
    for max_length in (5, 8, 13, 16):
        fast = TextTokenizer(library_file, max_length, fast_path=True)
        library = TextTokenizer(library_file, max_length, fast_path=False)
        assert fast._fast is not None
        for first in range(0, 19, 2):
            for second in range(0, 19, 3):
                pair = (" ".join(words[i % 6] for i in range(first)), " ".join(words[i % 5] for i in range(second)))
                for direction in ("right", "left"):
                    for special in (True, False):
                        taken = fast._fast.encode(pair, max_length, direction, special)
                        expected = library.encode([pair], True, direction, special)[0]
                        assert taken is not None, pair
                        assert (taken[0], taken[1], taken[2]) == (expected.ids, expected.type_ids,
                                                                  expected.truncated), (pair, max_length, direction)
                        assert fast.encode([pair], True, direction, special) == [expected]
