"""Train the demo models on synthetic shapes: ``python -m app.demo.train`` (``modserve train-demo``).

The data comes from :mod:`app.demo.data`: synthetic shapes with their masks, a pure function of
``(seed, index)``, shared by the page's samples, the training and the tests.

The training (CPU, one torch thread by default; the same seed, torch build, CPU and thread count
give byte-identical checkpoints):

* ``shapes_unet``: the narrow ``unet`` (base_channels 8) segments the shapes from the background at
  64 x 64; reported: IoU of both classes and their mean on a held-out set, measured the way the
  service answers (logits scaled back to the image's own size).
* ``shapes_extra``: ``resnet50_extra`` over resnet18 at 40 x 40; the class is the shape's colour
  (red, green or blue) x (scalar > 0.5); reported: accuracy on a held-out set with uniform random
  scalars, measured with the int8-committed weights the store serves. After the end-to-end training
  the head (``fc_add``) is fitted alone on the eval-mode features of the int8 backbone, which makes
  the scalar threshold sharp at little cost.

It writes ``app/demo_models/`` (checkpoints and ``checkpoints.toml`` with their sha256 and the
figures) and the page's samples ``app/static/samples/``. See :mod:`app.demo.trained`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from app import nets
from app.demo.trained import (
    CHECKPOINT_FILES,
    COLOURS,
    DEMO_DIR,
    EXTRA_ARGS,
    EXTRA_NAME,
    MANIFEST,
    SEG_LABELS,
    THRESHOLD,
    UNET_ARGS,
    UNET_NAME,
    UNET_SIZE,
    dequantize_state_dict,
    quantize_state_dict,
    state_dict_bytes,
)
from app.demo.data import make_sample
from app.runtime.preprocess import Preprocessor
from app.store.model_config import PreprocessConfig

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "static" / "samples"


# ---- training (torch) -----------------------------------------------------------------------

SEED = 20260
UNET_GEN_SIZES = (96, 128, 160)
"""Training images are drawn at these sizes and resized by the service's own preprocessing, so
the model sees what the service feeds it for uploads of different sizes."""
EXTRA_GEN_SIZES = (64, 96, 128)
EXTRA_RADIUS = (0.16, 0.34)
"""The classifier's images hold one shape of this circumradius range (fractions of the side)."""
SAMPLE_SIZE = 192
SAMPLE_SEED = 7
SAMPLES: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...], int], ...] = (
    # file stem, title, shape kinds, colours, index in the sample set
    ("red-disc", "Red disc", ("disc",), ("red",), 0),
    ("green-triangle", "Green triangle", ("triangle",), ("green",), 1),
    ("blue-square", "Blue square", ("square",), ("blue",), 2),
    ("three-shapes", "Three shapes", ("disc", "square", "triangle"), ("blue", "red", "green"), 4),
    ("two-shapes", "Two shapes", ("triangle", "disc"), ("red", "green"), 9),
)


@dataclass
class TrainSettings:
    seed: int = SEED
    threads: int = 1
    unet_train: int = 1200
    unet_steps: int = 400
    unet_batch: int = 16
    unet_lr: float = 4e-3
    unet_eval: int = 300
    extra_train: int = 2400
    extra_steps: int = 150
    extra_batch: int = 32
    extra_lr: float = 2e-3
    extra_head_lr: float = 2e-2
    extra_eval: int = 600
    extra_head_images: int = 1200
    extra_head_steps: int = 1500
    log_every: int = 100


@dataclass
class Report:
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _say(text: str) -> None:
    print(f"train-demo: {text}", flush=True)


def _preprocessor(name: str) -> Preprocessor:
    from app.demo.trained import trained_configs

    return Preprocessor(PreprocessConfig(**trained_configs()[name]["preprocess"]), default_resize=None)


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def seg_target(mask: np.ndarray) -> np.ndarray:
    """The U-Net's classes from a generator mask: 0 background, 1 any shape."""
    return (mask > 0).astype(np.uint8)


def unet_data(
    seed: int, count: int, *, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """(x, y, full-size masks): x preprocessed as served, y the mask at the model's size."""
    pre = _preprocessor(UNET_NAME)
    xs, ys, full = [], [], []
    for i in range(count):
        sample = make_sample(seed, start + i, size=UNET_GEN_SIZES[i % len(UNET_GEN_SIZES)], n_shapes=(1, 3))
        xs.append(pre(_tensor(sample.image)))
        mask = torch.from_numpy(seg_target(sample.mask))[None, None].float()
        ys.append(F.interpolate(mask, size=(UNET_SIZE, UNET_SIZE), mode="nearest-exact")[0, 0].long())
        full.append(seg_target(sample.mask))
    return torch.stack(xs), torch.stack(ys), full


def extra_data(seed: int, count: int, *, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, colour index): one shape of any kind per image, preprocessed as served."""
    pre = _preprocessor(EXTRA_NAME)
    xs, colours = [], []
    for i in range(count):
        size = EXTRA_GEN_SIZES[i % len(EXTRA_GEN_SIZES)]
        colour = COLOURS[(start + i) % len(COLOURS)]
        sample = make_sample(seed, start + i, size=size, colours=(colour,), radius=EXTRA_RADIUS)
        xs.append(pre(_tensor(sample.image)))
        colours.append(COLOURS.index(colour))
    return torch.stack(xs), torch.tensor(colours)


def _augment(gen: torch.Generator, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The same random flip and quarter turn for every tensor (the labels are invariant)."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    flip = bool(torch.randint(0, 2, (1,), generator=gen))
    out = []
    for t in tensors:
        t = torch.rot90(t, k, dims=(-2, -1))
        out.append(torch.flip(t, dims=(-1,)) if flip else t)
    return out


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    max_lrs = [g["lr"] for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=steps, pct_start=0.2)


def confusion(pred: np.ndarray, truth: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(truth.ravel().astype(np.int64) * n + pred.ravel(), minlength=n * n).reshape(n, n)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(np.float64)
    return tp / np.maximum(cm.sum(0) + cm.sum(1) - tp, 1)


def predict_masks(model: torch.nn.Module, x: torch.Tensor, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Masks at each image's own size, as the service computes them (bilinear logits, argmax)."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), 32):
            logits = model(x[i : i + 32])
            for j in range(logits.shape[0]):
                up = F.interpolate(logits[j : j + 1], size=sizes[i + j], mode="bilinear")
                out.append(up[0].argmax(0).to(torch.uint8).numpy())
    return out


def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> float | torch.Tensor:
    """Soft Dice of the shape class over the batch: it rewards overlap (IoU), not pixel counts."""
    prob = logits.softmax(1)[:, 1]
    fg = (target == 1).to(prob.dtype)
    return 1 - (2 * (prob * fg).sum() + 1) / (prob.sum() + fg.sum() + 1)


def train_unet(cfg: TrainSettings, report: Report) -> torch.nn.Module:
    t0 = time.perf_counter()
    x, y, _ = unet_data(cfg.seed, cfg.unet_train)
    report.seconds["unet_data"] = time.perf_counter() - t0
    _say(f"unet: {len(x)} training images in {report.seconds['unet_data']:.1f}s")
    torch.manual_seed(cfg.seed)
    model = nets.get_net("unet", **UNET_ARGS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.unet_lr, weight_decay=1e-4)
    scheduler = _schedule(optimizer, cfg.unet_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    t1 = time.perf_counter()
    model.train()
    running = 0.0
    for step in range(1, cfg.unet_steps + 1):
        idx = torch.randint(0, len(x), (cfg.unet_batch,), generator=gen)
        xb, yb = _augment(gen, x[idx], y[idx])
        logits = model(xb)
        loss = F.cross_entropy(logits, yb) + _dice_loss(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running += float(loss.detach())
        if step % cfg.log_every == 0 or step == cfg.unet_steps:
            _say(f"unet: step {step}/{cfg.unet_steps} loss {running / cfg.log_every:.4f}"
                 f" ({time.perf_counter() - t1:.0f}s)")
            running = 0.0
    report.seconds["unet_train"] = time.perf_counter() - t1
    model.eval()
    report.metrics[UNET_NAME] = evaluate_unet(model, cfg)
    return model


def evaluate_unet(model: torch.nn.Module, cfg: TrainSettings) -> dict[str, Any]:
    """Held-out images (another seed), scored at their own size as the service answers."""
    x, _, full = unet_data(cfg.seed + 1, cfg.unet_eval)
    pred = predict_masks(model, x, [m.shape for m in full])
    n = len(SEG_LABELS)
    cm = sum(confusion(p, t, n) for p, t in zip(pred, full))
    iou = iou_from_confusion(cm)
    per_image = [iou_from_confusion(confusion(p, t, n))[1] for p, t in zip(pred, full)]
    metrics = {
        "mean_iou": round(float(iou.mean()), 4),
        "class_iou": {label: round(float(v), 4) for label, v in zip(SEG_LABELS, iou)},
        "shape_iou_per_image_mean": round(float(np.mean(per_image)), 4),
        "pixel_accuracy": round(float(np.trace(cm) / cm.sum()), 4),
        "held_out_images": cfg.unet_eval,
    }
    _say(f"unet: held-out mean IoU {metrics['mean_iou']:.4f} {metrics['class_iou']}")
    return metrics


def _extra_logits(model: torch.nn.Module, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """ResNetExtra's forward up to (not including) its softmax, for a stable cross-entropy."""
    features = model.net(x)
    joined = torch.cat([model.dropout(model.relu(features)), s.view(-1, 1).to(features.dtype)], dim=1)
    return model.fc_add(joined)


def train_extra(cfg: TrainSettings, report: Report) -> dict[str, torch.Tensor]:
    """Train, then return the int8 package; its accuracy is measured on the dequantized weights."""
    t0 = time.perf_counter()
    x, colours = extra_data(cfg.seed, cfg.extra_train)
    report.seconds["extra_data"] = time.perf_counter() - t0
    _say(f"extra: {len(x)} training images in {report.seconds['extra_data']:.1f}s")
    torch.manual_seed(cfg.seed)
    model = nets.get_net("resnet50_extra", **EXTRA_ARGS)
    head = list(model.fc_add.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": cfg.extra_lr}, {"params": head, "lr": cfg.extra_head_lr}], weight_decay=1e-4
    )
    scheduler = _schedule(optimizer, cfg.extra_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    t1 = time.perf_counter()
    model.train()
    running, hits, seen = 0.0, 0, 0
    for step in range(1, cfg.extra_steps + 1):
        idx = torch.randint(0, len(x), (cfg.extra_batch,), generator=gen)
        (xb,) = _augment(gen, x[idx])
        s = torch.rand(cfg.extra_batch, generator=gen)
        target = 2 * colours[idx] + (s > THRESHOLD).long()
        logits = _extra_logits(model, xb, s)
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running += float(loss.detach())
        hits += int((logits.argmax(1) == target).sum())
        seen += len(target)
        if step % cfg.log_every == 0 or step == cfg.extra_steps:
            _say(f"extra: step {step}/{cfg.extra_steps} loss {running / cfg.log_every:.4f}"
                 f" train acc {hits / seen:.3f} ({time.perf_counter() - t1:.0f}s)")
            running, hits, seen = 0.0, 0, 0
    report.seconds["extra_train"] = time.perf_counter() - t1
    float_model = nets.get_net("resnet50_extra", **EXTRA_ARGS)
    float_model.load_state_dict(model.state_dict())
    # The served backbone is the int8 one: give it to the model, then fit the head to its features.
    model.load_state_dict(dequantize_state_dict(quantize_state_dict(model.state_dict())), strict=True)
    t2 = time.perf_counter()
    _fit_head(model, x[: cfg.extra_head_images], colours=colours[: cfg.extra_head_images], cfg=cfg,
              gen=gen)
    report.seconds["extra_head"] = time.perf_counter() - t2
    packed = quantize_state_dict(model.state_dict())
    served = nets.get_net("resnet50_extra", **EXTRA_ARGS)
    served.load_state_dict(dequantize_state_dict(packed), strict=True)
    report.metrics[EXTRA_NAME] = evaluate_extra(served, cfg, float_model=float_model)
    return packed


def _fit_head(model: torch.nn.Module, x: torch.Tensor, colours: torch.Tensor, cfg: TrainSettings,
              gen: torch.Generator) -> None:
    """Fit ``fc_add`` alone on the eval-mode features (what the service computes: no dropout, running
    BatchNorm statistics) with fresh random scalars: cheap, and it sharpens the scalar threshold."""
    model.eval()
    with torch.inference_mode():
        feats = torch.cat([model.relu(model.net(x[i : i + 64])) for i in range(0, len(x), 64)])
    head = model.fc_add
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.extra_head_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.extra_head_steps)
    hits = seen = 0
    for step in range(1, cfg.extra_head_steps + 1):
        idx = torch.randint(0, len(feats), (256,), generator=gen)
        s = torch.rand(256, generator=gen)
        target = 2 * colours[idx] + (s > THRESHOLD).long()
        logits = head(torch.cat([feats[idx], s.view(-1, 1)], dim=1))
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step > cfg.extra_head_steps - 100:
            hits += int((logits.argmax(1) == target).sum())
            seen += len(target)
    _say(f"extra: head fitted on {len(feats)} images' features, last 100 steps acc {hits / seen:.3f}")


def evaluate_extra(model: torch.nn.Module, cfg: TrainSettings, float_model: torch.nn.Module | None = None
                   ) -> dict[str, Any]:
    """Held-out images (another seed) with uniform random scalars; the model's real forward."""
    x, colours = extra_data(cfg.seed + 1, cfg.extra_eval)
    rng = np.random.default_rng([cfg.seed + 1, 99])
    s = torch.from_numpy(rng.uniform(0, 1, size=len(x)).astype(np.float32))
    target = 2 * colours + (s > THRESHOLD).long()

    def predict(m: torch.nn.Module) -> torch.Tensor:
        m.eval()
        with torch.inference_mode():
            return torch.cat([m(x[i : i + 64], s[i : i + 64]).argmax(1) for i in range(0, len(x), 64)])

    pred = predict(model)
    clear = (s - THRESHOLD).abs() > 0.05
    metrics: dict[str, Any] = {
        "accuracy": round(float((pred == target).float().mean()), 4),
        "colour_accuracy": round(float((pred // 2 == colours).float().mean()), 4),
        "scalar_side_accuracy": round(float((pred % 2 == target % 2).float().mean()), 4),
        "accuracy_scalar_off_threshold_by_0.05": round(float((pred == target)[clear].float().mean()), 4),
        "held_out_images": cfg.extra_eval,
        "weights": "int8 per-channel, dequantized to float32 (as served)",
    }
    if float_model is not None:
        before = (predict(float_model) == target).float().mean()
        metrics["accuracy_before_head_fit_float32"] = round(float(before), 4)
    _say(f"extra: held-out accuracy {metrics['accuracy']:.4f} (colour {metrics['colour_accuracy']:.4f},"
         f" scalar side {metrics['scalar_side_accuracy']:.4f},"
         f" before the head fit {metrics.get('accuracy_before_head_fit_float32')})")
    return metrics


# ---- outputs -------------------------------------------------------------------------------------


def write_samples(out: Path = SAMPLES_DIR) -> list[dict[str, Any]]:
    """The page's sample images and ``index.json`` (title, shapes with a point inside and a bbox)."""
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for stem, title, kinds, colours, i in SAMPLES:
        radius = EXTRA_RADIUS if len(kinds) == 1 else None
        sample = make_sample(SAMPLE_SEED, i, size=SAMPLE_SIZE, kinds=kinds, colours=colours, radius=radius)
        Image.fromarray(sample.image).save(out / f"{stem}.png", optimize=True)
        index.append({"file": f"{stem}.png", "title": title, "width": SAMPLE_SIZE, "height": SAMPLE_SIZE,
                      "shapes": [s.to_dict() for s in sample.shapes]})
    (out / "index.json").write_text(json.dumps({"samples": index}, indent=1) + "\n")
    return index


def _write_bytes(path: Path, data: bytes) -> str:
    from app.store.writer import atomic_write_bytes

    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def write_manifest(out: Path, entries: dict[str, dict[str, Any]]) -> None:
    from app.store.writer import to_toml

    text = "# Written by `python -m app.demo.train` (modserve train-demo); read by app/demo/trained.py.\n"
    text += to_toml(entries)
    (out / MANIFEST).write_text(text)


def train(cfg: TrainSettings, *, out: Path = DEMO_DIR, only: tuple[str, ...] = (UNET_NAME, EXTRA_NAME)
          ) -> Report:
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    report = Report()
    start = time.perf_counter()
    try:
        from app.demo.trained import read_manifest

        entries: dict[str, dict[str, Any]] = read_manifest(out)
    except Exception:  # noqa: BLE001 - no manifest yet
        entries = {}
    common = {"seed": cfg.seed, "threads": cfg.threads, "torch": torch.__version__,
              "machine": platform.machine()}
    if UNET_NAME in only:
        t = time.perf_counter()
        model = train_unet(cfg, report)
        digest = _write_bytes(out / CHECKPOINT_FILES[UNET_NAME], state_dict_bytes(model.state_dict()))
        entries[UNET_NAME] = {"file": CHECKPOINT_FILES[UNET_NAME], "sha256": digest, "encoding": "state_dict",
                              "seconds": round(time.perf_counter() - t, 1), **common,
                              "steps": cfg.unet_steps, "batch": cfg.unet_batch,
                              "train_images": cfg.unet_train,
                              "metrics": report.metrics[UNET_NAME]}
    if EXTRA_NAME in only:
        t = time.perf_counter()
        packed = train_extra(cfg, report)
        digest = _write_bytes(out / CHECKPOINT_FILES[EXTRA_NAME], state_dict_bytes(packed))
        entries[EXTRA_NAME] = {"file": CHECKPOINT_FILES[EXTRA_NAME], "sha256": digest, "encoding": "int8",
                               "seconds": round(time.perf_counter() - t, 1), **common,
                               "steps": cfg.extra_steps, "batch": cfg.extra_batch,
                               "train_images": cfg.extra_train, "metrics": report.metrics[EXTRA_NAME]}
    write_manifest(out, entries)
    report.seconds["total"] = time.perf_counter() - start
    for name in only:
        size = (out / CHECKPOINT_FILES[name]).stat().st_size
        _say(f"{name}: {out / CHECKPOINT_FILES[name]} ({size / 1e6:.2f} MB) sha256 {entries[name]['sha256']}")
    _say(f"done in {report.seconds['total']:.0f}s: " + json.dumps(report.metrics))
    return report


def build_parser() -> argparse.ArgumentParser:
    d = TrainSettings()
    p = argparse.ArgumentParser(prog="modserve train-demo", description="Train the demo models on synthetic "
                                "shapes and write app/demo_models/ and the page's samples.")
    p.add_argument("--out", type=Path, default=DEMO_DIR, help="where the checkpoints and checkpoints.toml go")
    p.add_argument("--samples", type=Path, default=SAMPLES_DIR, help="where the page's sample images go")
    p.add_argument("--only", choices=["unet", "extra", "samples"], action="append",
                   help="train or write only this (repeatable); default: everything")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (results depend on it)")
    p.add_argument("--unet-steps", type=int, default=d.unet_steps)
    p.add_argument("--extra-steps", type=int, default=d.extra_steps)
    p.add_argument("--unet-train", type=int, default=d.unet_train, help="U-Net training images")
    p.add_argument("--extra-train", type=int, default=d.extra_train, help="classifier training images")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = TrainSettings(seed=args.seed, threads=args.threads, unet_steps=args.unet_steps,
                        extra_steps=args.extra_steps, unet_train=args.unet_train,
                        extra_train=args.extra_train)
    only = set(args.only or ["unet", "extra", "samples"])
    if "samples" in only:
        write_samples(args.samples)
        _say(f"wrote samples into {args.samples}")
    models = tuple(n for key, n in (("unet", UNET_NAME), ("extra", EXTRA_NAME)) if key in only)
    if models:
        args.out.mkdir(parents=True, exist_ok=True)
        train(cfg, out=args.out, only=models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
