"""``run_batch``, the one function the batcher calls: decode the batch's waiting JPEGs on the device,
forward, and on device out-of-memory split the batch in halves and retry each once.

A mixin of ModelRuntime, apart so the runtime's own module stays about the model.
"""

from __future__ import annotations

import numpy as np
import torch

from app.errors import DeviceFault, OutOfDeviceMemory
from app.runtime.batch_input import decode_on_device
from app.runtime.faults import is_device_fault, is_out_of_memory
from app.runtime.items import InferenceItem
from app.runtime.preprocess import Preprocessor


class BatchRunner:
    name: str
    device: torch.device
    preprocess: Preprocessor

    def _forward(self, items: list[InferenceItem]) -> list[dict[str, np.ndarray]]:
        raise NotImplementedError

    def run_batch(self, items: list[InferenceItem]) -> list[dict[str, np.ndarray] | BaseException]:
        """Forward a batch; on device OOM split it in halves and retry each once.

        Items that still do not fit get a retryable error of their own; any other
        device error is a ``DeviceFault`` for the whole batch. JPEGs waiting for the device are
        decoded first, as one batch; one that fails to decode fails only its own item.
        """
        if any(it.encoded is not None for it in items):
            try:
                failed = decode_on_device(items, self.preprocess, self.device, self.preprocess.cfg.color_mode)
            except Exception as exc:  # noqa: BLE001
                if not is_out_of_memory(exc):
                    raise
                failed = {i: self._oom_error(len(items)) for i in range(len(items))}
            if failed:
                rest = [it for i, it in enumerate(items) if i not in failed]
                done = iter(self._run_decoded(rest) if rest else [])
                return [failed[i] if i in failed else next(done) for i in range(len(items))]
        return self._run_decoded(items)

    def _run_decoded(self, items: list[InferenceItem]) -> list[dict[str, np.ndarray] | BaseException]:
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

