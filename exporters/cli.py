"""`embedrank export` / `python -m exporters`: command line of the export pipeline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exporters.errors import ExportError
from service.core.manifest import POOLING_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="local model directory (Hugging Face / sentence-transformers layout) or a hub id")
    parser.add_argument("--name", required=True, help="bundle name: the directory created under --output")
    parser.add_argument("--task", choices=["auto", "embed", "rerank", "classify"], default="auto",
                        help="what the model does; auto detects it from the checkpoint")
    parser.add_argument("--int8", action="store_true",
                        help="also write an accuracy-checked int8 variant for CPUs")
    parser.add_argument("--packed-tokens", action=argparse.BooleanOptionalAction, default=True,
                        help="int8: run the token-wise operators on real tokens only, not on padding (default: on)")
    parser.add_argument("--packed-float32", action=argparse.BooleanOptionalAction, default=True,
                        help="fp32 too (default: on; --no-packed-float32 keeps the padded fp32 graph, e.g. for "
                             "fp32 on CUDA, where the packed one is unmeasured; see the README)")
    parser.add_argument("--fp16", action="store_true", help="also write an fp16 variant for the CUDA provider")
    parser.add_argument("--optimize", choices=["auto", "none", "O1", "O2"], default="auto",
                        help="graph optimization of the fp32 variant (auto: O2 if it keeps parity, else O1)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="maximum sequence length in tokens (default: the model's own)")
    parser.add_argument("--pooling", choices=POOLING_MODES, default=None,
                        help="override the pooling of an embedding model without sentence-transformers files")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) for hub ids")
    parser.add_argument("--output", type=Path, default=Path("models"), help="directory that receives the bundle")
    parser.add_argument("--force", action="store_true",
                        help="write variants that miss their accuracy bar (marked as forced in the manifest)")


def run(args: argparse.Namespace) -> int:
    from exporters.pipeline import ExportOptions, Progress, export_bundle

    options = ExportOptions(
        source=args.source, name=args.name, output=args.output, task=args.task, int8=args.int8,
        fp16=args.fp16, optimize=args.optimize, max_length=args.max_length, pooling=args.pooling,
        revision=args.revision, force=args.force, packed_tokens=args.packed_tokens,
        packed_float32=args.packed_float32,
    )
    try:
        result = export_bundle(options, Progress(6))
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; no bundle was written or changed", file=sys.stderr)
        return 1
    print_summary(result.bundle_dir, result.manifest)
    return 0


def print_summary(bundle_dir: Path, manifest: object) -> None:
    from service.core.manifest import Manifest

    assert isinstance(manifest, Manifest)
    print(f"bundle {bundle_dir}  task={manifest.task}  dims={manifest.dimensions}  "
          f"max_length={manifest.max_length}  pooling={manifest.pooling}  normalize={manifest.normalize}")
    rows = [("variant", "size", "parity", "ms per batch"), *manifest.summary_rows()]
    rows += [(f"{name} (refused)", "-", ", ".join(f"{k}={v:.5g}" for k, v in info["parity"].items()), "-")
             for name, info in manifest.refused_variants.items()]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporters", description="Export a model to an embedrank bundle.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
