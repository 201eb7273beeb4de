"""The inference service: what every protocol's routes call.

Validates instances against the live model, decodes and pre-processes them off
the event loop, and submits them to the model's batcher. The native API and
the v2 protocol share this one path to the model.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch

from app.config import Settings
from app.errors import InvalidInput, Overloaded, PayloadTooLarge, StaleModel
from app.lifecycle import ServerState
from app.observability.context import current, note_model
from app.observability.metrics import Metrics
from app.registry import ModelRegistry
from app.runtime.faults import DeviceFault
from app.runtime.uploads import decode_upload
from app.runtime.pixels import PixelBudget, RequestPixels
from app.runtime.base import InferenceItem, ModelRuntime


@dataclass
class Instance:
    """One request item: encoded image bytes, or an already pre-processed float tensor."""

    image_bytes: bytes | None = None
    image: np.ndarray | None = None  # float32 (C, h, w), already normalised
    scalar: Sequence[float] | None = None
    tensor: np.ndarray | None = None  # the input of a tensor-in model


@dataclass
class Prediction:
    runtime: ModelRuntime
    results: list[dict[str, np.ndarray]]
    image_sizes: list[tuple[int, int] | None]  # (H, W) of each decoded input image


class InferenceService:
    def __init__(
        self, registry: ModelRegistry, settings: Settings, state: ServerState | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.registry, self.settings, self.metrics = registry, settings, metrics
        self.state = state or ServerState()
        self._pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="decode")
        self._decoding = PixelBudget(settings.decode_pixel_budget)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def predict(
        self,
        name: str,
        instances: Sequence[Instance],
        *,
        outputs: frozenset[str] | None = None,
        version: str | None = None,
        timeout_ms: float | None = None,
        native: bool = False,
    ) -> Prediction:
        """Run ``instances`` through the model; holds one of the server's inference slots meanwhile
        (taken here, after the body is in, so slow senders never hold one)."""
        if not self.state.take_slot(self.settings.max_concurrency):
            raise Overloaded(
                f"server is at its concurrency limit ({self.settings.max_concurrency}); retry later"
            )
        try:
            for _ in range(3):  # another process swapped the model meanwhile: prepare for the new one
                try:
                    return await self._predict(name, instances, outputs, version, timeout_ms, native)
                except StaleModel:
                    continue
            raise Overloaded(f"model {name} is being reloaded; retry", retry_after=1)
        finally:
            self.state.release_slot()

    async def _predict(
        self, name: str, instances: Sequence[Instance], outputs: frozenset[str] | None,
        version: str | None, timeout_ms: float | None, native: bool = False,
    ) -> Prediction:
        if not instances:
            raise InvalidInput("no instances in the request")
        if len(instances) > self.settings.max_instances:
            raise PayloadTooLarge(
                f"{len(instances)} instances in one request; the limit is {self.settings.max_instances}"
            )
        async with self.registry.lease(name, version) as live:
            runtime = live.runtime
            note_model(runtime.name, runtime.version)
            if native and outputs is None:  # the native answer's outputs only (a U-Net's mask, not its logits)
                outputs = runtime.native_outputs
            if outputs is not None:
                unknown = outputs - {s.name for s in runtime.output_specs()}
                if unknown:
                    raise InvalidInput(f"unknown output(s) for model {name}: {', '.join(sorted(unknown))}")
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            request_pixels = RequestPixels(self.settings.max_request_pixels)
            prepared = await asyncio.gather(*(
                loop.run_in_executor(self._pool, self._prepare, runtime, inst, outputs, request_pixels)
                for inst in instances
            ))
            items = [item for item, _ in prepared]
            configured = runtime.config.runtime.timeout_ms or self.settings.timeout_ms
            timeout_ms = min(configured, timeout_ms) if timeout_ms else configured
            deadline = time.monotonic() + timeout_ms / 1000.0
            t1 = time.perf_counter()
            try:
                results = await live.batcher.submit_many(items, deadline=deadline)
            except DeviceFault as exc:
                self.state.fatal = exc.message
                self.registry.mark_unavailable(name, live, exc.message)
                raise
        self._observe(runtime, items, preprocess=t1 - t0, submitted=t1)
        return Prediction(runtime, results, [size for _, size in prepared])

    def _observe(self, runtime: ModelRuntime, items: list[InferenceItem], *, preprocess: float, submitted: float) -> None:
        batch = max(it.batch_size for it in items)
        note_model(runtime.name, runtime.version, batch)
        if self.metrics is None:
            return
        info = current.get()
        family = info.family if info else "other"
        queue = max(max(it.started_at - submitted, 0.0) for it in items)
        inference = max(it.inference_s for it in items)
        self.metrics.observe_stages(runtime.name, family, queue=queue, preprocess=preprocess, inference=inference)

    def _prepare(
        self, runtime: ModelRuntime, inst: Instance, outputs: frozenset[str] | None, request_pixels: RequestPixels
    ) -> tuple[InferenceItem, tuple[int, int] | None]:
        scalar = self._scalar(runtime, inst.scalar)
        encoded: torch.Tensor | None = None  # a JPEG the device decodes with its batch
        if inst.image_bytes is not None:
            with ExitStack() as held:

                def admit(height: int, width: int) -> None:  # from the header, before any pixel decodes
                    runtime.check_image_size(height, width)
                    request_pixels.add(height * width)
                    held.enter_context(self._decoding.hold(height * width))

                upload = decode_upload(
                    inst.image_bytes, runtime.preprocess, runtime.device,
                    max_pixels=self.settings.max_image_pixels, check_size=admit,
                )
            image, size, encoded = upload.image, upload.size, upload.encoded
        elif inst.tensor is not None:
            image, size = runtime.tensor_input(inst.tensor), None
        elif inst.image is not None:
            runtime.check_image_size(*inst.image.shape[-2:], preprocessed=True)
            image = torch.from_numpy(np.ascontiguousarray(inst.image, dtype=np.float32))  # to the device with its batch
            size = None
        else:
            raise InvalidInput("missing input: an image or a tensor")
        item = runtime.make_item(image, size=size, scalar=scalar, outputs=outputs)
        item.encoded = encoded
        item.solo = runtime.needs_own_batch(image)
        return item, size

    @staticmethod
    def _scalar(runtime: ModelRuntime, values: Sequence[float] | None) -> torch.Tensor | None:
        if not runtime.takes_extra:
            if values is not None and "scalar" not in runtime.spec.ignored_inputs:
                raise InvalidInput(f"model {runtime.name} takes no scalar input")
            return None  # accepted where the user's class takes one it ignores (resnet50_dual)
        if values is None:
            raise InvalidInput(
                f"missing scalar: model {runtime.name} needs {runtime.n_extra} extra input value(s)"
            )
        if len(values) != runtime.n_extra:
            raise InvalidInput(
                f"model {runtime.name} needs {runtime.n_extra} scalar value(s), got {len(values)}"
            )
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not finite_number(v):
                raise InvalidInput(f"scalar must be a finite number, got {v!r:.40}")
        return torch.tensor([float(v) for v in values], dtype=torch.float32)


def finite_number(value: int | float) -> bool:
    """Finite, and within float range (an integer past 1e308 cannot become a float)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
