"""schemathesis against the service's own OpenAPI schema, with and without the admin token.

Bounded (a fixed seed and a few examples per operation) so CI stays fast. With the
token only the admin operations are fuzzed: an unload is a legitimate admin action
after which inference answers 503, which is not a server fault.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support.models import write_small_store
from support.server import free_port, run_server

pytestmark = pytest.mark.e2e
TOKEN = "fuzz-admin-token-0123456789"
CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance"


def _schemathesis(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json",
        "--checks", CHECKS, "--max-examples", "8", "--seed", "20261126",
        "--phases", "examples,coverage,fuzzing", "--workers", "1", *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=420)


def test_schemathesis_finds_no_server_errors(tmp_path: Path) -> None:
    store = write_small_store(tmp_path / "store", ["unet", "resnet50_extra", "resnet50_dual"])
    port = free_port()
    env = {"MODSERVE_ADMIN_TOKEN": TOKEN, "MODSERVE_WARMUP": "false"}
    with run_server(["-m", "app", "--store", str(store), "--port", str(port)], env=env, port=port,
                    log_dir=tmp_path, ready_path="/v2/health/ready") as srv:
        anonymous = _schemathesis(srv.url)
        assert anonymous.returncode == 0, anonymous.stdout[-6000:]
        admin = _schemathesis(srv.url, "-H", f"Authorization: Bearer {TOKEN}",
                              "--include-path-regex", "^/(admin|v2/repository)/")
        assert admin.returncode == 0, admin.stdout[-6000:]
        assert "No issues found" in anonymous.stdout or "passed" in anonymous.stdout
    assert "Traceback" not in srv.output(), srv.output()[-4000:]
