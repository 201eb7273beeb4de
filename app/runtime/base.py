"""The common base of every runtime family: a loaded net with its device, dtype, pre-processing,
batch forward with out-of-memory splitting, smoke test and warm-up.

A family (classifier, segmenter, ...) subclasses ``ModelRuntime`` and owns what differs: its
heads and tensor specs, how a forward's outputs become per-item results, and its native
response format. Nothing outside the runtime package branches on the kind of model.
``run_batch`` is the only function the batcher calls; it runs on the model's inference thread,
never on the event loop.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from app import nets
from app.errors import ConfigError, InvalidInput, InvalidModelOutput, PayloadTooLarge
from app.runtime.batch_input import batch_input
from app.runtime.budget import activation_bytes_per_pixel, default_pixel_limit
from app.runtime.items import InferenceItem, TensorSpec
from app.runtime.splitting import BatchRunner
from app.runtime.preprocess import Preprocessor
from app.store.model_config import ModelConfig

__all__ = ["InferenceItem", "ModelRuntime", "TensorSpec"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelRuntime(BatchRunner):
    """Common behaviour; a family sets ``task`` and implements the hooks marked below."""

    task: ClassVar[str]
    """The family's name, as the net registry's ``task`` calls it."""
    default_resize: ClassVar[tuple[int, int] | None] = None
    """Input size when model.toml sets neither ``resize`` nor ``scale``; None: the image's own size."""
    encodes_answers: ClassVar[bool] = False
    """Native answers encode images (mask PNGs): the route builds them in a worker thread."""
    native_outputs: ClassVar[frozenset[str] | None] = None
    """The outputs a native answer uses (None: all); the others are never computed or carried."""

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
        try:
            self.spec = nets.net_spec(config.architecture).for_arguments(config.arguments)
        except ValueError as exc:
            raise ConfigError(f"model {name}: {exc}") from None
        self.arguments = {**self.spec.defaults, **config.arguments}
        self.device, self.sha256, self.metadata = device, sha256, dict(metadata or {})
        self.dtype, self.dtype_name = _DTYPES[config.runtime.dtype], config.runtime.dtype
        self.channels_last = config.runtime.channels_last
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.preprocess = Preprocessor(config.preprocess, default_resize=self.default_resize)
        self.takes_extra = self.spec.takes_extra
        self.n_extra = int(self.arguments.get("n_extra", 0)) if self.takes_extra else 0
        self.num_classes = self.spec.num_classes(self.arguments)
        self.head_names = self._head_names()
        self._check_labels()
        self.fault_hook: Callable[[int], None] | None = None  # test-only fault injection
        self.load_id = uuid.uuid4().hex
        """This load of the model (a reload of the same version is another): HTTP processes send it
        with their items, so the device process can tell they were prepared for another load."""
        self.max_processed_pixels: int | None = config.preprocess.max_processed_pixels
        """Per-image limit on what the network processes; None: fixed input size (``resize``)."""

    # ---- family hooks ------------------------------------------------------------------

    def _head_names(self) -> tuple[str, ...]:
        """Names of the outputs this runtime answers, in order."""
        raise NotImplementedError

    def output_specs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def _results(self, items: list[InferenceItem], heads: Sequence[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        """Turn the forward's head tensors (batch first) into one dict of arrays per item."""
        raise NotImplementedError

    def format_native(self, result: dict[str, np.ndarray]) -> dict[str, Any]:
        """One item's entry in the native API's ``predictions``."""
        raise NotImplementedError

    def native_file(self, results: list[dict[str, np.ndarray]], accept: str) -> tuple[bytes, str] | None:
        """A non-JSON answer (bytes, media type) when the client accepts one; None: answer JSON."""
        return None

    def describe(self) -> dict[str, Any]:
        """Family facts for model listings (labels, mask colours, ...)."""
        facts: dict[str, Any] = {"labels": self.labels}
        if self.spec.ignored_inputs:
            facts["ignored_inputs"] = list(self.spec.ignored_inputs)
        return facts

    def input_hint(self) -> str:
        return "send either 'image' (pre-processed FP32) or 'image_bytes' (PNG/JPEG/WebP files)"

    def tensor_input(self, array: np.ndarray) -> torch.Tensor:
        """An instance given as a plain tensor (not an image); image models refuse it."""
        raise InvalidInput(
            f"model {self.name} takes images: send an image file or base64 image, not a list of numbers"
        )

    def v2_alternatives(self) -> list[TensorSpec]:
        """Inputs a v2 request may send besides the model's own: encoded image files instead of
        ``image``, and inputs the user's class takes but the net ignores (accepted, not used)."""
        ignored = [TensorSpec(name, "FP32", (-1,)) for name in self.spec.ignored_inputs]
        return [TensorSpec("image_bytes", "BYTES", (-1,)), *ignored]

    def make_item(
        self, image: torch.Tensor, *, size: tuple[int, int] | None, scalar: torch.Tensor | None,
        outputs: frozenset[str] | None,
    ) -> InferenceItem:
        """The batcher's unit for one decoded (or pre-processed) image of original ``size``."""
        return InferenceItem(image=image, scalar=scalar, outputs=outputs)

    # ---- description ---------------------------------------------------------------------

    def _check_labels(self) -> None:
        labels = self.config.postprocess.labels
        if labels and len(labels) != self.num_classes:
            raise ConfigError(
                f"model {self.name}: postprocess.labels has {len(labels)} names but the model has"
                f" {self.num_classes} classes"
            )

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

    # ---- inference ---------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        if self.device.type == "cpu" and self.dtype != torch.bfloat16:
            return contextlib.nullcontext()  # float16 autocast on CPU is slow and lossy: stay fp32
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

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
            if self.device.type == "cuda":
                # Global, so set per forward: tuning per input shape pays for a fixed-size model and
                # re-tunes at every new size for a model that takes any size. A forward of another
                # model on another thread may see the other value for a moment: slower, never wrong.
                torch.backends.cudnn.benchmark = self.fixed_input_shape
            x = batch_input(items, self.preprocess, self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                if self.takes_extra:
                    s = torch.stack([it.scalar for it in items]).to(self.device)  # type: ignore[misc]
                    out = self.model(x, s)
                else:
                    out = self.model(x)
            heads = out if isinstance(out, (tuple, list)) else (out,)
            return self._results(items, [h.float() for h in heads])

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
            scale = self.preprocess.cfg.scale
            how = f" after scale {scale:g}" if scale and not preprocessed else ""
            raise PayloadTooLarge(
                f"image of {width}x{height} would be processed at {w}x{h} = {w * h} pixels{how}; model "
                f"{self.name} processes at most {self.max_processed_pixels} pixels per image: send a smaller image"
            )

    def needs_own_batch(self, image: torch.Tensor) -> bool:
        """Whether an item of this processed size must run alone: a full batch of such items would
        process more than the per-image limit allows, so memory would grow with the batch size."""
        if self.max_processed_pixels is None:
            return False
        height, width = image.shape[-2:]
        return int(height) * int(width) * self.config.runtime.max_batch_size > self.max_processed_pixels

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

    @property
    def fixed_input_shape(self) -> bool:
        """Every forward sees one input size (cuDNN's per-shape tuning pays off)."""
        return self.preprocess.resize is not None

    def warmup(self, batch_sizes: tuple[int, ...]) -> None:
        for size in batch_sizes:
            self._forward([self.dummy_item() for _ in range(size)])
