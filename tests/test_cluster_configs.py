"""Every Ray cluster-launcher config (cluster/*.yaml) is one `ray up` accepts, installs dlray, keeps
checkpoints on shared storage and turns token auth on; cluster/local.sh at least parses.

    .venv/bin/pytest tests/test_cluster_configs.py -q

Validation is Ray's own: the JSON schema shipped in the ray package, then the same
prepare_config + validate_config that `ray up` runs (no cloud calls, no cluster).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from dlray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "cluster").glob("*.yaml"))
SHARED = "/mnt/shared/"
LAUNCH = re.compile(r"dlray (train|tune) (\S+\.yaml)((?: \S+=\S+)*)")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def commands(config: dict, *keys: str) -> list[str]:
    out = [c for key in keys for c in config.get(key, [])]
    for node_type in config.get("available_node_types", {}).values():
        out += [c for key in keys for c in node_type.get(key, [])]
    return out


def test_configs_exist():
    assert {"aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_matches_rays_schema(path):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(load(path))]
    assert errors == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ray_up_accepts_it(path):
    # What `ray up` does before touching any cloud: merge the provider's defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(load(path))))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_installs_dlray_from_the_synced_repo(path):
    config = load(path)
    repo_mounts = [remote for remote, local in config["file_mounts"].items() if local in (".", "./")]
    assert repo_mounts, "file_mounts must sync this repository (`~/dlray: .`)"
    setup = commands(config, "setup_commands", "worker_setup_commands")
    assert any(re.search(rf"pip install\b.*-e {re.escape(m)}\b", c) for c in setup for m in repo_mounts), setup
    filters = config.get("rsync_filter", [])
    assert ".gitignore" in filters, "without it `ray up` would upload .venv/ and runs/"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_scales_between_bounds(path):
    config = load(path)
    if config["provider"]["type"] == "local":
        # On-prem has one implicit node type; its bound is the machine list.
        assert 1 <= config["max_workers"] <= len(config["provider"]["worker_ips"])
        return
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, "needs a GPU worker node type"
    for t in workers.values():
        assert 0 <= t["min_workers"] < t["max_workers"] <= config["max_workers"], t
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("CPU") == 0, "the head does no training"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_token_auth_on_every_node(path):
    config = load(path)
    text = path.read_text()
    assert "~/.ray/auth_token" in config["file_mounts"], "the token must reach every node from ~/.ray/auth_token"
    assert not re.search(r"RAY_AUTH_TOKEN\s*=\s*\S", text), "never a token in the config"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), f"{key}: every `ray start` needs RAY_AUTH_MODE=token"
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head, "the dashboard stays on the head's localhost"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shared_storage_holds_checkpoints(path):
    config = load(path)
    mounts = commands(config, "initialization_commands", "setup_commands")
    assert any("mount" in c and SHARED.rstrip("/") in c for c in mounts), "mount the shared volume on every node"
    launches = LAUNCH.findall(path.read_text())
    assert launches, "the header must show the `dlray train ...` launch command"
    for _verb, job, overrides in launches:
        cfg = load_config(REPO / job, shlex.split(overrides))
        assert cfg.run.storage_path.startswith(SHARED), f"{job}: pass run.storage_path={SHARED}..."


def test_local_script_parses_and_is_locked_down():
    script = REPO / "cluster" / "local.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "RAY_AUTH_MODE=token" in text and "get-auth-token" in text
    assert "0.0.0.0" not in text, "every Ray port stays on 127.0.0.1"
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "up [--workers N]" in usage.stdout
