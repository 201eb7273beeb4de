"""Deployment files: validated by real tools (scripts/validate-deploy.sh), and consistent with the code.

No Docker engine or cluster runs here (the CPU image is built and run with podman by
tests/deploy/test_container.py). What these tests check without one:
- hadolint, the Compose Specification schema, Docker Compose's own `config`, kustomize and
  kubernetes-validate (strict), KServe's SDK models: every step passes on the committed files and
  fails on a broken copy;
- the Dockerfile's CMD, the compose command and the Kubernetes/KServe container commands start the same
  entry point (`python -m app`) with flags the CLI knows, and every MODSERVE_* name they use is a
  field of ``app.config.Settings``; ports, probes, grace periods and the store mounts agree;
- the container command, run here with the image's environment, serves, and the image's HEALTHCHECK
  command passes against it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.cli import build_parser
from app.config import Settings

StepResult = Callable[[str], "subprocess.CompletedProcess[str]"]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "validate-deploy.sh"
ENTRY = ["python3", "-m", "app"]
STEPS = ["dockerfile", "compose", "k8s", "kserve"]
SETTING_NAMES = {f"MODSERVE_{name.upper()}" for name in Settings.model_fields}
DEFAULT_GRACEFUL = float(Settings.model_fields["graceful_timeout"].default)


# --------------------------------------------------------------------------- running the script

def run_script(*steps: str, render_dir: Path | None = None, deploy_root: Path | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    if render_dir is not None:
        env["DEPLOY_RENDER_DIR"] = str(render_dir)
    if deploy_root is not None:
        env["DEPLOY_ROOT"] = str(deploy_root)
    return subprocess.run(["bash", str(SCRIPT), *steps], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def tools() -> None:
    """Install the validators once (first run: a minute or two of downloads from PyPI)."""
    proc = run_script("tools", timeout=1200)
    assert proc.returncode == 0, f"installing the validation tools failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="session")
def render_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deploy-rendered")


@pytest.fixture(scope="session")
def step_result(tools: None, render_dir: Path) -> StepResult:
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def get(step: str) -> subprocess.CompletedProcess[str]:
        if step not in results:
            results[step] = run_script(step, render_dir=render_dir)
        return results[step]

    return get


@pytest.mark.parametrize("step", STEPS)
def test_validation_step_passes(step: str, step_result: StepResult) -> None:
    proc = step_result(step)
    assert proc.returncode == 0, f"validate-deploy.sh {step} failed:\n{proc.stdout}\n{proc.stderr}"
    assert f"all passed: {step}" in proc.stdout


# A validator that cannot fail proves nothing: each step must reject a broken copy of the files.
BROKEN = {
    "dockerfile": ("Dockerfile", "STOPSIGNAL SIGTERM", "STOPSIGNAL SIGTERM\nRUN cd /tmp", "DL3003"),
    "compose": ("docker-compose.yml", "count: 1", "count: one", "count"),
    "k8s": ("deploy/k8s/deployment.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesytem: true",
            "readOnlyRootFilesytem"),
    "kserve": ("deploy/kserve/inferenceservice.yaml", "minReplicas: 2", "minReplica: 2", "minReplica"),
}


@pytest.mark.parametrize("step", STEPS)
def test_validation_step_rejects_a_broken_copy(step: str, tools: None, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("Dockerfile", "docker-compose.yml", "docker-compose.cpu.yml"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "deploy", tree / "deploy")
    rel, old, new, expected = BROKEN[step]
    text = (tree / rel).read_text()
    assert old in text
    (tree / rel).write_text(text.replace(old, new, 1))
    proc = run_script(step, deploy_root=tree)
    assert proc.returncode != 0, f"validate-deploy.sh {step} accepted a broken {rel}:\n{proc.stdout}"
    assert expected in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- parsed deployment files

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_one(name: str) -> str:
    values = [rest for word, rest in dockerfile_instructions() if word == name]
    assert len(values) == 1, f"expected one {name} in the Dockerfile, found {len(values)}"
    return values[0]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {item}: use the KEY=value form"
                env[key] = value
    return env


def dockerfile_cmd() -> list[str]:
    return json.loads(dockerfile_one("CMD"))


def dockerfile_healthcheck() -> list[str]:
    options, sep, cmd = dockerfile_one("HEALTHCHECK").partition(" CMD ")
    assert sep, "HEALTHCHECK must use the exec form: HEALTHCHECK [options] CMD [...]"
    return json.loads(cmd)


def parse_duration(text: str | int | float) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="session")
def compose(step_result: StepResult, render_dir: Path) -> dict[str, dict]:
    """The service as Docker Compose renders it: {"gpu": ..., "cpu": ...}."""
    proc = step_result("compose")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {v: json.loads((render_dir / f"compose-{v}.json").read_text())["services"]["modserve"]
            for v in ("gpu", "cpu")}


@pytest.fixture(scope="session")
def k8s(step_result: StepResult, render_dir: Path) -> dict[str, dict]:
    """The kustomization as kustomize renders it, by kind."""
    proc = step_result("k8s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    docs = [d for d in yaml.safe_load_all((render_dir / "k8s.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one object of each kind expected"
    return by_kind


@pytest.fixture(scope="session")
def isvc() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text())


def pod_env(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def contexts(compose: dict, k8s: dict, isvc: dict) -> dict[str, dict[str, Any]]:
    """Every place that starts the service: its argv, environment (image ENV included) and store mount."""
    image_env = dockerfile_env()
    deployment = k8s["Deployment"]["spec"]["template"]["spec"]
    predictor = isvc["spec"]["predictor"]
    out: dict[str, dict[str, Any]] = {
        "Dockerfile": {"argv": dockerfile_cmd(), "env": image_env, "store_read_only": False},
    }
    for variant, svc in compose.items():
        mount = next(v for v in svc["volumes"] if v["target"] == image_env["MODSERVE_STORE"])
        out[f"compose ({variant})"] = {"argv": svc["command"], "env": {**image_env, **svc["environment"]},
                                       "store_read_only": bool(mount.get("read_only"))}
    for name, spec in (("Kubernetes", deployment), ("KServe", predictor)):
        (container,) = spec["containers"]
        env = {**image_env, **pod_env(container)}
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["MODSERVE_STORE"])
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"]["readOnly"] is True
        out[name] = {"argv": container.get("command", []) + container.get("args", []), "env": env,
                     "store_read_only": bool(mount.get("readOnly")), "spec": spec, "container": container}
    return out


# --------------------------------------------------------------------------- entry point and settings

def serve_flags() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    flags = {opt for action in sub.choices["serve"]._actions for opt in action.option_strings}
    return flags - {"-h", "--help"}


def test_every_container_starts_the_same_entry_point(compose: dict, k8s: dict, isvc: dict) -> None:
    ctx = contexts(compose, k8s, isvc)
    known = serve_flags()
    image_flags = ctx["Dockerfile"]["argv"][len(ENTRY):]
    for name, c in ctx.items():
        argv = c["argv"]
        assert argv[:len(ENTRY)] == ENTRY, f"{name} starts {argv}, not {ENTRY}"
        flags = argv[len(ENTRY):]
        assert set(flags) <= known, f"{name}: flags {flags} unknown to `modserve serve` ({sorted(known)})"
        # Settings travel as MODSERVE_* variables; the only flag is --demo-if-empty, which writes the
        # demo store into an empty store and so belongs exactly where the store is writable.
        assert ("--demo-if-empty" in flags) == (not c["store_read_only"]), name
        assert set(flags) - {"--demo-if-empty"} == set(image_flags) - {"--demo-if-empty"}, name
    # The tests' own entry point is the same module: tests/e2e start [sys.executable, "-m", "app"].
    assert (ROOT / "app" / "__main__.py").is_file()


def test_every_modserve_name_is_a_setting(compose: dict, k8s: dict, isvc: dict) -> None:
    ctx = contexts(compose, k8s, isvc)
    for name, c in ctx.items():
        used = {k for k in c["env"] if k.startswith("MODSERVE_")}
        assert used <= SETTING_NAMES, f"{name}: {sorted(used - SETTING_NAMES)} are not fields of Settings"
    # ... and every MODSERVE_* word anywhere in the deployment files and their documentation.
    files = [ROOT / "Dockerfile", ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml",
             *sorted((ROOT / "deploy").rglob("*")), ROOT / "scripts" / "validate-deploy.sh"]
    for path in files:
        if path.is_file():
            words = set(re.findall(r"\bMODSERVE_[A-Z][A-Z0-9_]*", path.read_text()))
            unknown = sorted(words - SETTING_NAMES)
            assert not unknown, f"{path.relative_to(ROOT)}: {unknown} are not settings"
    example = (ROOT / "deploy" / "modserve.env.example").read_text()
    assigned = re.findall(r"^\s*#?\s*(MODSERVE_[A-Z0-9_]+)=", example, re.M)
    assert assigned and set(assigned) <= SETTING_NAMES


def test_container_settings_parse_and_agree(compose: dict, k8s: dict, isvc: dict) -> None:
    ctx = contexts(compose, k8s, isvc)
    port = int(dockerfile_one("EXPOSE"))
    for name, c in ctx.items():
        plain = {k[len("MODSERVE_"):].lower(): v for k, v in c["env"].items()
                 if k.startswith("MODSERVE_") and isinstance(v, str)}
        settings = Settings(**plain)  # the values the code will read, validated by the code
        assert settings.host == "0.0.0.0", f"{name}: must listen beyond the container's loopback"
        assert settings.port == port, name
        assert str(settings.store) == "/models", name
    assert Settings(**{"device": compose["gpu"]["environment"]["MODSERVE_DEVICE"]}).device == "cuda:0"
    assert compose["cpu"]["environment"]["MODSERVE_DEVICE"] == "cpu"
    for name in ("Kubernetes", "KServe"):
        assert ctx[name]["env"]["MODSERVE_DEVICE"] == "cuda:0"
        # the admin token comes from a Secret, never from a literal value
        assert set(ctx[name]["env"]["MODSERVE_ADMIN_TOKEN"]) == {"secretKeyRef"}


def test_gpu_reservation_and_cpu_variant(compose: dict, k8s: dict, isvc: dict) -> None:
    devices = compose["gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert not (compose["cpu"].get("deploy") or {}).get("resources"), "the CPU variant must not reserve a GPU"
    for spec in (k8s["Deployment"]["spec"]["template"]["spec"], isvc["spec"]["predictor"]):
        (container,) = spec["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"])


def test_ports_and_health_checks_agree(compose: dict, k8s: dict, isvc: dict) -> None:
    port = int(dockerfile_one("EXPOSE"))
    check = dockerfile_healthcheck()
    assert "/v2/health/ready" in " ".join(check)
    for svc in compose.values():
        assert svc["healthcheck"]["test"] == ["CMD", *check], "compose and the image must probe alike"
        (published,) = svc["ports"]
        assert published["target"] == port
        assert published["host_ip"] == "127.0.0.1", "published on the loopback by default"
    ctx = contexts(compose, k8s, isvc)
    for name in ("Kubernetes", "KServe"):
        container = ctx[name]["container"]
        ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
        assert list(ports.values()) == [port], name

        def probe_port(probe: dict) -> int:
            p = probe["httpGet"]["port"]
            return ports[p] if isinstance(p, str) else p

        assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live", name
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live", name
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready", name
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe_port(container[kind]) == port, f"{name} {kind}"
    service = k8s["Service"]["spec"]
    pod_labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= pod_labels.items()
    assert service["ports"][0]["targetPort"] in ("http", port)
    assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert k8s["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = k8s["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": k8s["Deployment"]["metadata"]["name"]}
    assert hpa["minReplicas"] >= 2, "with one replica the PodDisruptionBudget would block every drain"
    assert "replicas" not in k8s["Deployment"]["spec"], "the HPA owns the replica count"


def test_stop_grace_periods_exceed_the_graceful_timeout(compose: dict, k8s: dict, isvc: dict) -> None:
    assert dockerfile_one("STOPSIGNAL") == "SIGTERM"
    ctx = contexts(compose, k8s, isvc)
    for variant, svc in compose.items():
        graceful = float(svc["environment"].get("MODSERVE_GRACEFUL_TIMEOUT", DEFAULT_GRACEFUL))
        assert svc["stop_signal"] == "SIGTERM"
        assert parse_duration(svc["stop_grace_period"]) >= graceful + 5, variant
        assert svc["restart"] in ("always", "unless-stopped", "on-failure")
    for name in ("Kubernetes", "KServe"):
        spec, container = ctx[name]["spec"], ctx[name]["container"]
        graceful = float(ctx[name]["env"].get("MODSERVE_GRACEFUL_TIMEOUT", DEFAULT_GRACEFUL))
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        # the kubelet's grace period counts from the start of preStop
        assert spec["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + graceful + 5, name


def test_image_build_context_and_secrets() -> None:
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore starts by excluding everything"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for word, rest in dockerfile_instructions():
        if word == "COPY":
            copied.update(a.rstrip("/") for a in shlex.split(rest)[:-1] if not a.startswith("--"))
    assert copied and copied <= allowed, f"COPY sources {sorted(copied - allowed)} excluded by .dockerignore"
    assert not {"models_store", "tests", ".venv", "deploy"} & allowed
    user = dockerfile_one("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, "numeric non-root USER (Kubernetes runAsNonRoot checks it)"
    # One Dockerfile, two images: FROM is the BASE_IMAGE build argument, whose default (the GPU image's
    # base) must be the pinned official image; the CPU image passes another (tests/deploy/test_container.py).
    assert dockerfile_one("FROM") == "${BASE_IMAGE}"
    args = dict(rest.split("=", 1) for word, rest in dockerfile_instructions() if word == "ARG" and "=" in rest)
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime(@sha256:[0-9a-f]{64})?",
                        args["BASE_IMAGE"]), "pinned official PyTorch CUDA runtime image"
    # the token file is read by compose but never committed; only the example is
    tracked = subprocess.run(["git", "ls-files", "deploy"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert "deploy/modserve.env" not in tracked
    example = (ROOT / "deploy" / "modserve.env.example").read_text()
    assert not re.search(r"^\s*MODSERVE_ADMIN_TOKEN=", example, re.M), "the example sets no token"


def test_nothing_is_downloaded_at_run_time() -> None:
    """Architectures are built with weights=None; no hub, no URL loading anywhere in the service."""
    pattern = re.compile(r"torch\.hub|load_state_dict_from_url|hf_hub_download|from_pretrained|urlretrieve")
    hits = [f"{p.relative_to(ROOT)}" for p in (ROOT / "app").rglob("*.py") if pattern.search(p.read_text())]
    assert not hits, f"run-time downloads in {hits}"


# --------------------------------------------------------------------------- the container command, run here

@pytest.mark.e2e
def test_container_command_serves_and_its_healthcheck_passes(tmp_path: Path) -> None:
    """The image's CMD with the image's environment (store and port moved, CPU), then its HEALTHCHECK."""
    from support.models import write_small_store
    from support.server import free_port, run_server

    store = write_small_store(tmp_path / "store", names=["unet"])
    port = free_port()
    env = {**dockerfile_env(), "MODSERVE_STORE": str(store), "MODSERVE_PORT": str(port),
           "MODSERVE_DEVICE": "cpu", "MODSERVE_WARMUP": "false"}
    argv = dockerfile_cmd()
    assert argv[0] == "python3"
    check = dockerfile_healthcheck()
    assert check[0] == "python3"

    def healthcheck() -> int:
        return subprocess.run([sys.executable, *check[1:]], env={**os.environ, "MODSERVE_PORT": str(port)},
                              capture_output=True, timeout=10).returncode

    with run_server(argv[1:], env=env, port=port, log_dir=tmp_path, ready_path="/v2/health/ready") as srv:
        assert healthcheck() == 0
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=60) == 0
        stopped_in = time.monotonic() - started
    assert stopped_in < float(env["MODSERVE_GRACEFUL_TIMEOUT"]), "an idle server stops well within its grace"
    assert healthcheck() != 0, "the healthcheck fails when nothing answers"
    assert "writing the demo store" not in srv.output(), "--demo-if-empty leaves a store with models alone"
