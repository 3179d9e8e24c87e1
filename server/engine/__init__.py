"""The engine: continuous batching over the base model with per-row adapters."""
