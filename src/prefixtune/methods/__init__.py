"""Parameter-efficient methods, one per file."""
