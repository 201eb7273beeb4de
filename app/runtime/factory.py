"""Build a ready-to-serve runtime from a store entry: load, smoke-test, warm up.

Blocking (torch.load, forwards): callers run it in a worker thread so serving
never stalls while a model (re)loads.
"""

from __future__ import annotations

import torch

from app.config import Settings
from app.devices import resolve_device
from app.errors import TrustNotAllowed
from app.loading import CheckpointSpec, load_checkpoint
from app.nets import net_spec
from app.nets.declared import PythonNet
from app.runtime.base import ModelRuntime
from app.runtime.classifier import ClassifierRuntime
from app.runtime.segmenter import SegmenterRuntime
from app.runtime.tensor import TensorRuntime
from app.store import ModelEntry, ModelStore

RUNTIMES: dict[str, type[ModelRuntime]] = {cls.task: cls for cls in (ClassifierRuntime, SegmenterRuntime, TensorRuntime)}
"""One runtime class per model family, keyed by the family the net registry names (a new family
is one more module and one more entry here)."""


def build_runtime(store: ModelStore, entry: ModelEntry, version: str, settings: Settings) -> ModelRuntime:
    config = entry.config
    assert config is not None, "caller checks entry.error first"
    if config.checkpoint.trusted and not settings.allow_trusted_checkpoints:
        raise TrustNotAllowed(
            f"model {entry.name}: model.toml says trusted = true (full unpickling, which runs the file's code), "
            "but the server does not allow it; set MODSERVE_ALLOW_TRUSTED_CHECKPOINTS=true to allow it, "
            "or save the model's state_dict instead"
        )
    code = None
    if net_spec(config.architecture).root_class is PythonNet:
        if not settings.allow_model_code:
            raise TrustNotAllowed(
                f"model {entry.name}: architecture {config.architecture} imports the model.py beside its model.toml,"
                " which is Python code that runs with the server's rights; the server does not allow it: set"
                " MODSERVE_ALLOW_MODEL_CODE=true to allow it, or export the model with torch.export (.pt2)"
            )
        code = store.model_code_path(entry.name)
    device = resolve_device(config.runtime.device, settings.device)
    path = store.checkpoint_path(entry, version)
    spec = CheckpointSpec(
        path=path,
        format=config.checkpoint.format,
        sha256=config.checkpoint.sha256_for(version),
        trusted=config.checkpoint.trusted,
        pickled_class_names=config.checkpoint.pickled_class_names,
        code=code,
    )
    loaded = load_checkpoint(config.architecture, config.arguments, spec, device)
    runtime = RUNTIMES[net_spec(config.architecture).task](
        name=entry.name,
        version=version,
        config=config,
        model=loaded.model,
        device=device,
        sha256=loaded.sha256,
        metadata=loaded.metadata,
    )
    runtime.smoke_test()
    runtime.set_pixel_limit(settings.max_image_pixels)
    if settings.warmup:
        sizes = sorted({1, config.runtime.max_batch_size})
        runtime.warmup(tuple(sizes))
    if settings.fault_injection:
        from app.runtime.faults import FaultInjector

        runtime.fault_hook = FaultInjector(settings.fault_injection)
    return runtime


def release(runtime: ModelRuntime) -> None:
    """Drop a retired model's weights and give cached GPU memory back."""
    device = runtime.device
    runtime.model = torch.nn.Module()
    if device.type == "cuda":
        torch.cuda.empty_cache()
