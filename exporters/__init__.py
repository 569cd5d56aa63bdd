"""Turns Hugging Face / sentence-transformers checkpoints into verified ONNX bundles.

The pipeline is linear: resolve -> export -> optimize -> quantize -> validate -> manifest.
torch and the other export-only libraries are imported lazily, so `import exporters` stays cheap.
"""

__version__ = "0.1.0"
