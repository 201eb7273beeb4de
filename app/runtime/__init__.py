"""Runtimes: a loaded net plus its pre- and post-processing, called by the batcher."""
