"""The accuracy corpus must not depend on what the process imported before building it."""

from __future__ import annotations

import subprocess
import sys

from exporters import probes

_OTHER_PROCESS = """
import importlib.util, inspect, io, sys
import concurrent.futures.process, email.mime.text, http.server, logging.handlers, unittest.mock
inspect.getfile = lambda obj: ""  # a package patching a standard-library function
sys.stdout = io.StringIO()
from exporters import probes
corpus = probes.retrieval_corpus()
sys.__stdout__.write(corpus.fingerprint + " " + str(hash(tuple(probes.calibration_texts()))))
"""


def test_corpus_is_the_same_whatever_the_process_imported() -> None:
    corpus = probes.retrieval_corpus()
    result = subprocess.run([sys.executable, "-c", _OTHER_PROCESS], capture_output=True, text=True, check=True,
                            env={"PYTHONHASHSEED": "0", "PYTHONPATH": "."})
    fingerprint, calibration_hash = result.stdout.split()
    assert fingerprint == corpus.fingerprint
    mine = subprocess.run([sys.executable, "-c", "from exporters import probes; import sys; "
                           "sys.stdout.write(str(hash(tuple(probes.calibration_texts()))))"],
                          capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "0", "PYTHONPATH": "."})
    assert mine.stdout == calibration_hash


def test_calibration_texts_are_held_out_from_the_corpus() -> None:
    corpus = probes.retrieval_corpus()
    calibration = set(probes.calibration_texts())
    assert len(calibration) >= 200
    assert not calibration & set(corpus.passages)
    assert not any(query in text for query in corpus.queries for text in calibration if len(query) > 40)
    pairs = probes.calibration_pairs()
    assert len(pairs) >= 200 and not {passage for _, passage in pairs} & set(corpus.passages)
