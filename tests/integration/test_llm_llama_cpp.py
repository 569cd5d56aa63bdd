"""The generation proxy in front of a real LLM server: llama.cpp's OpenAI-compatible server (from
llama-cpp-python) serving a tiny random Llama built by the test, called with the official openai SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from tests.helpers.server import RunningServer, running_server
from tests.helpers.upstreams import Upstream, llama_cpp_upstream

EOS = 2  # the tiny model's end-of-sequence id: biased away so generations run to max_tokens
NO_EOS = {"logit_bias": {str(EOS): -100}}


@dataclass
class Llama:
    upstream: Upstream
    server: RunningServer

    def proxied(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.url + "/v1", api_key="unused", max_retries=0)

    def direct(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.upstream.url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Llama]:
    logs = tmp_path_factory.mktemp("llama")
    with llama_cpp_upstream(logs) as upstream, \
            running_server(["--llm", f"tiny-llama={upstream.url}"], logs) as server:
        yield Llama(upstream, server)


def test_chat_and_completions(llama: Llama) -> None:
    client = llama.proxied()
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=12, extra_body=NO_EOS)
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 12
    assert isinstance(chat.choices[0].message.content, str) and chat.choices[0].message.content
    completion = client.completions.create(model="tiny-llama", prompt="the", max_tokens=8, extra_body=NO_EOS)
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    assert {model.id for model in client.models.list()} == {"tiny-llama"}


def test_streaming_chat_and_completions(llama: Llama) -> None:
    client = llama.proxied()
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=20, stream=True, extra_body=NO_EOS)
    deltas = [chunk.choices[0].delta.content for chunk in chat if chunk.choices and chunk.choices[0].delta.content]
    assert len(deltas) >= 10
    stream = client.completions.create(model="tiny-llama", prompt="the", max_tokens=20, stream=True,
                                       extra_body=NO_EOS)
    finishes = [chunk.choices[0].finish_reason for chunk in stream if chunk.choices]
    assert finishes[-1] == "length" and len(finishes) >= 10


def _stream_times(client: openai.OpenAI, tokens: int) -> tuple[float, float, int]:
    """(time to first chunk, time to last chunk, chunks) of one streamed completion."""
    started = time.perf_counter()
    first = last = 0.0
    chunks = 0
    for chunk in client.completions.create(model="tiny-llama", prompt="the", max_tokens=tokens, stream=True,
                                           extra_body=NO_EOS):
        if chunk.choices:
            last = time.perf_counter() - started
            first = first or last
            chunks += 1
    return first, last, chunks


def test_chunks_arrive_while_the_upstream_is_still_generating(llama: Llama) -> None:
    # 300 tokens take llama-cpp-python about two seconds; a buffering proxy would deliver the first chunk
    # only at the end. Direct and proxied streams are measured back to back in the same run.
    direct = [_stream_times(llama.direct(), 300) for _ in range(2)]
    proxied = [_stream_times(llama.proxied(), 300) for _ in range(2)]
    for first, last, chunks in proxied:
        assert chunks >= 300  # one per token, then the finish_reason chunk
        assert first < last / 4, (first, last)
    first_direct, first_proxied = min(d[0] for d in direct), min(p[0] for p in proxied)
    added = first_proxied - first_direct
    print(f"time to first chunk: direct {first_direct * 1000:.1f} ms, proxied {first_proxied * 1000:.1f} ms "
          f"(added {added * 1000:.1f} ms); whole stream direct {min(d[1] for d in direct) * 1000:.0f} ms, "
          f"proxied {min(p[1] for p in proxied) * 1000:.0f} ms")
    assert added < 0.05  # generous for a loaded 2-core CI machine; the benchmark measures it properly


def test_upstream_errors_come_back_in_openai_format(llama: Llama) -> None:
    with pytest.raises(openai.BadRequestError):
        # past the 4,096-token context: llama.cpp refuses it with 400, passed through as it was
        llama.proxied().completions.create(model="tiny-llama", prompt="the " * 5000, max_tokens=4)

