"""The demo: a store of seeded models per architecture plus two trained models, and their trainer.

``store`` and ``trained`` are what the server uses (``--demo-if-empty``, ``modserve demo-store``);
``train`` and ``data`` make the trained checkpoints (``modserve train-demo``) and are never imported
by the server, nor shipped in the image.
"""
