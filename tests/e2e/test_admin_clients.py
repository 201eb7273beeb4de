"""The official tritonclient drives the admin API of a real server, token passed as a header."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from app.store.writer import write_model
from support.models import build_small, small_configs
from support.server import free_port, run_server

pytestmark = pytest.mark.e2e
TOKEN = "e2e-admin-token-0123456789"


def test_tritonclient_load_unload_and_index(tmp_path: Path) -> None:
    store = tmp_path / "store"
    for v in (1, 2):
        write_model(store, "seg", small_configs()["unet"], build_small("unet", seed=v).state_dict(), version=str(v))
    port = free_port()
    env = {"MODSERVE_ADMIN_TOKEN": TOKEN}
    with run_server(["-m", "app", "--store", str(store), "--port", str(port)], env=env, port=port,
                    log_dir=tmp_path, ready_path="/v2/health/ready") as srv:
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        index = client.get_model_repository_index(headers=auth)
        assert [(m["name"], m["version"], m["state"]) for m in index] == [("seg", "2", "READY")]
        client.unload_model("seg", headers=auth)
        assert not client.is_model_ready("seg")
        assert client.is_server_ready()  # unloaded on purpose
        client.load_model("seg", headers=auth)
        assert client.is_model_ready("seg")
        with pytest.raises(InferenceServerException) as info:
            client.load_model("seg", headers={"Authorization": "Bearer wrong"})
        assert "401" in str(info.value.status()) or "token" in str(info.value).lower()
        # a config or files the server would not apply are refused, not silently ignored
        with pytest.raises(InferenceServerException) as info:
            client.load_model("seg", headers=auth, config=json.dumps({"max_batch_size": 2}))
        assert "400" in str(info.value.status()) and "model.toml" in str(info.value)
        with pytest.raises(InferenceServerException) as info:
            client.load_model("seg", headers=auth, config="{}", files={"file:1/model.pt": b"x"})
        assert "400" in str(info.value.status())
        client.unload_model("seg", headers=auth, unload_dependents=True)
        client.load_model("seg", headers=auth)
        client.close()
    log = srv.output()
    assert TOKEN not in log
    audit = [json.loads(json.loads(line)["message"]) for line in log.splitlines()
             if line.startswith("{") and json.loads(line)["logger"] == "modserve.audit"]
    assert [(a["action"], a["result"].split(" ")[0]) for a in audit] == [
        ("unload", "ok"), ("load", "ok"), ("POST /v2/repository/models/seg/load", "denied"),
        ("unload", "ok"), ("load", "ok")]
