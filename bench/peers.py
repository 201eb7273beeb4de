"""The two peers, built on the same model.toml and weights file as the service.

``python -m bench.peers naive ...``: a plain FastAPI app under uvicorn, one request ->
PIL decode -> torchvision transform -> one forward (no batching). ``--naive-endpoint sync``
(default) is a ``def`` route, which FastAPI runs in its thread pool: the way its docs say
to write blocking code; ``async`` blocks the event loop instead (one forward at a time).

``python -m bench.peers litserve ...``: LitServe with the same ``max_batch_size`` and
``batch_timeout`` (= max_batch_delay_ms / 1000) as the service, one inference worker.

Both accept the service's multipart upload (``image`` JPEG file + ``scalar`` text field)
on ``POST /predict`` and answer ``{"predictions": [{...}]}`` like the native API.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import File, Form, UploadFile  # module level: FastAPI resolves route annotations here


class Predictor:
    """Decode + transform + forward + format, the textbook way."""

    def __init__(self, store: Path, name: str, device: str) -> None:
        import torch
        from torchvision.transforms import v2 as T

        from bench.workload import load_net

        self.net = load_net(store, name, device)
        pre = self.net.config.preprocess
        modes = {"nearest": T.InterpolationMode.NEAREST, "bilinear": T.InterpolationMode.BILINEAR,
                 "bicubic": T.InterpolationMode.BICUBIC}
        self.color_mode = pre.color_mode
        self.transform = T.Compose([
            T.ToImage(),
            T.Resize(list(pre.resize), interpolation=modes[pre.resample], antialias=True),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(pre.mean), list(pre.std)),
        ])
        labels = self.net.config.postprocess.labels
        n = int(self.net.config.arguments.get("num_classes", self.net.config.arguments.get("n_classes", 2)))
        self.labels = list(labels) if labels else [str(i) for i in range(n)]
        self.n_extra = int(self.net.config.arguments.get("n_extra", 1))

    def decode(self, data: bytes, scalar: str | None) -> tuple[Any, Any]:
        import torch
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert(self.color_mode)
        x = self.transform(img)
        s = None
        if self.net.takes_extra:
            values = [float(v) for v in (scalar or "").split(",")]
            s = torch.tensor(values[: self.n_extra], dtype=torch.float32)
        return x, s

    def run(self, items: list[tuple[Any, Any]]) -> list[dict[str, Any]]:
        import torch

        from bench.workload import forward

        with torch.inference_mode():
            x = torch.stack([i[0] for i in items])
            s = torch.stack([i[1] for i in items]) if self.net.takes_extra else None
            out = forward(self.net, x, s)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out = out.float().cpu()
        if self.net.task == "segmentation":
            return [self._mask(o) for o in out]
        probs = out.numpy()
        return [{"probs": p.tolist(), "label": {"index": int(np.argmax(p)), "name": self.labels[int(np.argmax(p))]}}
                for p in probs]

    def _mask(self, logits: Any) -> dict[str, Any]:
        from bench.workload import png_b64

        if logits.shape[0] == 1:
            mask = (logits[0].sigmoid() > 0.5).numpy().astype(np.uint8)
        else:
            mask = logits.argmax(dim=0).numpy().astype(np.uint8)
        painted = (mask * (255 // max(1, logits.shape[0] - 1))).astype(np.uint8)
        return {"mask": png_b64(painted), "mask_format": "png", "width": int(mask.shape[1]),
                "height": int(mask.shape[0])}


# ---- naive FastAPI ------------------------------------------------------------------------


def naive_app(store: Path, name: str, device: str, endpoint: str) -> Any:
    from fastapi import FastAPI

    pred = Predictor(store, name, device)
    pred.run([pred.decode(_warm_jpeg(pred), "0.5")])  # warm-up forward, like the service
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ready": True}

    if endpoint == "async":
        @app.post("/predict")
        async def predict_async(image: UploadFile = File(...), scalar: str | None = Form(None)) -> Any:
            data = await image.read()
            return {"predictions": pred.run([pred.decode(data, scalar)])}
    else:
        @app.post("/predict")
        def predict(image: UploadFile = File(...), scalar: str | None = Form(None)) -> Any:
            data = image.file.read()
            return {"predictions": pred.run([pred.decode(data, scalar)])}

    return app


def _warm_jpeg(pred: Predictor) -> bytes:
    from PIL import Image

    h, w = pred.net.config.preprocess.resize
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (128, 100, 90)).save(buf, format="JPEG")
    return buf.getvalue()


# ---- LitServe -----------------------------------------------------------------------------


try:
    import litserve as ls
except ImportError:  # only the litserve peer needs it (bench/requirements.txt)
    ls = None

if ls is not None:

    class BenchAPI(ls.LitAPI):
        """Module level: LitServe pickles the API into a spawned inference worker."""

        def __init__(self, store: Path, name: str, threads: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.store, self.name, self.threads = store, name, threads

        def setup(self, device: str) -> None:
            from bench.workload import set_threads

            set_threads(self.threads)
            self.pred = Predictor(self.store, self.name, "cuda" if str(device).startswith("cuda") else "cpu")
            self.pred.run([self.pred.decode(_warm_jpeg(self.pred), "0.5")])

        def decode_request(self, request):  # type: ignore[no-untyped-def]  # no annotation: LitServe then passes the form
            upload = request["image"]
            data = upload.file.read() if hasattr(upload, "file") else bytes(upload)
            return self.pred.decode(data, request.get("scalar"))

        def batch(self, inputs: list[Any]) -> list[Any]:
            return list(inputs)

        def predict(self, x: Any) -> list[dict[str, Any]]:
            return self.pred.run(x if isinstance(x, list) else [x])

        def unbatch(self, output: list[Any]) -> list[Any]:
            return output

        def encode_response(self, output: Any) -> dict[str, Any]:
            if isinstance(output, list):  # max_batch_size 1: predict answered a one-item list
                output = output[0]
            return {"predictions": [output]}


def litserve_server(store: Path, name: str, device: str, threads: int, max_batch_size: int,
                    batch_timeout_ms: float, fast_queue: bool = False) -> Any:
    if ls is None:
        raise SystemExit("litserve is not installed: pip install -r bench/requirements.txt")
    api = BenchAPI(store, name, threads, max_batch_size=max_batch_size, batch_timeout=batch_timeout_ms / 1000.0)
    accelerator = "cuda" if device.startswith("cuda") else "cpu"
    return ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=120,
                        fast_queue=fast_queue)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("peer", choices=["naive", "litserve"])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-timeout-ms", type=float, default=2.0)
    p.add_argument("--naive-endpoint", choices=["sync", "async"], default="sync")
    p.add_argument("--fast-queue", action="store_true", help="LitServe: ZeroMQ transport instead of mp queues")
    args = p.parse_args(argv)
    from bench.workload import set_threads

    set_threads(args.threads)
    if args.peer == "naive":
        import uvicorn

        app = naive_app(args.store, args.model, args.device, args.naive_endpoint)
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    else:
        server = litserve_server(args.store, args.model, args.device, args.threads,
                                 args.max_batch_size, args.batch_timeout_ms, args.fast_queue)
        server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False,
                   access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
