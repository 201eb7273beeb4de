"""Metrics, structured request logs and request ids."""
