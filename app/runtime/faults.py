"""Device faults: out-of-memory is retryable, any other CUDA error poisons the process.

Also a test-only fault injector (off unless ``MODSERVE_FAULT_INJECTION`` is set)
so both paths are exercised on machines without a GPU.
"""

from __future__ import annotations

import threading
import time

import torch

from app.errors import DeviceFault, OutOfDeviceMemory

__all__ = ["DeviceFault", "FaultInjector", "OutOfDeviceMemory", "is_device_fault", "is_out_of_memory"]


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def is_device_fault(exc: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "CUDNN_STATUS", "device-side assert")
    )


class FaultInjector:
    """Raise faults inside a batch forward, as the device would. For tests only.

    Spec (comma-separated): ``oom_above=N`` (OOM for batches larger than N),
    ``oom_always`` (OOM on every forward), ``fatal`` (a sticky CUDA error),
    ``sleep_ms=N`` (a slow model).
    """

    def __init__(self, spec: str) -> None:
        self.oom_above: int | None = None
        self.oom_always = self.fatal = False
        self.sleep_s = 0.0
        self.calls = 0
        self._lock = threading.Lock()
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, _, value = part.partition("=")
            if key == "oom_above":
                self.oom_above = int(value)
            elif key == "oom_always":
                self.oom_always = True
            elif key == "fatal":
                self.fatal = True
            elif key == "sleep_ms":
                self.sleep_s = float(value) / 1000.0
            else:
                raise ValueError(f"unknown fault injection {part!r}")

    def __call__(self, batch_size: int) -> None:
        with self._lock:
            self.calls += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.fatal:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        if self.oom_always or (self.oom_above is not None and batch_size > self.oom_above):
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected, batch of {batch_size})")
