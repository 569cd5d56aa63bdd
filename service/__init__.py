"""embedrank: embeddings, rerank and LLM-proxy server on ONNX Runtime."""

__version__ = "0.1.0"
