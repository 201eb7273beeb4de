"""The service's Open Inference Protocol v2 endpoint with binary tensors, as a bench system.

``service_v2`` is the same server as ``service``, driven with pre-processed FP32 ``image`` tensors
(and the FP32 ``scalar``) as raw bytes after the JSON header, asking for the first output in binary:
what a client that decodes and pre-processes on its own side sends. The bodies are encoded once,
from the same JPEGs the upload systems get.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HEADER = "Inference-Header-Content-Length"


def encode_body(image: np.ndarray, scalar: float | None, output: str) -> tuple[bytes, int]:
    """(body, JSON header length) of one v2 request for a float32 ``(C, h, w)`` image."""
    raw = np.ascontiguousarray(image, dtype="<f4").tobytes()
    inputs: list[dict[str, Any]] = [{"name": "image", "shape": [1, *image.shape], "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}]
    chunks = [raw]
    if scalar is not None:
        chunks.append(np.asarray([scalar], dtype="<f4").tobytes())
        inputs.append({"name": "scalar", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}})
    header = json.dumps({"inputs": inputs, "outputs": [{"name": output, "parameters": {"binary_data": True}}]},
                        separators=(",", ":")).encode()
    return header + b"".join(chunks), len(header)


def write_bodies(folder: Path, jpegs: list[Path], store: Path, model: str, scalar: str | None) -> Path:
    """``folder/*.body`` and ``folder/headers.json`` for bench.loadgen ``--bodies``."""
    from app.runtime.images import decode_image
    from app.runtime.preprocess import Preprocessor
    from app.store.model_config import load_model_config

    cfg = load_model_config(store / model / "model.toml")
    pre = Preprocessor(cfg.preprocess, default_resize=None)
    output = "mask" if cfg.architecture == "unet" else "probs"
    folder.mkdir(parents=True, exist_ok=True)
    length = None
    for path in jpegs:
        image = pre(decode_image(path.read_bytes(), color_mode=cfg.preprocess.color_mode, max_pixels=10**9))
        body, length = encode_body(image.numpy(), float(scalar) if scalar is not None else None, output)
        (folder / f"{path.stem}.body").write_bytes(body)
    headers = {"content-type": "application/octet-stream", HEADER: str(length)}
    (folder / "headers.json").write_text(json.dumps(headers))
    return folder


def probe(url: str, folder: Path) -> dict[str, Any]:
    headers = json.loads((folder / "headers.json").read_text())
    body = sorted(folder.glob("*.body"))[0].read_bytes()
    with httpx.Client(timeout=120, trust_env=False) as http:
        resp = http.post(url, content=body, headers=headers)
    out: dict[str, Any] = {"status": resp.status_code}
    if resp.status_code != 200:
        out["body"] = resp.text[:500]
    return out
