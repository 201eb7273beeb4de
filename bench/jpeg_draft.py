"""Fast JPEG path (Pillow ``draft``: DCT-domain scaling, then the exact resize) against a full
decode: what it does to a model's outputs, and what it saves per image.

    python -m bench.jpeg_draft [--count 100] [--payload 640x480]

Runs the service's own code (``app.runtime.uploads.decode_upload``, ``Preprocessor``) on the
same JPEG bytes with ``fast_jpeg`` on and off, forwards both and compares: max and mean absolute
difference of the probabilities, top-1 agreement (and accuracy against the label where the images
have one); for the U-Net, the share of mask pixels that agree. Models: the trained demo models
(``shapes_extra``, 40 x 40 input; ``shapes_unet``, 64 x 64) on their kind of photo, and the bench's
random-weight ResNets (64 and 224) on photo-like JPEGs. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def shape_photos(count: int, size: tuple[int, int]) -> Iterator[tuple[bytes, int | None, float]]:
    """The demo's shapes, rendered large and stretched to the payload size: (JPEG, label, scalar)."""
    from PIL import Image

    from app.demo.data import cls_label, make_sample

    rng = np.random.default_rng(1)
    for i in range(count):
        sample = make_sample(11, i, size=max(size), n_shapes=1)
        img = Image.fromarray(sample.image).resize((size[1], size[0]), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        scalar = float(rng.choice([rng.uniform(0.05, 0.4), rng.uniform(0.6, 0.95)]))
        yield buf.getvalue(), cls_label(sample.shapes[0].colour, scalar), scalar


def scene_photos(count: int, size: tuple[int, int]) -> Iterator[tuple[bytes, int | None, float]]:
    """Photo-like JPEGs (gradients, blobs, sensor noise), the bench's payload kind, no label."""
    from bench.workload import make_jpegs

    with tempfile.TemporaryDirectory() as tmp:
        for path in make_jpegs(Path(tmp), size, count=count, seed=5):
            yield path.read_bytes(), None, 0.5


def outputs(net: Any, pre: Any, data: bytes, scalar: float) -> np.ndarray:
    """Probabilities (classifiers) or the mask (U-Net) for one upload through the service's path."""
    import torch

    from app.runtime.uploads import decode_upload

    upload = decode_upload(data, pre, torch.device("cpu"), max_pixels=10**8)
    with torch.inference_mode():
        x = pre.normalize_batch(upload.image.unsqueeze(0))
        out = net.model(x, torch.tensor([[scalar]])) if net.takes_extra else net.model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
    return out[0].argmax(0).numpy() if net.task == "segmentation" else out[0].numpy()


def decode_ms(pre: Any, data: bytes, repeat: int = 30) -> float:
    import torch

    from app.runtime.uploads import decode_upload

    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        decode_upload(data, pre, torch.device("cpu"), max_pixels=10**8)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def compare(net: Any, photos: list[tuple[bytes, int | None, float]]) -> dict[str, Any]:
    from app.runtime.preprocess import Preprocessor

    exact = Preprocessor(net.config.preprocess, default_resize=None)
    fast = Preprocessor(net.config.preprocess, default_resize=None)
    exact.fast_jpeg, fast.fast_jpeg = False, True
    diffs, agree, right = [], 0, {"exact": 0, "fast": 0}
    for data, label, scalar in photos:
        a, b = outputs(net, exact, data, scalar), outputs(net, fast, data, scalar)
        if net.task == "segmentation":
            diffs.append(float((a != b).mean()))
            continue
        diffs.append(float(np.abs(a - b).max()))
        agree += int(a.argmax() == b.argmax())
        if label is not None:
            right["exact"] += int(a.argmax() == label)
            right["fast"] += int(b.argmax() == label)
    n = len(photos)
    row: dict[str, Any] = {"images": n, "exact_ms": decode_ms(exact, photos[0][0]),
                           "fast_ms": decode_ms(fast, photos[0][0])}
    if net.task == "segmentation":
        row.update(mask_pixels_differing_mean=statistics.mean(diffs), mask_pixels_differing_max=max(diffs))
    else:
        row.update(max_abs_prob_diff=max(diffs), mean_of_max_abs_prob_diff=statistics.mean(diffs),
                   top1_agreement=agree / n)
        if photos[0][1] is not None:
            row.update(accuracy_exact=right["exact"] / n, accuracy_fast=right["fast"] / n)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="photos per model")
    parser.add_argument("--payload", default="640x480", help="JPEG width x height")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.payload.lower().split("x"))
    size = (height, width)
    import torch

    from app.demo.trained import write_trained_models
    from bench.workload import build_workload, load_net, write_store

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        write_trained_models(store)
        shapes = list(shape_photos(args.count, size))
        scenes = list(scene_photos(args.count, size))
        cases = [("shapes_extra (trained, 40x40)", "shapes_extra", shapes),
                 ("shapes_unet (trained, 64x64)", "shapes_unet", shapes)]
        for config in ("overhead", "compute"):
            wl = build_workload(config, device="cpu", dtype="float32", channels_last=False, max_batch_size=8,
                                max_batch_delay_ms=2.0, image_size=None, payload_size=None, base_channels=16)
            write_store(store, wl)
            cases.append((f"{wl.model} (random weights, {wl.size[0]}x{wl.size[1]})", wl.model, scenes))
        for label, name, photos in cases:
            row = compare(load_net(store, name, "cpu"), photos)
            rows.append((label, row))
            print(label, row, flush=True)
    print(f"\n| model ({args.payload} JPEG q90) | images | decode+resize exact / fast (ms) | max abs prob diff | "
          "mean of per-image max | top-1 agreement | accuracy exact / fast |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in rows:
        ms = f"{r['exact_ms']:.2f} / {r['fast_ms']:.2f}"
        if "top1_agreement" in r:
            acc = (f"{r['accuracy_exact']:.3f} / {r['accuracy_fast']:.3f}" if "accuracy_exact" in r else "-")
            print(f"| {label} | {r['images']} | {ms} | {r['max_abs_prob_diff']:.2e} | "
                  f"{r['mean_of_max_abs_prob_diff']:.2e} | {r['top1_agreement']:.3f} | {acc} |")
        else:
            print(f"| {label} | {r['images']} | {ms} | mask pixels differing: max {r['mask_pixels_differing_max']:.4f}"
                  f" | mean {r['mask_pixels_differing_mean']:.4f} | - | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
