"""The OpenAI-compatible HTTP API. No tensors here."""
