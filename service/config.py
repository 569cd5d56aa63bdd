"""Settings: one pydantic-settings class, TEI's flag and environment names where TEI has the knob."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of the server. Environment variables use the SCREAMING_CASE of the field name."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", populate_by_name=True)

    model_id: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bundle directories to serve (models/NAME), repeatable; a Hugging Face model directory that "
        "is not a bundle yet is exported once into --models-dir. Comma-separated in MODEL_ID.")
    served_model_name: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Names clients use in `model`, one per --model-id (default: the bundle name).")
    models_dir: Path = Field(Path("models"), description="Where bundles exported at start-up are cached.")
    hostname: str = Field("127.0.0.1", description="Address to bind. 0.0.0.0 exposes the server to the network.")
    port: int = Field(8080, ge=1, le=65535, description="TCP port to listen on.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto picks CUDA when onnxruntime-gpu and a GPU are present, else the CPU.")
    dtype: Literal["auto", "float32", "int8", "float16"] = Field(
        "auto", description="Which bundle variant to run. auto: float16 on CUDA, float32 on CPU. int8 is faster "
        "on CPUs at a small, measured accuracy cost (see the bundle manifest).")
    max_batch_tokens: int = Field(
        16384, ge=1, description="Padded tokens per forward pass. Larger batches raise throughput and memory.")
    target_batch_tokens: int | None = Field(
        None, ge=1, description="Padded tokens at which a batch stops growing while more is queued (the rest "
        "runs in the next pass). On CPUs the time per item is lowest around a thousand padded tokens and rises "
        "beyond (activations outgrow the caches), so the default is 1024 on CPU; on CUDA it is max_batch_tokens.")
    inline_pass_tokens: int | None = Field(
        None, ge=0, description="A lone request of one input of at most this many tokens (nothing else queued, "
        "running or arriving, and no two requests overlapping in the last 50 ms) runs on the event loop's own "
        "thread instead of a worker's, which saves two thread wake-ups: 64 on CPU by default, 0 (never) on CUDA. "
        "The loop is held for that pass (2-4 ms for a short query on MiniLM).")
    max_batch_requests: int | None = Field(
        None, ge=1, description="Items per forward pass (default: bounded by max_batch_tokens only).")
    max_client_batch_size: int = Field(
        2048, ge=1, description="Inputs accepted in one request; larger requests get 422.")
    split_oversized_batches: bool = Field(
        False, description="Accept requests with more inputs than --max-client-batch-size and split them across "
        "forward passes instead of answering 422 (clients such as LangChain send 1,000+ texts at once). The "
        "body size limit still applies.")
    max_input_characters: int | None = Field(
        None, ge=1, description="Longest input in characters, checked before tokenizing (422 beyond). Default: "
        "max length x 250 when truncation is off (TEI's rule), no limit when it is on.")
    queue_timeout_seconds: float | None = Field(
        None, gt=0, description="A request whose items have not started computing within this many seconds is "
        "dropped and answered 429: its caller has likely given up. Default: no deadline.")
    max_concurrent_requests: int = Field(
        512, ge=1, description="Requests admitted at once; beyond it requests are refused with 429 at once "
        "instead of queueing. Lower keeps latency bounded under overload.")
    result_cache_size: int = Field(
        0, ge=0, description="Results remembered per model for inputs seen before (sentence embeddings, rerank and "
        "classification scores; not per-token states), least recently used first out. An input whose token ids "
        "(after prompt and truncation) match a remembered one is answered without a forward pass. Each entry "
        "holds one row and its token ids: about 2 KB for a 384-dimension embedding of a short text, 4.4 KB for a "
        "512-token one. 0 (the default) remembers nothing.")
    auto_truncate: bool = Field(
        True, description="Truncate inputs longer than the model's max length when the request does not say; "
        "false answers such inputs with 422 like TEI did before 1.9.")
    payload_limit: int = Field(2_000_000, ge=1024, description="Largest request body in bytes (413 beyond).")
    api_key: SecretStr | None = Field(
        None, description="If set, requests must send `Authorization: Bearer KEY` (several keys: comma-separated). "
        "/health and /metrics stay public.")
    api_key_file: Path | None = Field(
        None, description="File with API keys, one per line (blank lines and # comments ignored); combined "
        "with --api-key. Rotate keys by editing the file and restarting.")
    public_paths: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["/health", "/ready", "/metrics", "/docs", "/openapi.json"],
        description="Paths answered without a key when keys are set (comma-separated). Empty it to protect "
        "everything, probes and metrics included.")
    default_prompt_name: str | None = Field(
        None, description="Prompt (from the bundle's prompts) prepended to every input unless a request names "
        "another.")
    default_prompt: str | None = Field(None, description="Literal prompt prepended to every input.")
    tokenization_workers: int | None = Field(
        None, ge=1, description="Threads tokenizing large requests (default: CPU cores). Small inputs are "
        "tokenized inline, which is faster than a thread hand-off.")
    intra_op_threads: int | None = Field(
        None, ge=1, description="ONNX Runtime threads per forward pass (default on CPU: 1, with one pass per "
        "core; on CUDA: all available cores).")
    engine_workers: int | None = Field(
        None, ge=1, description="Forward passes run at once per model (default on CPU: one per core, each "
        "single-threaded; on CUDA: 2). Given alone on CPU, int8 passes get half the cores each and float32 "
        "passes share the cores; 1 runs one pass at a time on every core.")
    engine_sessions: int | None = Field(
        None, ge=1, description="ONNX Runtime sessions per model on CPU; passes that run at once are spread over "
        "them, each worker on its own (default: one per pass for int8, where a session per pass ran 1.04x-1.12x "
        "faster on 2 cores; 1 for float32, where it did not help and costs 90 MB per copy of MiniLM). Each "
        "session holds its own copy of the weights. Ignored on CUDA.")
    release_memory_idle_seconds: float = Field(
        2.0, ge=0, description="After this many seconds without work following a burst, hand the memory "
        "ONNX Runtime keeps for reuse (its arena's free blocks) back to the system, so RSS grown by large or "
        "long batches does not stay resident while the server is quiet; the next burst allocates it again "
        "(a few milliseconds once). 0 keeps it.")
    lone_pass: Literal["auto"] | bool = Field(
        "auto", description="On CPU, run a lone batch (no other pass running, nothing waiting) on a second "
        "session that uses every core and spins between operators until the pass ends; the sessions that serve "
        "concurrent load never spin. It costs a second copy of the weights (about 90 MB for MiniLM fp32, 60 MB "
        "int8) and answers a lone request sooner only where a short pass gains from more threads: auto times a "
        "short lone request on both sessions during warm-up and keeps the second one only where it is at least "
        "10% faster (MiniLM fp32 on 2 cores: 2.5-3.2 ms against 5.3-5.7; int8 on an AVX-512/AMX Xeon: "
        "1.9-2.1 ms against 1.75, so it goes). true keeps it, false never makes it.")
    allow_spinning: bool = Field(
        False, description="Let ONNX Runtime's threads spin while waiting for work between operators. Faster "
        "forward passes when the machine has nothing else to do; on small machines spinning threads take the "
        "CPU the event loop needs to parse, tokenize and answer, so it is off by default.")
    spin_microseconds: int = Field(
        0, ge=0, le=100_000, description="Let ONNX Runtime's threads spin for at most this many microseconds "
        "between operators (0: as --allow-spinning says). A bounded spin keeps most of the latency gain of "
        "spinning at a smaller cost: measured here with 50, a lone request answered 0.56 ms sooner and 32 "
        "single-text clients got 11% less throughput.")
    inference_nice: int = Field(
        5, ge=0, le=19, description="Nice value of the inference threads (Linux). Above 0 the event loop gets "
        "the CPU first whenever it has work (new requests, /health, refusing a flood) and inference uses what "
        "is left, which keeps /health fast under overload on small machines; 0 treats them alike.")
    direct_routes: bool = Field(
        True, description="Serve the hot POST routes (/embed, /v1/embeddings, the rerank and classify routes) "
        "without the web framework's router and dependency machinery: same handlers, responses and errors, "
        "less event-loop time per request. Off routes everything through the framework (it is always off "
        "with --otlp-endpoint, whose tracing instruments the framework's routes).")
    cors_allow_origin: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed to call from browsers (comma-separated; * for any). "
        "Empty: no CORS headers, so browsers on other origins cannot call the server.")
    log_requests: bool = Field(
        True, description="One log line per request (id, route, status, model, tokens, timings); never the "
        "input text. Costs a few microseconds per request.")
    graceful_shutdown_seconds: int = Field(
        30, ge=0, description="On SIGTERM, how long in-flight requests may take to finish before the server "
        "exits anyway.")
    otlp_endpoint: str | None = Field(
        None, description="Send a trace span per request to this OpenTelemetry collector (OTLP over gRPC, e.g. "
        "localhost:4317). Needs the otel extra.")
    otlp_service_name: str = Field("embedrank", description="service.name of the exported spans.")
    llm: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Generation upstreams as NAME=URL (an OpenAI base URL such as http://127.0.0.1:8000/v1), "
        "repeatable; several URLs under one NAME form a pool. Requests to /v1/chat/completions and "
        "/v1/completions with `model: NAME` are forwarded there. Comma-separated in LLM.")
    llm_config: Path | None = Field(
        None, description="Upstreams file (TOML or JSON): per upstream `name`, `urls`, the `model` name sent "
        "upstream, `aliases`, `api_key_env` (environment variable holding its key) and timeouts.")
    llm_connect_timeout: float = Field(
        5.0, gt=0, description="Seconds to open a connection to an upstream; a failed connection is retried on "
        "another pool member and takes that member out until a health check brings it back.")
    llm_read_timeout: float = Field(
        600.0, gt=0, description="Seconds to wait for an upstream's answer (non-streaming: the whole generation) "
        "or, when streaming, between two chunks; beyond it the client gets 504 (or an error event mid-stream).")
    llm_max_response_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest upstream response or stream passed on; larger ones are "
        "cut off with an error.")
    llm_max_concurrent_requests: int = Field(
        1024, ge=1, description="Generation requests forwarded at once (streams included); beyond it 429.")
    llm_health_check_seconds: float = Field(
        5.0, gt=0, description="How often pool members that are out are probed (GET {url}/models) to bring "
        "them back.")
    json_output: bool = Field(False, description="Log JSON lines instead of text.")
    log_level: str = Field("info", description="Logging level: debug, info, warning, error.")
    warmup: bool = Field(True, description="Run warm-up batches before reporting ready.")

    @field_validator("model_id", "served_model_name", "cors_allow_origin", "llm", "public_paths", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        return _split(value)

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError("log_level must be debug, info, warning, error or critical")
        return value.lower()

    def api_keys(self) -> list[str]:
        """Every accepted key: --api-key (comma-separated) and the lines of --api-key-file."""
        keys = [key.strip() for key in (self.api_key.get_secret_value() if self.api_key else "").split(",")]
        if self.api_key_file is not None:
            lines = self.api_key_file.read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return [key for key in keys if key]

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.served_model_name and len(self.served_model_name) != len(self.model_id):
            raise ValueError("give one --served-model-name per --model-id")
        if self.api_key_file is not None:
            try:
                if not self.api_keys():
                    raise ValueError(f"--api-key-file {self.api_key_file} holds no key")
            except OSError as error:
                raise ValueError(f"cannot read --api-key-file {self.api_key_file}: {error.strerror}") from None
        if self.default_prompt and self.default_prompt_name:
            raise ValueError("--default-prompt and --default-prompt-name are mutually exclusive")
        return self
