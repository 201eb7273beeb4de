"""The image, built and run: scripts/container-check.sh, and what can be checked without running it.

Every run (fast): one Dockerfile makes both images, with only the base and the torch install as build
arguments; the compose CPU override passes exactly those; the user commands in deploy/README.md are the
ones the script runs (with ``docker`` for ``podman``); the script is valid bash.

The full build-and-run (marked ``container``, 3-8 minutes) runs scripts/container-check.sh, which builds
the CPU image with podman and runs it as the README says. When it runs:

- ``CONTAINER_CHECK=1``: always; ``CONTAINER_CHECK=0``: never;
- otherwise in CI (``CI`` set): always. It fits CI's time easily, and the image is made from app/ too, so
  any change (a new dependency, an import of a file .dockerignore leaves out) can break it;
- otherwise (a developer's run): when the files the image and the script are made of changed since the
  last successful check, i.e. their hash differs from scripts/container-check.stamp, which the script
  writes when every check passed (commit it with the change).

It needs root on Debian (apt-get, debootstrap, rootful podman): CI's machines are such; elsewhere it is
skipped, in CI it fails.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "container-check.sh"
STAMP = ROOT / "scripts" / "container-check.stamp"
DEPLOY_README = ROOT / "deploy" / "README.md"
OFFICIAL_GPU_BASE = r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime(@sha256:[0-9a-f]{64})?"
BUILD_ARGS = {"BASE_IMAGE", "TORCH_INSTALL"}


# --------------------------------------------------------------------------- reading the files

def logical_lines(text: str, comment: str = "#") -> list[str]:
    """Lines with backslash continuations joined; comment lines dropped."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith(comment) and not pending:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return [line for line in out if line]


def dockerfile() -> list[tuple[str, str]]:
    lines = logical_lines((ROOT / "Dockerfile").read_text())
    return [(w.upper(), rest.strip()) for w, _, rest in (line.partition(" ") for line in lines)]


def script_text() -> str:
    return SCRIPT.read_text()


def script_array(name: str) -> list[str]:
    match = re.search(rf"^{name}=\((.*?)\)", script_text(), re.M | re.S)
    assert match, f"{name}=(...) not found in {SCRIPT.name}"
    return shlex.split(match.group(1), comments=True)


def script_scalar(name: str) -> str:
    match = re.search(rf"^{name}=(\S+)", script_text(), re.M)
    assert match, f"{name}= not found in {SCRIPT.name}"
    return match.group(1)


def script_command(prefix: str) -> list[str]:
    """The first logical line of the script starting with `prefix`, split as the shell would (variables
    are left as their names)."""
    for line in logical_lines(script_text()):
        if line.startswith(prefix):
            return shlex.split(line.split(" >", 1)[0].split(" ||", 1)[0])
    raise AssertionError(f"no line starting with {prefix!r} in {SCRIPT.name}")


def readme_command(prefix: str, word: str | None = None) -> list[str]:
    """The first command of deploy/README.md's bash blocks that starts with `prefix` (and has `word`)."""
    for block in re.findall(r"```bash\n(.*?)```", DEPLOY_README.read_text(), re.S):
        for line in logical_lines(block):
            argv = shlex.split(line, comments=True)
            if line.startswith(prefix) and (word is None or word in argv):
                return argv
    raise AssertionError(f"no `{prefix} ...` command in deploy/README.md")


def options(argv: list[str], with_value: set[str]) -> dict[str, list[str]]:
    """Option -> values (in order) of a docker/podman command line; flags get an empty string."""
    out: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            name, eq, value = arg.partition("=")
            if not eq and name in with_value:
                i += 1
                value = argv[i]
            out.setdefault(name, []).append(value)
        i += 1
    return out


class ComposeLoader(yaml.SafeLoader):
    """PyYAML with Compose's `!reset` tag (the value is dropped, as Compose does)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def compose_file(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)


def files_hash() -> str:
    """What the script writes to the stamp: sha256 of the STAMPED files, concatenated in order."""
    digest = hashlib.sha256()
    for name in script_array("STAMPED"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- fast checks (every run)

def test_one_dockerfile_two_bases() -> None:
    instructions = dockerfile()
    words = [w for w, _ in instructions]
    assert words.count("FROM") == 1 and instructions[words.index("FROM")][1] == "${BASE_IMAGE}"
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] if "=" in rest else None
            for w, rest in instructions if w == "ARG"}
    assert set(args) == BUILD_ARGS, "the base and the torch install are the only build arguments"
    # the GPU image by default: the pinned official PyTorch CUDA runtime image, its torch untouched
    assert re.fullmatch(OFFICIAL_GPU_BASE, args["BASE_IMAGE"]), args["BASE_IMAGE"]
    assert args["TORCH_INSTALL"] in ('""', "''"), "TORCH_INSTALL must default to nothing (the GPU image)"
    # BASE_IMAGE before FROM (global), TORCH_INSTALL after it, used only by the torch install and the
    # CUDA check
    assert words.index("ARG") < words.index("FROM")
    uses = [rest for w, rest in instructions if "TORCH_INSTALL" in rest and w != "ARG"]
    assert len(uses) == 2 and "xargs python3 -m pip install" in uses[0] and "torch.version.cuda" in uses[1]


def test_compose_cpu_override_builds_the_cpu_image() -> None:
    base = compose_file("docker-compose.yml")["services"]["modserve"]
    cpu = compose_file("docker-compose.cpu.yml")["services"]["modserve"]
    assert cpu["image"] == f"{base['image']}-cpu" == script_scalar("IMAGE")
    assert set(cpu["build"]["args"]) == BUILD_ARGS
    # the defaults: PyPI's torch, the versions the script builds and checks
    torch_default = re.fullmatch(r"\$\{CPU_TORCH_INSTALL:-(.*)\}", cpu["build"]["args"]["TORCH_INSTALL"])
    assert torch_default and torch_default.group(1).split() == script_array("TORCH_PINS")
    assert re.fullmatch(r"\$\{CPU_BASE_IMAGE:-[^}]+\}", cpu["build"]["args"]["BASE_IMAGE"])
    assert cpu["environment"]["MODSERVE_DEVICE"] == "cpu"
    assert base["stop_grace_period"] == f"{script_scalar('GRACE')}s"


def test_readme_commands_are_the_scripts() -> None:
    """The `docker build` and `docker run` lines of deploy/README.md and the script's podman ones: the
    same options with the same fixed values (names, ports and paths are the script's own)."""
    with_value = {"-t", "--build-arg", "--name", "--stop-timeout", "-p", "-v", "--env-file", "--tmpfs",
                  "--cap-drop", "--security-opt", "--format", "--network"}
    # run
    cpu_image = script_scalar("IMAGE")
    user = options(readme_command("docker run ", cpu_image), with_value)
    ours = options(script_command("pm_show run "), with_value)
    assert set(user) == set(ours), f"README {sorted(user)} vs script {sorted(ours)}"
    for fixed in ("--stop-timeout", "--read-only", "--tmpfs", "--cap-drop", "--security-opt"):
        expected = ["$GRACE"] if fixed == "--stop-timeout" else user[fixed]
        assert ours[fixed] == expected, fixed
    assert user["--stop-timeout"] == [script_scalar("GRACE")]
    (published,) = user["-p"]
    (ours_published,) = ours["-p"]
    assert published.startswith("127.0.0.1:") and published.endswith(":8000")
    assert ours_published.startswith("127.0.0.1:") and ours_published.endswith(":8000")
    assert [v.split(":", 1)[1] for v in user["-v"]] == [v.split(":", 1)[1] for v in ours["-v"]] == ["/models"]
    assert readme_command("docker run ", cpu_image)[-1] == cpu_image
    # build: the script adds only this machine's --format/--network/-v (see the script's header)
    user = options(readme_command("docker build ", cpu_image), with_value)
    ours = options(script_command("pm_show build "), with_value)
    assert set(ours) - set(user) == {"--format", "--network", "-v"}
    assert user["-t"] == [cpu_image] and ours["-t"] == ["$IMAGE"]
    assert sorted(a.split("=", 1)[0] for a in user["--build-arg"]) == sorted(BUILD_ARGS)
    assert sorted(a.split("=", 1)[0] for a in ours["--build-arg"]) == sorted(BUILD_ARGS)
    for command in ("docker volume create ", "docker stop ", "docker compose -f docker-compose.yml "):
        readme_command(command)  # each step the script takes is shown to users


def test_training_code_stays_out_of_the_image() -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for name in ("app/demo/train.py", "app/demo/data.py"):
        assert name in ignored
    # ... and nothing the service imports needs them (the script checks the image imports app.main)
    for path in (ROOT / "app").rglob("*.py"):
        if path.relative_to(ROOT).as_posix() in ("app/demo/train.py", "app/demo/data.py", "app/cli.py"):
            continue
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) app\.demo\.(train|data)\b", text, re.M), path


def test_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-x", str(SCRIPT)], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout


# --------------------------------------------------------------------------- the full build and run

def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no")


def full_check_wanted() -> tuple[bool, str]:
    forced = os.environ.get("CONTAINER_CHECK")
    if forced is not None and forced.strip() != "":
        return _truthy(forced), f"CONTAINER_CHECK={forced}"
    if _truthy(os.environ.get("CI")):
        return True, "CI runs it every time"
    stamp = STAMP.read_text().strip() if STAMP.is_file() else ""
    if stamp != files_hash():
        return True, "the image's files changed since scripts/container-check.stamp"
    return False, ("the image's files are unchanged since the last successful check "
                   "(scripts/container-check.stamp); CONTAINER_CHECK=1 runs it anyway")


def missing_prerequisites() -> str | None:
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root (rootful podman, debootstrap and apt-get need it)"
    if not (shutil.which("podman") or shutil.which("apt-get")):
        return "neither podman nor apt-get to install it"
    return None


@pytest.mark.container
def test_the_image_built_and_run(tmp_path: Path) -> None:
    wanted, why = full_check_wanted()
    if not wanted:
        pytest.skip(why)
    missing = missing_prerequisites()
    if missing:
        if _truthy(os.environ.get("CI")):
            pytest.fail(f"CI must run the container check, but: {missing}")
        pytest.skip(f"{why}, but {missing}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_", "CONTAINERS_"))}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3000, stdin=subprocess.DEVNULL)
    output = proc.stdout + proc.stderr
    (tmp_path / "container-check.log").write_text(output)
    assert proc.returncode == 0, f"scripts/container-check.sh failed ({why}):\n{output[-6000:]}"
    summary = output[output.rindex("== summary"):]
    assert re.search(r"checks\s+\d+ passed, 0 failed", summary), summary
    print(summary)
