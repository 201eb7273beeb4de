"""modserve: a production inference service for modified PyTorch models."""

__version__ = "0.1.0"
