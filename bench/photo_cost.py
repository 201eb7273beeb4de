"""What one 12 MP phone photo costs on each demo model: processed size, limit, latency, memory.

    python -m bench.photo_cost [--store DIR] [--megapixels 12]

Writes the demo store into a temporary folder unless ``--store`` is given, serves it in-process
(the real app with its lifespan, over ASGI), sends one JPEG of the given size to every model and
prints a Markdown table. Memory is the growth of the process's peak resident set (ru_maxrss)
during that model's request, so models are measured smallest first.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import resource
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def photo(megapixels: float, seed: int = 0) -> bytes:
    """A photo-like JPEG (smooth gradients, shapes and sensor noise) at 4:3."""
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 1 - x / width], axis=-1) * 200
    base += 30 * np.sin(x[..., None] / 97.0) * np.cos(y[..., None] / 53.0)
    base += rng.normal(0, 6, size=base.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def measure(store: Path, megapixels: float) -> list[dict[str, object]]:
    from app.config import Settings
    from app.main import create_app

    app = create_app(Settings(store=store, warmup=True, max_image_pixels=200_000_000))
    data = photo(megapixels)
    rows = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
            models = (await client.get("/v1/models")).json()["models"]
            order = sorted(models, key=lambda m: (m.get("max_processed_pixels") or 0, m["name"]))
            for info in order:
                name = info["name"]
                extra = {"scalar": "0.5"} if any(i["name"] == "scalar" for i in info.get("inputs", [])) else {}
                before = _peak_mb()
                started = time.perf_counter()
                r = await client.post(f"/v1/models/{name}/predict", files={"image": ("p.jpg", data)}, data=extra)
                elapsed = time.perf_counter() - started
                rows.append({
                    "model": name, "status": r.status_code, "seconds": elapsed,
                    "peak_growth_mb": _peak_mb() - before, "limit": info.get("max_processed_pixels"),
                    "error": r.json().get("error") if r.status_code != 200 else None,
                })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path)
    parser.add_argument("--megapixels", type=float, default=12.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store
        if store is None:
            from app.demo.store import write_demo_store

            store = Path(tmp) / "store"
            write_demo_store(store)
        rows = asyncio.run(measure(store, args.megapixels))
    print(f"| model ({args.megapixels:g} MP JPEG) | status | processed-pixel limit | latency | peak RSS growth |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        status = str(row["status"]) + (f" ({row['error']})" if row["error"] else "")
        limit = f"{row['limit']:,}" if row["limit"] else "fixed input"
        print(f"| {row['model']} | {status} | {limit} | {row['seconds']:.2f} s | {row['peak_growth_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
