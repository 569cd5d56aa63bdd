"""The `embedrank` command: `export` a model to a bundle, `serve` bundles, `inspect` a bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# CLI flag -> Settings field, for flags given as plain values (TEI's names).
_SERVE_FLAGS: list[tuple[str, str, type, str]] = [
    ("--model-id", "model_id", str, "bundle directory (models/NAME) or Hugging Face model directory; repeatable"),
    ("--served-model-name", "served_model_name", str, "name clients use in `model`; one per --model-id"),
    ("--models-dir", "models_dir", Path, "where bundles exported at start-up are cached (default models/)"),
    ("--hostname", "hostname", str, "address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)"),
    ("--port", "port", int, "port (default 8080)"),
    ("--device", "device", str, "auto | cpu | cuda"),
    ("--dtype", "dtype", str, "auto | float32 | int8 | float16"),
    ("--max-batch-tokens", "max_batch_tokens", int, "padded tokens per forward pass (default 16384)"),
    ("--target-batch-tokens", "target_batch_tokens", int, "padded tokens at which a batch stops growing (CPU 1024)"),
    ("--inline-pass-tokens", "inline_pass_tokens", int,
     "a lone request up to this many tokens runs on the event loop's thread (CPU 64, 0 never)"),
    ("--max-batch-requests", "max_batch_requests", int, "items per forward pass (default: token budget only)"),
    ("--result-cache-size", "result_cache_size", int, "results of repeated inputs kept per model (default 0: off)"),
    ("--max-client-batch-size", "max_client_batch_size", int, "inputs per request (default 2048)"),
    ("--max-concurrent-requests", "max_concurrent_requests", int, "requests admitted at once (default 512)"),
    ("--max-input-characters", "max_input_characters", int, "longest input in characters"),
    ("--queue-timeout-seconds", "queue_timeout_seconds", float, "drop requests not started within this time"),
    ("--payload-limit", "payload_limit", int, "largest request body in bytes (default 2000000)"),
    ("--api-key", "api_key", str, "require Authorization: Bearer KEY"),
    ("--api-key-file", "api_key_file", Path, "file of API keys, one per line"),
    ("--public-paths", "public_paths", str, "paths open without a key (default /health,/ready,/metrics,...)"),
    ("--default-prompt-name", "default_prompt_name", str, "prompt of the model prepended to every input"),
    ("--default-prompt", "default_prompt", str, "literal prompt prepended to every input"),
    ("--tokenization-workers", "tokenization_workers", int, "threads tokenizing large requests"),
    ("--intra-op-threads", "intra_op_threads", int, "ONNX Runtime threads per pass (CPU: 1; CUDA: cores)"),
    ("--engine-workers", "engine_workers", int, "passes run at once per model (CPU: one per core; CUDA: 2)"),
    ("--engine-sessions", "engine_sessions", int, "sessions per model on CPU (int8: one per pass; fp32: 1)"),
    ("--spin-microseconds", "spin_microseconds", int, "bound on ONNX Runtime's spinning between operators (0)"),
    ("--release-memory-idle-seconds", "release_memory_idle_seconds", float,
     "quiet seconds after which unused engine memory goes back to the system (2; 0: never)"),
    ("--inference-nice", "inference_nice", int, "nice value of inference threads (event loop first)"),
    ("--log-level", "log_level", str, "debug | info | warning | error"),
    ("--otlp-endpoint", "otlp_endpoint", str, "OpenTelemetry collector for request spans (OTLP gRPC)"),
    ("--otlp-service-name", "otlp_service_name", str, "service.name of the spans (default embedrank)"),
    ("--graceful-shutdown-seconds", "graceful_shutdown_seconds", int, "grace period for in-flight requests"),
    ("--cors-allow-origin", "cors_allow_origin", str, "origins allowed from browsers (repeatable or comma-separated)"),
    ("--llm", "llm", str, "generation upstream NAME=URL (OpenAI base URL); repeatable, same NAME = pool"),
    ("--llm-config", "llm_config", Path, "upstreams file (TOML or JSON) with keys, aliases and timeouts"),
    ("--llm-connect-timeout", "llm_connect_timeout", float, "seconds to connect to an upstream (default 5)"),
    ("--llm-read-timeout", "llm_read_timeout", float, "seconds to wait for an upstream answer or chunk (600)"),
    ("--llm-max-response-bytes", "llm_max_response_bytes", int, "largest upstream response passed on"),
    ("--llm-max-concurrent-requests", "llm_max_concurrent_requests", int, "generation requests at once (1024)"),
    ("--llm-health-check-seconds", "llm_health_check_seconds", float, "probe interval for failed upstreams"),
]
_BOOL_FLAGS = [
    ("--auto-truncate", "auto_truncate", "truncate over-long inputs unless a request says otherwise (default true)"),
    ("--json-output", "json_output", "log JSON lines"),
    ("--warmup", "warmup", "warm up before reporting ready (default true)"),
    ("--log-requests", "log_requests", "one log line per request (default true)"),
    ("--split-oversized-batches", "split_oversized_batches", "split requests over --max-client-batch-size"),
    ("--allow-spinning", "allow_spinning", "let ONNX Runtime threads spin between operators (default false)"),
    ("--direct-routes", "direct_routes", "serve the hot POST routes without the framework's router (default true)"),
]


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _bool_or_auto(value: str) -> bool | str:
    return "auto" if value.lower() == "auto" else _bool(value)


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, field, kind, help_text in _SERVE_FLAGS:
        repeatable = field in ("model_id", "served_model_name", "cors_allow_origin", "llm")
        parser.add_argument(flag, dest=field, type=kind, help=help_text, default=argparse.SUPPRESS,
                            action="append" if repeatable else "store")
    parser.add_argument("-p", dest="port", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for flag, field, help_text in _BOOL_FLAGS:
        parser.add_argument(flag, dest=field, type=_bool, nargs="?", const=True, default=argparse.SUPPRESS,
                            help=help_text)
    parser.add_argument("--lone-pass", dest="lone_pass", type=_bool_or_auto, nargs="?", const=True,
                        default=argparse.SUPPRESS, help="auto | true | false: run a lone batch on every core, "
                        "spinning (auto: where warm-up measures it faster)")


def serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.config import Settings

    given = {key: value for key, value in vars(args).items() if key != "command"}
    for key in ("model_id", "served_model_name", "cors_allow_origin", "llm"):
        if key in given:
            given[key] = [part for value in given[key] for part in value.split(",") if part]
    try:
        settings = Settings(**given)
    except ValidationError as error:
        for detail in error.errors():
            location = ".".join(str(part) for part in detail["loc"]) or "settings"
            print(f"error: {location}: {detail['msg']}", file=sys.stderr)
        return 2
    from service.server import run_server

    return run_server(settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embedrank", description="Embeddings and rerank server on ONNX Runtime.")
    commands = parser.add_subparsers(dest="command", required=True)
    from exporters.cli import add_arguments

    export = commands.add_parser("export", help="export a Hugging Face model to a verified ONNX bundle")
    add_arguments(export)
    serve_parser = commands.add_parser("serve", help="serve bundles over HTTP (TEI flag names accepted)")
    _add_serve_arguments(serve_parser)
    bench = commands.add_parser("bench", help="measure the in-process ceiling of a bundle (ONNX Runtime directly)")
    bench.add_argument("bundle", help="bundle directory (models/NAME)")
    bench.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    bench.add_argument("--json", dest="json_path", default=None, help="also write the results to this file")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                       help="execution provider: cpu measures float32 and int8, cuda float32 and float16")
    inspect = commands.add_parser("inspect", help="print a bundle's manifest summary")
    inspect.add_argument("bundle", help="bundle directory (models/NAME)")
    args = parser.parse_args(argv)
    if args.command == "inspect":
        return _inspect(args.bundle)
    if args.command == "serve":
        return serve(args)
    if args.command == "bench":
        from service.bench import main as bench_main
        from service.engines.ort_engine import EngineError

        try:
            return bench_main(args.bundle, args.json_path, args.seconds, args.device)
        except EngineError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    from exporters.cli import run

    return run(args)


def _inspect(bundle: str) -> int:
    from exporters.cli import print_summary
    from service.core.manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(Path(bundle))
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_summary(Path(bundle), manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
