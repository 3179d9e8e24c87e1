"""Adapter kinds: parse saved checkpoints into tensors and apply them to a batch by slot."""
