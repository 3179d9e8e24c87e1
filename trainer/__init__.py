"""peftserve-train: make PEFT adapters (and our bottleneck and BitFit adapters) from a JSONL file.

This package never imports `server`: it writes the on-disk adapter format
(docs/adapter-format.md) and talks to a running server only over HTTP.
"""
