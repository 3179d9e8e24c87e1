"""peftserve: one frozen base model, many PEFT adapters, batched together."""

__version__ = "0.1.0"
