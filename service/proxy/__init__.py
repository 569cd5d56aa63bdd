"""LLM generation proxy: OpenAI-compatible upstream pools, streaming pass-through."""
