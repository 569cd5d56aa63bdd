"""Which LLM servers the proxy may call: parsed from `--llm NAME=URL` and an optional upstreams file.

Only these URLs are ever called; nothing in a request can name another one.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


class UpstreamConfigError(ValueError):
    """A bad `--llm` value or upstreams file; raised at start-up."""


@dataclass
class UpstreamSpec:
    """One served generation model: the name clients send, the OpenAI base URLs of its pool, and how to
    call them."""

    name: str
    urls: list[str]
    model: str  # the model name sent upstream (clients may use another: `name` or an alias)
    aliases: list[str] = field(default_factory=list)
    api_key_env: str | None = None
    connect_timeout: float | None = None
    read_timeout: float | None = None


def normalize_url(url: str) -> str:
    """An OpenAI base URL (`http://host:8000/v1`); a bare `http://host:8000` gets `/v1` appended."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UpstreamConfigError(f"upstream URL must be http:// or https:// with a host, got {url!r}")
    if parts.query or parts.fragment:
        raise UpstreamConfigError(f"upstream URL must not carry a query or fragment: {url!r}")
    if parts.path in ("", "/"):
        url += "/v1"
    return url


def parse_flag(value: str) -> tuple[str, str]:
    """`NAME=URL` -> (name, url). The name may hold ':' and '/' (Ollama's `llama3.2:1b`)."""
    name, sep, url = value.partition("=")
    if not sep or not name.strip() or not url.strip():
        raise UpstreamConfigError(f"--llm takes NAME=URL (e.g. llama=http://127.0.0.1:8000/v1), got {value!r}")
    return name.strip(), normalize_url(url)


def _from_file(path: Path) -> list[UpstreamSpec]:
    try:
        text = path.read_text()
    except OSError as error:
        raise UpstreamConfigError(f"cannot read upstreams file {path}: {error.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise UpstreamConfigError(f"{path}: {error}") from None
    entries = data.get("upstream", data.get("upstreams")) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise UpstreamConfigError(f"{path}: expected a list of upstreams under `upstream`")
    known = {"name", "url", "urls", "model", "aliases", "api_key_env", "connect_timeout", "read_timeout"}
    specs = []
    for number, entry in enumerate(entries, start=1):
        where = f"{path}: upstream {number}"
        if not isinstance(entry, dict):
            raise UpstreamConfigError(f"{where}: expected a table/object")
        unknown = set(entry) - known
        if unknown:
            raise UpstreamConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        name = entry.get("name")
        urls = entry.get("urls", [entry["url"]] if "url" in entry else None)
        if not isinstance(name, str) or not name:
            raise UpstreamConfigError(f"{where}: `name` is required")
        if not isinstance(urls, list) or not urls or not all(isinstance(url, str) for url in urls):
            raise UpstreamConfigError(f"{where} ({name}): `url` or `urls` is required")
        aliases = entry.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(alias, str) for alias in aliases):
            raise UpstreamConfigError(f"{where} ({name}): `aliases` must be a list of names")
        timeouts = {}
        for key in ("connect_timeout", "read_timeout"):
            value = entry.get(key)
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool) or value <= 0):
                raise UpstreamConfigError(f"{where} ({name}): `{key}` must be a positive number of seconds")
            timeouts[key] = float(value) if value is not None else None
        api_key_env = entry.get("api_key_env")
        if api_key_env is not None and not isinstance(api_key_env, str):
            raise UpstreamConfigError(f"{where} ({name}): `api_key_env` must name an environment variable")
        model = entry.get("model", name)
        if not isinstance(model, str) or not model:
            raise UpstreamConfigError(f"{where} ({name}): `model` must be a non-empty string")
        specs.append(UpstreamSpec(name, [normalize_url(url) for url in urls], model, aliases, api_key_env,
                                  timeouts["connect_timeout"], timeouts["read_timeout"]))
    return specs


def load_upstreams(flags: list[str], file: Path | None) -> list[UpstreamSpec]:
    """Upstreams from the file, then from flags; flags with the same NAME form one pool. A flag naming
    a model the file already has adds URLs to its pool."""
    specs = _from_file(file) if file is not None else []
    by_name = {spec.name: spec for spec in specs}
    for value in flags:
        name, url = parse_flag(value)
        if name in by_name:
            if url not in by_name[name].urls:
                by_name[name].urls.append(url)
        else:
            by_name[name] = UpstreamSpec(name, [url], name)
            specs.append(by_name[name])
    seen: dict[str, str] = {}
    for spec in specs:
        for served in (spec.name, *spec.aliases):
            if served in seen and seen[served] != spec.name:
                raise UpstreamConfigError(f"the name {served!r} is used by two upstreams: {seen[served]}, {spec.name}")
            seen[served] = spec.name
    return specs
