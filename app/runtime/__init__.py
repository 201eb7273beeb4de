"""Runtimes: a loaded net plus its pre- and post-processing, called by the batcher.

One class per model family on a common base (``base.ModelRuntime``): ``classifier``,
``segmenter``; ``factory`` builds the right one for a store entry.
"""
