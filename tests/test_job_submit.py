"""`ray job submit` of a dlray job to a local multi-node cluster (cluster/local.sh) with token auth."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO
from dlray.tracking import read_history

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def local_cluster():
    # A short temp dir: Ray's socket paths must stay under the 107-character limit.
    temp_dir = tempfile.mkdtemp(prefix="dlray-ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "RAY_BIN": RAY, "DLRAY_RAY_TEMP_DIR": temp_dir, "DLRAY_NODE_CPUS": "1", "DLRAY_RAY_PORT": str(free_port()),
        "DLRAY_DASHBOARD_PORT": str(free_port()), "DLRAY_CLIENT_PORT": str(free_port()), "DLRAY_PORT_BASE": "23000",
    }
    up = subprocess.run(["bash", "cluster/local.sh", "up", "--workers", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        token = subprocess.run([RAY, "get-auth-token"], env=env, capture_output=True, text=True, check=True).stdout.strip()
        yield {"env": env, "token": token, "dashboard": f"http://127.0.0.1:{env['DLRAY_DASHBOARD_PORT']}"}
    finally:
        subprocess.run(["bash", "cluster/local.sh", "down"], cwd=REPO, env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(cluster, storage, client_env):
    command = [RAY, "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO), "--",
               "dlray", "train", "jobs/debug/cnn_cpu.yaml", "train.num_epochs=2", f"run.storage_path={storage}", "run.name=submitted",
               "scaling.placement_strategy=SPREAD"]
    return subprocess.run(command, cwd=REPO, env={**cluster["env"], **client_env}, capture_output=True, text=True, timeout=600)


def test_job_submit_with_token_trains_across_nodes(local_cluster, storage):
    done = submit(local_cluster, storage, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": local_cluster["token"]})
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-4000:] + done.stderr[-4000:]
    history = read_history(storage / "submitted")
    assert history[-1]["test_accuracy"] > 0.3 and history[0]["num_nodes"] == 2


# With no token the client sends none and the cluster answers 401; a wrong one gets 403.
@pytest.mark.parametrize(
    "client_env, refusal",
    [({}, "Missing authentication token"), ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}, "Invalid authentication token")],
    ids=["no-token", "wrong-token"],
)
def test_job_submit_without_the_token_is_refused(local_cluster, storage, client_env, refusal, tmp_path):
    # HOME elsewhere, so the client cannot fall back on this machine's ~/.ray/auth_token.
    refused = submit(local_cluster, storage, {**client_env, "HOME": str(tmp_path)})
    assert refused.returncode != 0
    assert refusal in refused.stdout + refused.stderr, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert not (storage / "submitted").exists(), "a refused job must not run"
