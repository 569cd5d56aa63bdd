"""The `embedrank` command: `export` a model to a bundle, `serve` bundles."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embedrank", description="Embeddings and rerank server on ONNX Runtime.")
    commands = parser.add_subparsers(dest="command", required=True)
    from exporters.cli import add_arguments

    export = commands.add_parser("export", help="export a Hugging Face model to a verified ONNX bundle")
    add_arguments(export)
    inspect = commands.add_parser("inspect", help="print a bundle's manifest summary")
    inspect.add_argument("bundle", help="bundle directory (models/NAME)")
    args = parser.parse_args(argv)
    if args.command == "inspect":
        return _inspect(args.bundle)
    if args.command == "export":
        from exporters.cli import run

        return run(args)
    parser.error(f"unknown command {args.command}")
    return 2


def _inspect(bundle: str) -> int:
    from pathlib import Path

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
