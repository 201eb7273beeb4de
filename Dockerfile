# modserve: one Dockerfile, two images. Only the base and the torch install differ between them.
#
# GPU image (the default): the official PyTorch CUDA runtime image, whose CUDA builds of torch and
# torchvision are kept as they are.
#
#   docker build -t modserve:0.1.0 .
#   docker run --gpus all --stop-timeout 40 -p 127.0.0.1:8000:8000 -v modserve-store:/models modserve:0.1.0
#
# CPU image: BASE_IMAGE is a Debian or Ubuntu image with python3 >= 3.11 and pip, and TORCH_INSTALL
# (pip arguments, split on blanks) installs torch and torchvision into it. PyPI's Linux wheels are CUDA
# builds, which run on the CPU as well (a large image: the CUDA libraries come along); PyTorch's own
# CPU-only index gives a far smaller one (add `--index-url` and that index to TORCH_INSTALL).
#
#   docker build -t modserve:0.1.0-cpu --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#     --build-arg TORCH_INSTALL="torch==2.14.1 torchvision==0.29.1" .
#
# docker-compose.cpu.yml passes the same two arguments. scripts/container-check.sh builds the CPU image
# on a Debian bookworm base that it makes with debootstrap, and runs it (deploy/README.md).
#
# The GPU base is pinned by tag. In production pin it by digest as well
# (pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime@sha256:...), so that a re-pushed tag cannot
# change the image under you: `docker buildx imagetools inspect <tag>` prints the digest.
# torch 2.11.0 + CUDA 12.8 satisfies pyproject's torch>=2.10 / torchvision>=0.25 and runs on
# Volta through Blackwell (sm_70..sm_120) with an NVIDIA driver >= 570.
# Since 2.10 these images use the system Python 3.12 (Ubuntu 24.04), earlier ones a conda Python 3.11:
# nothing below assumes either (python3 from PATH, Python >= 3.11 is checked during the build).
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Install the project from pyproject.toml with its dependencies, but never let pip replace the
# image's CUDA builds of torch/torchvision (a PyPI resolve could pull other builds): their
# installed versions are written to a constraints file first and checked again afterwards.
# (python3 -I: the checks import the installed package, never sources from the working directory.)
# The sources and what importing torch leaves in /tmp are removed in the same step: not in the image.
# PIP_BREAK_SYSTEM_PACKAGES: the newer images' system Python carries a PEP 668 marker; this image
# is the only "environment" here, so installing into it is intended (ignored where no marker exists).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_BREAK_SYSTEM_PACKAGES=1

# The torch install. Empty (the GPU image): nothing is installed, the base image's CUDA builds of
# torch/torchvision serve. The CPU image: pip arguments that install both (see above), in a layer of
# their own, so that a change to app/ does not reinstall torch.
ARG TORCH_INSTALL=""
RUN if [ -n "$TORCH_INSTALL" ]; then printf '%s' "$TORCH_INSTALL" | xargs python3 -m pip install; fi

COPY pyproject.toml README.md /tmp/modserve-src/
COPY app /tmp/modserve-src/app
RUN python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
 && python3 -c 'import importlib.metadata as m; print("\n".join(f"{p}=={m.version(p)}" for p in ("torch", "torchvision")))' \
        > /tmp/base-torch.txt \
 && cat /tmp/base-torch.txt \
 && python3 -m pip install --constraint /tmp/base-torch.txt /tmp/modserve-src \
 && python3 -I -c 'import importlib.metadata as m, sys; want = dict(line.strip().split("==") for line in open("/tmp/base-torch.txt")); got = {p: m.version(p) for p in want}; sys.exit(0 if got == want else f"torch/torchvision replaced: {want} -> {got}")' \
 && python3 -I -c 'import os, torch, torchvision, app.main; assert torch.version.cuda or os.environ.get("TORCH_INSTALL"), "torch is not a CUDA build (GPU image)"; print("torch", torch.__version__, "CUDA", torch.version.cuda)' \
 && rm -rf /tmp/modserve-src /tmp/base-torch.txt /tmp/torchinductor_*

# A non-root user with a fixed numeric id (Kubernetes runAsNonRoot can verify a number), and the
# default store, owned by it so that --demo-if-empty can write the demo store into an empty /models
# (a named volume mounted there inherits this ownership; a bind mount keeps the host's).
RUN groupadd --system --gid 10001 modserve \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/modserve modserve \
 && mkdir -p /models \
 && chown 10001:10001 /models

# Settings the code reads (app/config.py, prefix MODSERVE_). HOST must not stay on the loopback
# default inside a container. GRACEFUL_TIMEOUT is uvicorn's drain time after SIGTERM: `docker stop`
# (and compose's stop_grace_period, Kubernetes' terminationGracePeriodSeconds) must wait longer.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODSERVE_HOST=0.0.0.0 \
    MODSERVE_PORT=8000 \
    MODSERVE_STORE=/models \
    MODSERVE_GRACEFUL_TIMEOUT=30

WORKDIR /home/modserve
USER 10001:10001
EXPOSE 8000

# Ready = every model in the store loaded (503 before, and while draining). Python's urllib, so that
# no curl is needed; urlopen raises on any non-2xx answer, so the exit code is the verdict.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('MODSERVE_PORT', '8000')}/v2/health/ready\", timeout=4)"]

# uvicorn drains on SIGTERM (readiness 503, in-flight requests finish within MODSERVE_GRACEFUL_TIMEOUT).
STOPSIGNAL SIGTERM

# The same entry point as the end-to-end tests and ./scripts/run.sh: `python -m app` (= modserve serve).
# --demo-if-empty writes the demo store (seeded random weights, generated locally: nothing is
# downloaded) when /models holds no model; a mounted store with models is served as it is.
CMD ["python3", "-m", "app", "--demo-if-empty"]
