"""The adapter registry: the store on disk, its index, validation and versions."""
