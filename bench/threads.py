"""Thread layout of decode and forward, in one process, without HTTP: which layout keeps the
forward fastest when decoding runs beside it.

    python -m bench.threads [--config overhead compute] [--seconds 4]

Layouts (the decode side; the forward always runs on one inference thread, torch's default
intra-op threads, uint8 batches normalised there unless noted):

- ``torch-decode``: the service before issue 16: decode to a tensor and resize/normalise with torch
  in the decode threads (a second OpenMP team per decode thread);
- ``pillow``: Pillow/numpy only in the decode threads (full decode, exact resize);
- ``pillow-draft``: the same with the JPEG draft decode (``fast_jpeg``);
- ``pillow+idle-team``: ``pillow``, with one more thread alive that once ran a torch parallel region
  (as a model loader in a pooled worker thread did: app/runtime/own_thread.py), its OpenMP team idle;
- ``serial``: decode and forward one after the other on one thread (the naive endpoint's layout).

Two figures per layout: ``c1_ms``, the median time of one request alone (decode in the pool, then
the forward on the inference thread: the hand-off included), and ``images_per_s``, the throughput
with the decode pool (``--decoders`` threads) feeding batches of up to 8 through a bounded queue.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

LAYOUTS = ("torch-decode", "pillow", "pillow-draft", "pillow+idle-team", "serial")


def decoder(layout: str, pre: Any) -> Callable[[bytes], Any]:
    """bytes -> what the inference thread receives (float CHW for torch-decode, uint8 CHW otherwise)."""
    import torch

    from app.runtime.images import decode_image
    from app.runtime.uploads import decode_upload

    if layout == "torch-decode":
        from torchvision.transforms.v2 import functional as F

        def torch_path(data: bytes) -> Any:
            raw = decode_image(data, color_mode="RGB", max_pixels=10**8)
            x = F.resize(raw, list(pre.resize), antialias=True).to(torch.float32)
            return x.mul_(pre._scale).add_(pre._shift)

        return torch_path
    return lambda data: decode_upload(data, pre, torch.device("cpu"), max_pixels=10**8).image


def forward(net: Any, pre: Any, images: list[Any]) -> None:
    import torch

    from bench.workload import forward as net_forward

    batch = torch.stack(images) if images[0].dtype != torch.uint8 else pre.normalize_batch(
        torch.stack([i.permute(1, 2, 0) for i in images]).permute(0, 3, 1, 2))
    net_forward(net, batch, torch.full((len(images), 1), 0.5))


def measure(net: Any, layout: str, payloads: list[bytes], seconds: float, decoders: int) -> dict[str, float]:
    import torch

    from app.runtime.preprocess import Preprocessor

    pre = Preprocessor(net.config.preprocess, default_resize=None)
    pre.fast_jpeg = layout == "pillow-draft"
    decode = decoder(layout, pre)
    pool, infer, idle = ThreadPoolExecutor(decoders), ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    if layout == "pillow+idle-team":
        idle.submit(lambda: torch.ones(8_000_000).add_(1).sum()).result()
    with torch.inference_mode():
        for _ in range(3):
            infer.submit(forward, net, pre, [decode(payloads[0])]).result()
        times = []
        deadline = time.perf_counter() + seconds / 2
        i = 0
        while time.perf_counter() < deadline or len(times) < 5:
            data = payloads[i % len(payloads)]
            i += 1
            start = time.perf_counter()
            if layout == "serial":
                infer.submit(lambda d=data: forward(net, pre, [decode(d)])).result()
            else:
                image = pool.submit(decode, data).result()
                infer.submit(forward, net, pre, [image]).result()
            times.append(time.perf_counter() - start)
        done = throughput(net, pre, decode, layout, payloads, seconds / 2, pool, decoders)
    for executor in (pool, infer, idle):
        executor.shutdown()  # each thread exits, and its OpenMP team with it
    return {"c1_ms": 1000 * statistics.median(times), "images_per_s": done}


def throughput(net: Any, pre: Any, decode: Callable[[bytes], Any], layout: str, payloads: list[bytes],
               seconds: float, pool: ThreadPoolExecutor, decoders: int) -> float:
    if layout == "serial":
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            forward(net, pre, [decode(payloads[n % len(payloads)])])
            n += 1
        return n / (time.perf_counter() - start)
    ready: queue.Queue[Any] = queue.Queue(maxsize=16)
    stop = threading.Event()

    def produce(k: int) -> None:
        while not stop.is_set():
            item = decode(payloads[k % len(payloads)])
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            k += decoders

    for k in range(decoders):
        pool.submit(produce, k)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        batch = [ready.get()]
        while len(batch) < 8:
            try:
                batch.append(ready.get_nowait())
            except queue.Empty:
                break
        forward(net, pre, batch)
        n += len(batch)
    elapsed = time.perf_counter() - start
    stop.set()
    return n / elapsed


def _in_exiting_thread(fn: Callable[[], Any]) -> Any:
    """Torch set-up work in a thread that ends, so no idle OpenMP team of it stays behind (the
    service builds its models so too: app/runtime/own_thread.py)."""
    box: list[Any] = []
    worker = threading.Thread(target=lambda: box.append(fn()))
    worker.start()
    worker.join()
    return box[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["overhead", "compute"])
    parser.add_argument("--seconds", type=float, default=4.0, help="per layout (half c=1, half throughput)")
    parser.add_argument("--decoders", type=int, default=2, help="decode threads")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--intra-op", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    import torch

    if args.intra_op:
        torch.set_num_threads(args.intra_op)
    from bench.workload import build_workload, load_net, make_jpegs, write_store

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        payloads = [p.read_bytes() for p in make_jpegs(Path(tmp) / "jpg", (480, 640))]
        for config in args.config:
            wl = build_workload(config, device="cpu", dtype="float32", channels_last=False, max_batch_size=8,
                                max_batch_delay_ms=2.0, image_size=None, payload_size=None, base_channels=16)
            net = _in_exiting_thread(lambda: (write_store(Path(tmp) / "store", wl),
                                              load_net(Path(tmp) / "store", wl.model, "cpu"))[1])
            for layout in args.layouts.split(","):
                row = measure(net, layout, payloads, args.seconds, args.decoders)
                rows.append((config, layout, row))
                print(f"{config} {layout}: {row}", flush=True)
    print(f"\n| config | decode layout ({args.decoders} decode threads, {torch.get_num_threads()} intra-op) | c=1 latency "
          "(ms) | images/s (batches <= 8) |")
    print("| --- | --- | ---: | ---: |")
    for config, layout, row in rows:
        print(f"| {config} | {layout} | {row['c1_ms']:.1f} | {row['images_per_s']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
