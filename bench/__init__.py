"""Benchmark harness for modserve: service vs raw forward ceiling vs naive FastAPI vs LitServe."""
