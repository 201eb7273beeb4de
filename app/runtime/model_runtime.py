"""A loaded net with everything needed to serve it: tensor specs, batch forward, heads.

``run_batch`` is the only function the batcher calls; it runs on the model's
inference thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from app import nets
from app.errors import ConfigError, InvalidModelOutput, PayloadTooLarge
from app.runtime.budget import activation_bytes_per_pixel, default_pixel_limit
from app.runtime.faults import DeviceFault, OutOfDeviceMemory, is_device_fault, is_out_of_memory
from app.runtime.preprocess import Preprocessor
from app.store.model_config import ModelConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # Open Inference Protocol names: FP32, UINT8, BYTES
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class InferenceItem:
    """One instance for one forward: a preprocessed image and, when needed, its scalars."""

    image: torch.Tensor  # float32 (C, h, w)
    scalar: torch.Tensor | None = None  # float32 (n_extra,)
    orig_size: tuple[int, int] | None = None  # segmentation: resize logits back to (H, W)
    outputs: frozenset[str] | None = None  # None = every output
    # Filled in by the forward, read back for metrics and logs:
    batch_size: int = 0
    started_at: float = 0.0  # time.perf_counter() when its batch started
    inference_s: float = 0.0

    def group_key(self) -> tuple[int, ...]:
        return tuple(self.image.shape)


class ModelRuntime:
    def __init__(
        self,
        *,
        name: str,
        version: str,
        config: ModelConfig,
        model: torch.nn.Module,
        device: torch.device,
        sha256: str,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.name, self.version, self.config = name, version, config
        self.spec = nets.net_spec(config.architecture)
        self.arguments = {**self.spec.defaults, **config.arguments}
        self.device, self.sha256, self.metadata = device, sha256, dict(metadata or {})
        self.task = self.spec.task
        self.dtype = _DTYPES[config.runtime.dtype]
        self.channels_last = config.runtime.channels_last
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        default_resize = (224, 224) if self.task == "classification" else None
        self.preprocess = Preprocessor(config.preprocess, default_resize=default_resize)
        self.takes_extra = self.spec.takes_extra
        self.n_extra = int(self.arguments.get("n_extra", 0)) if self.takes_extra else 0
        self.head_names = self._head_names()
        labels = config.postprocess.labels
        if labels and len(labels) != self.num_classes and not (self.task == "segmentation" and self.num_classes == 1):
            raise ConfigError(
                f"model {name}: postprocess.labels has {len(labels)} names but the model has {self.num_classes} classes"
            )
        self.mask_values = self._mask_values()
        self.fault_hook: Callable[[int], None] | None = None  # test-only fault injection
        self.max_processed_pixels: int | None = config.preprocess.max_processed_pixels
        """Per-image limit on what the network processes; None: fixed input size (``resize``)."""

    # ---- description -------------------------------------------------------------

    def _head_names(self) -> tuple[str, ...]:
        if self.task == "segmentation":
            return ("mask", "logits")
        names = self.config.postprocess.output_names or self.spec.heads
        if len(names) != len(self.spec.heads):
            raise ConfigError(
                f"postprocess.output_names has {len(names)} names but {self.config.architecture}"
                f" has {len(self.spec.heads)} heads ({', '.join(self.spec.heads)})"
            )
        return tuple(names)

    def _mask_values(self) -> list[Any]:
        if self.task != "segmentation":
            return []
        values = self.config.postprocess.mask_values or self.metadata.get("mask_values")
        if values:
            out = [list(v) if isinstance(v, (list, tuple)) else int(v) for v in values]
            needed = self.num_classes + (self.num_classes == 1)
            if len(out) < needed:
                raise ConfigError(
                    f"model {self.name}: mask_values has {len(out)} entries but the model has {needed} classes"
                )
            return out
        n = int(self.arguments["n_classes"])
        if n == 1:
            return [0, 255]
        return [round(i * 255 / (n - 1)) for i in range(n)]

    @property
    def num_classes(self) -> int:
        key = "n_classes" if self.task == "segmentation" else "num_classes"
        return int(self.arguments[key])

    @property
    def labels(self) -> list[str]:
        given = self.config.postprocess.labels
        if given:
            return list(given)
        return [str(i) for i in range(self.num_classes)]

    def input_specs(self) -> list[TensorSpec]:
        h, w = self.preprocess.resize or (-1, -1)
        specs = [TensorSpec("image", "FP32", (-1, self.preprocess.channels, h, w))]
        if self.takes_extra:
            shape = (-1,) if self.n_extra == 1 else (-1, self.n_extra)
            specs.append(TensorSpec("scalar", "FP32", shape))
        return specs

    def output_specs(self) -> list[TensorSpec]:
        if self.task == "segmentation":
            return [
                TensorSpec("mask", "UINT8", (-1, -1, -1)),
                TensorSpec("logits", "FP32", (-1, self.num_classes, -1, -1)),
            ]
        shapes = {"probs": (-1, self.num_classes), "features": (-1, 1000)}
        return [
            TensorSpec(name, "FP32", shapes[head])
            for name, head in zip(self.head_names, self.spec.heads)
        ]

    # ---- inference ---------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        if self.device.type == "cpu" and self.dtype != torch.bfloat16:
            return contextlib.nullcontext()  # float16 autocast on CPU is slow and lossy: stay fp32
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def run_batch(self, items: list[InferenceItem]) -> list[dict[str, np.ndarray] | BaseException]:
        """Forward a batch; on device OOM split it in halves and retry each once.

        Items that still do not fit get a retryable error of their own; any other
        device error is a ``DeviceFault`` for the whole batch.
        """
        try:
            return list(self._forward(items))
        except Exception as exc:  # noqa: BLE001 - classified below
            if is_device_fault(exc) and not is_out_of_memory(exc):
                raise DeviceFault(f"model {self.name}: unrecoverable device error: {exc}") from exc
            if not is_out_of_memory(exc):
                raise
        # Outside the except block: the traceback no longer pins the failed batch's tensors.
        self._release_cached_memory()
        if len(items) == 1:
            return [self._oom_error(1)]
        mid = len(items) // 2
        results: list[dict[str, np.ndarray] | BaseException] = []
        for half in (items[:mid], items[mid:]):
            outcome = self._forward_or_oom(half)
            if outcome is None:
                self._release_cached_memory()
                results.extend(self._oom_error(len(half)) for _ in half)
            else:
                results.extend(outcome)
        return results

    def _forward_or_oom(self, items: list[InferenceItem]) -> list[dict[str, np.ndarray]] | None:
        try:
            return self._forward(items)
        except Exception as exc:  # noqa: BLE001
            if is_out_of_memory(exc):
                return None
            if is_device_fault(exc):
                raise DeviceFault(f"model {self.name}: unrecoverable device error: {exc}") from exc
            raise

    def _oom_error(self, size: int) -> OutOfDeviceMemory:
        return OutOfDeviceMemory(
            f"model {self.name} ran out of device memory (batch of {size} after splitting); retry later",
            retry_after=1,
        )

    def _release_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _forward(self, items: list[InferenceItem]) -> list[dict[str, np.ndarray]]:
        """Forward a batch of same-shaped items; one dict of numpy outputs per item."""
        started = time.perf_counter()
        if self.fault_hook is not None:
            self.fault_hook(len(items))
        results = self._forward_timed(items)
        elapsed = time.perf_counter() - started
        for it in items:
            it.batch_size, it.started_at, it.inference_s = len(items), started, elapsed
        return results

    def _forward_timed(self, items: list[InferenceItem]) -> list[dict[str, np.ndarray]]:
        with torch.inference_mode():
            x = torch.stack([it.image for it in items]).to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                if self.takes_extra:
                    s = torch.stack([it.scalar for it in items]).to(self.device)  # type: ignore[misc]
                    out = self.model(x, s)
                else:
                    out = self.model(x)
            heads = out if isinstance(out, (tuple, list)) else (out,)
            if self.task == "segmentation":
                return self._segment(items, heads[0].float())
            arrays = [h.float().cpu().numpy() for h in heads]
        return [
            {
                name: arr[i]
                for name, arr in zip(self.head_names, arrays)
                if it.outputs is None or name in it.outputs
            }
            for i, it in enumerate(items)
        ]

    def _segment(self, items: list[InferenceItem], logits: torch.Tensor) -> list[dict[str, np.ndarray]]:
        results = []
        for i, it in enumerate(items):
            item_logits = logits[i : i + 1]
            if it.orig_size is not None and tuple(item_logits.shape[-2:]) != it.orig_size:
                item_logits = F.interpolate(item_logits, size=it.orig_size, mode="bilinear")
            result: dict[str, np.ndarray] = {}
            if it.outputs is None or "mask" in it.outputs:
                if self.num_classes == 1:
                    mask = torch.sigmoid(item_logits[0, 0]) > self.config.postprocess.mask_threshold
                else:
                    mask = item_logits[0].argmax(dim=0)
                result["mask"] = mask.to(torch.uint8).cpu().numpy()
            if it.outputs is None or "logits" in it.outputs:
                result["logits"] = item_logits[0].cpu().numpy()
            results.append(result)
        return results

    def set_pixel_limit(self, ceiling: int) -> None:
        """Unless model.toml sets one, derive the processed-pixel limit from this model and device."""
        if self.max_processed_pixels is not None or self.preprocess.resize is not None:
            return
        item = self.dummy_item()
        args = [item.image.unsqueeze(0).to(self.device)]
        if item.scalar is not None:
            args.append(item.scalar.unsqueeze(0).to(self.device))
        per_pixel = activation_bytes_per_pixel(self.model, tuple(args))
        self.max_processed_pixels = default_pixel_limit(per_pixel, self.device, ceiling)

    def check_image_size(self, height: int, width: int, *, preprocessed: bool = False) -> None:
        """Refuse (413) an image whose processed size exceeds the limit, before decoding its pixels."""
        if self.max_processed_pixels is None:
            return
        h, w = (height, width) if preprocessed else self.preprocess.target_size(height, width)
        if h * w > self.max_processed_pixels:
            how = f" after scale {self.preprocess.cfg.scale:g}" if self.preprocess.cfg.scale and not preprocessed else ""
            raise PayloadTooLarge(
                f"image of {width}x{height} would be processed at {w}x{h} = {w * h} pixels{how}; model "
                f"{self.name} processes at most {self.max_processed_pixels} pixels per image: send a smaller image"
            )

    def dummy_item(self) -> InferenceItem:
        h, w = self.preprocess.warmup_size()
        image = torch.zeros(self.preprocess.channels, h, w)
        scalar = torch.zeros(self.n_extra) if self.takes_extra else None
        return InferenceItem(image=image, scalar=scalar)

    def smoke_test(self) -> None:
        """One forward at the configured shape: outputs must be finite and well-shaped."""
        (result,) = self._forward([self.dummy_item()])
        for name, arr in result.items():
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise InvalidModelOutput(
                    f"smoke inference of {self.name}: output {name!r} is not finite (NaN or infinite weights?)"
                )
        expected = {s.name: s for s in self.output_specs()}
        for name, arr in result.items():
            want = expected[name].shape[1:]
            if len(want) != arr.ndim or any(w not in (-1, a) for w, a in zip(want, arr.shape)):
                raise InvalidModelOutput(
                    f"smoke inference of {self.name}: output {name!r} has shape {arr.shape}, expected {want}"
                )

    def warmup(self, batch_sizes: tuple[int, ...]) -> None:
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        for size in batch_sizes:
            self._forward([self.dummy_item() for _ in range(size)])
