"""Upstream configuration and pool choice for the generation proxy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.proxy.pool import Pool
from service.proxy.upstreams import UpstreamConfigError, load_upstreams, parse_flag


def test_flags_form_pools_and_base_urls_get_v1() -> None:
    specs = load_upstreams(["llama3.2:1b=http://127.0.0.1:11434", "big=http://a:8000/v1/", "big=http://b:8000/v1"],
                           None)
    assert [(spec.name, spec.urls, spec.model) for spec in specs] == [
        ("llama3.2:1b", ["http://127.0.0.1:11434/v1"], "llama3.2:1b"),
        ("big", ["http://a:8000/v1", "http://b:8000/v1"], "big"),
    ]


@pytest.mark.parametrize("value", ["nourl", "=http://a", "x=", "x=ftp://a/v1", "x=http://a/v1?next=http://b",
                                   "x=/v1"])
def test_bad_flags_are_refused(value: str) -> None:
    with pytest.raises(UpstreamConfigError):
        parse_flag(value)


def test_file_with_aliases_keys_and_timeouts(tmp_path: Path) -> None:
    toml = tmp_path / "llm.toml"
    toml.write_text('[[upstream]]\nname = "chat"\nurls = ["http://a:8000/v1", "http://b:8000"]\n'
                    'model = "meta-llama/Llama-3.1-8B-Instruct"\naliases = ["gpt-4o-mini"]\n'
                    'api_key_env = "VLLM_KEY"\nread_timeout = 30\n')
    spec, = load_upstreams(["chat=http://c:8000/v1"], toml)
    assert spec.urls == ["http://a:8000/v1", "http://b:8000/v1", "http://c:8000/v1"]
    assert (spec.model, spec.aliases, spec.api_key_env, spec.read_timeout, spec.connect_timeout) == \
        ("meta-llama/Llama-3.1-8B-Instruct", ["gpt-4o-mini"], "VLLM_KEY", 30.0, None)


@pytest.mark.parametrize("entry, message", [
    ({"url": "http://a/v1"}, "`name` is required"),
    ({"name": "x"}, "`url` or `urls`"),
    ({"name": "x", "url": "http://a", "read_timeout": -1}, "positive number"),
    ({"name": "x", "url": "http://a", "api_key": "inline"}, "unknown keys"),
])
def test_bad_files_say_what_is_wrong(tmp_path: Path, entry: dict[str, object], message: str) -> None:
    path = tmp_path / "llm.json"
    path.write_text(json.dumps({"upstream": [entry]}))
    with pytest.raises(UpstreamConfigError, match=message):
        load_upstreams([], path)


def test_a_name_used_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "llm.json"
    path.write_text(json.dumps([{"name": "a", "url": "http://a"}, {"name": "b", "url": "http://b", "aliases": ["a"]}]))
    with pytest.raises(UpstreamConfigError, match="used by two upstreams"):
        load_upstreams([], path)


def test_pool_picks_least_outstanding_and_skips_members_that_are_down() -> None:
    pool = Pool.of("p", ["http://a", "http://b", "http://c"])
    a, b, c = pool.members
    a.outstanding, b.outstanding, c.outstanding = 3, 1, 2
    assert pool.pick(set()) is b
    pool.mark_down(b, "refused")
    assert pool.pick(set()) is c
    assert pool.pick({"http://c"}) is a
    assert pool.pick({"http://a", "http://c"}) is b  # down, but the last one left is tried anyway
    assert pool.pick({"http://a", "http://b", "http://c"}) is None
    pool.mark_down(a, "refused")
    pool.mark_down(c, "refused")
    assert pool.pick(set()) is b  # all down: the one down longest is tried anyway
    pool.mark_up(c)
    assert pool.pick(set()) is c and c.up


def test_ties_rotate() -> None:
    pool = Pool.of("p", ["http://a", "http://b"])
    assert {pool.pick(set()).url for _ in range(4)} == {"http://a", "http://b"}  # type: ignore[union-attr]
