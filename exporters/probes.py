"""Fixed probe inputs for verification, and the retrieval corpus for int8 accuracy.

The corpus is built from the documentation strings in the Python standard library's source files:
real English prose on many topics, available offline and deterministic for a given Python version,
whatever else the process has imported. Its fingerprint is recorded in the manifest next to the
numbers measured on it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

ENGLISH = [
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "The quick brown fox jumps over the lazy dog.",
    "Deep learning models learn hierarchical representations of data.",
    "How do I reset my password if I forgot my email address?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Interest rates rose sharply after the central bank's announcement.",
    "She plays the violin in a small orchestra every Sunday afternoon.",
]
CHINESE = [
    "北京是中华人民共和国的首都。",
    "机器学习是人工智能的一个分支。",
    "今天天气很好，我们去公园散步吧。",
    "如何提高深度学习模型的推理速度？",
    "长江是中国最长的河流，全长约六千三百公里。",
]
VERY_SHORT = ["a", "ok", "7", "。", "Hi!"]
QUERIES = ["what is the capital of france", "how does photosynthesis work", "机器学习是什么"]


def long_text(words: int = 1200) -> str:
    """A text longer than any supported max length, so truncation is part of what is verified."""
    base = (
        "Verification texts must reach the model's maximum sequence length so that truncation and "
        "position embeddings near the limit are covered by the parity check as well. "
    )
    text = base
    while len(text.split()) < words:
        text += base
    return text


def probe_texts() -> list[str]:
    return ENGLISH + CHINESE + VERY_SHORT + [long_text(), "中文长文本" * 600]


def probe_pairs() -> list[tuple[str, str]]:
    documents = ENGLISH[1:6] + CHINESE[:3] + [long_text()]
    return [(query, document) for query in QUERIES for document in documents]


_CORPUS_MODULES = (
    "builtins", "os", "os.path", "collections", "itertools", "functools", "json", "re", "math", "statistics",
    "datetime", "pathlib", "shutil", "subprocess", "threading", "asyncio", "socket", "string", "textwrap",
    "random", "heapq", "bisect", "decimal", "fractions", "csv", "sqlite3", "zipfile", "tarfile", "gzip",
    "hashlib", "hmac", "secrets", "logging", "argparse", "unittest", "typing", "dataclasses", "enum",
    "contextlib", "inspect", "ast", "dis", "tokenize", "email", "http.client", "urllib.parse",
    "urllib.request", "xml.etree.ElementTree", "html", "base64", "struct", "array", "queue", "sched",
    "select", "signal", "time", "calendar", "locale", "gettext", "io", "tempfile", "glob", "fnmatch",
    "pickle", "copy", "pprint", "reprlib", "weakref", "types", "operator", "abc", "numbers", "cmath", "uuid",
    "ipaddress", "mimetypes", "wave", "difflib", "codecs", "unicodedata", "platform", "sys", "traceback",
    "warnings", "gc", "multiprocessing", "concurrent.futures", "ssl", "imaplib", "smtplib", "ftplib",
    "poplib", "configparser", "shelve", "dbm", "zlib", "bz2", "lzma", "filecmp", "stat", "getpass",
    "optparse", "getopt", "pdb", "timeit", "trace", "cProfile", "pstats", "zipimport", "pkgutil", "runpy",
    "importlib", "keyword", "symtable", "token", "pyclbr", "py_compile", "compileall", "site", "sysconfig",
)


# The default retrieval corpus; the calibration texts are taken from the paragraphs after it.
CORPUS_PASSAGES, CORPUS_QUERIES = 1000, 50


@dataclass(frozen=True)
class RetrievalCorpus:
    passages: list[str]
    queries: list[str]
    fingerprint: str


def _source_docstrings(module_name: str) -> list[str]:
    """Docstrings of a standard-library module read from its source file (module, classes, functions).

    Reading the source rather than the live objects keeps the corpus independent of the process:
    submodules appear as attributes once anything imports them, and packages patch functions in.
    Modules written in C have no source file and contribute nothing.
    """
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return []
    origin = spec.origin if spec else None
    if not origin or not origin.endswith(".py"):
        return []
    try:
        tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return []
    nodes = [tree, *(node for node in ast.walk(tree)
                     if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    return [doc for node in nodes if (doc := ast.get_docstring(node, clean=True))]


def _paragraphs() -> list[str]:
    seen: set[str] = set()
    found: list[str] = []
    for module_name in _CORPUS_MODULES:
        for doc in _source_docstrings(module_name):
            for paragraph in doc.split("\n\n"):
                text = " ".join(paragraph.split())
                letters = sum(character.isalpha() for character in text)
                if 60 <= len(text) <= 500 and not text.startswith(">>>") and letters > 0.7 * len(text) \
                        and text not in seen:
                    seen.add(text)
                    found.append(text)
    return found


@functools.cache
def _shuffled_paragraphs() -> tuple[str, ...]:
    paragraphs = sorted(_paragraphs())
    random.Random(1234).shuffle(paragraphs)
    return tuple(paragraphs)


def retrieval_corpus(passages: int = CORPUS_PASSAGES, queries: int = CORPUS_QUERIES) -> RetrievalCorpus:
    paragraphs = list(_shuffled_paragraphs())
    if len(paragraphs) < passages + queries:
        raise RuntimeError(f"only {len(paragraphs)} corpus paragraphs available")
    corpus_passages = paragraphs[:passages]
    corpus_queries = [text.split(". ")[0] for text in paragraphs[passages:passages + queries]]
    digest = hashlib.sha256("\n".join(corpus_passages + corpus_queries).encode()).hexdigest()[:16]
    return RetrievalCorpus(corpus_passages, corpus_queries, digest)


def calibration_texts(count: int = 200, after: int = CORPUS_PASSAGES + CORPUS_QUERIES) -> list[str]:
    """Texts for int8 calibration: the probes plus corpus paragraphs that are neither passages nor
    queries of the default retrieval corpus, so accuracy is never measured on what was calibrated on."""
    extra = list(_shuffled_paragraphs()[after:after + count])
    return probe_texts() + extra


def calibration_pairs(count: int = 200, after: int = CORPUS_PASSAGES + CORPUS_QUERIES) -> list[tuple[str, str]]:
    """Query/passage pairs for calibrating cross-encoders, from the same held-out paragraphs."""
    extra = _shuffled_paragraphs()[after:after + count + 1]
    return probe_pairs() + [(extra[i + 1].split(". ")[0], extra[i]) for i in range(len(extra) - 1)]
