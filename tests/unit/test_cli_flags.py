"""Every setting can be given on the command line as well as in the environment."""

from __future__ import annotations

import argparse

from service import cli
from service.config import Settings


def test_every_setting_has_a_flag() -> None:
    parser = argparse.ArgumentParser()
    cli._add_serve_arguments(parser)
    reachable = {action.dest for action in parser._actions}
    assert set(Settings.model_fields) - reachable == set()


def test_a_flag_reaches_its_setting() -> None:
    parser = argparse.ArgumentParser()
    cli._add_serve_arguments(parser)
    given = vars(parser.parse_args(["--result-cache-size", "1000", "--max-batch-tokens", "4096"]))
    assert given == {"result_cache_size": 1000, "max_batch_tokens": 4096}
    assert Settings(**given).result_cache_size == 1000
