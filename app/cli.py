"""The ``modserve`` command: serve, inspect a checkpoint, write the demo store."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from app.config import Settings
    from app.main import create_app
    from app.observability.logs import configure_logging
    from app.server import serve

    overrides = {k: v for k, v in {
        "store": args.store, "host": args.host, "port": args.port, "device": args.device, "workers": args.workers,
    }.items() if v is not None}
    try:
        settings = Settings(**overrides)  # flags win over MODSERVE_* variables
    except ValidationError as exc:
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            print(f"modserve: invalid setting {key} (MODSERVE_{key.upper()}): {err['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.demo_if_empty:
        from app.demo.store import ensure_demo_store

        ensure_demo_store(settings.store)
    print(f"modserve: serving {settings.store} on http://{settings.host}:{settings.port} "
          f"(API docs at http://{settings.host}:{settings.port}/docs)", flush=True)
    if settings.workers > 1:
        from app.workers.supervisor import serve_workers

        return serve_workers(settings)
    serve(create_app(settings), settings)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from app.errors import ServiceError
    from app.loading.inspect import inspect_checkpoint

    try:
        facts = inspect_checkpoint(Path(args.path))
    except ServiceError as exc:
        print(f"modserve inspect: {exc.message}", file=sys.stderr)
        return 1
    print(facts.to_text())
    return 0


def _demo_store(args: argparse.Namespace) -> int:
    from app.demo.store import write_demo_store

    written = write_demo_store(Path(args.dir), force=args.force)
    for name in written:
        print(f"wrote {Path(args.dir) / name}")
    return 0


def _train_demo(args: argparse.Namespace) -> int:
    from app.demo.train import main as train_main

    return train_main(args.options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP service")
    serve.add_argument("--store", type=Path, help="model store folder (MODSERVE_STORE)")
    serve.add_argument("--host", help="bind address (MODSERVE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (MODSERVE_PORT, default 8000)")
    serve.add_argument("--device", help="auto, cpu, cuda or cuda:N (MODSERVE_DEVICE)")
    serve.add_argument("--workers", type=int,
                       help="HTTP processes; 2 or more add one device process that runs the models (MODSERVE_WORKERS)")
    serve.add_argument("--demo-if-empty", action="store_true",
                       help="write the demo store first when the store holds no models")
    serve.set_defaults(func=_serve)
    insp = sub.add_parser("inspect", help="describe a checkpoint file without running its code")
    insp.add_argument("path")
    insp.set_defaults(func=_inspect)
    demo = sub.add_parser("demo-store", help="write a store with one seeded model per architecture")
    demo.add_argument("dir", nargs="?", default=os.environ.get("MODSERVE_STORE", "models_store"))
    demo.add_argument("--force", action="store_true", help="overwrite existing demo models")
    demo.set_defaults(func=_demo_store)
    train = sub.add_parser("train-demo", add_help=False, prefix_chars="\0",
                           help="train the demo shape models (app/demo_models/); --help for its options")
    train.add_argument("options", nargs="*", help=argparse.SUPPRESS)
    train.set_defaults(func=_train_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
