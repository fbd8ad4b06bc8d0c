"""`ray job submit` of a dlray job to a local multi-node cluster (cluster/local.sh) with token auth."""

import subprocess

import pytest

from dlray.local_cluster import RAY
from dlray.local_cluster import local_cluster as start_local_cluster
from dlray.runfiles import read_history

from helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multinode]


@pytest.fixture(scope="module")
def local_cluster():
    with start_local_cluster(worker_nodes=1, cpus_per_node=1) as cluster:
        yield cluster


def submit(cluster, storage, client_env):
    command = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO), "--",
               "dlray", "train", "jobs/debug/cnn_cpu.yaml", "train.num_epochs=2", f"run.storage_path={storage}", "run.name=submitted",
               "scaling.placement_strategy=SPREAD", "train.log_every_n_steps=5", "run.progress_interval_s=0"]
    return subprocess.run(command, cwd=REPO, env={**cluster.env, **client_env}, capture_output=True, text=True, timeout=600)


def test_job_submit_with_token_trains_across_nodes(local_cluster, storage):
    done = submit(local_cluster, storage, local_cluster.client_env())
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-4000:] + done.stderr[-4000:]
    history = read_history(storage / "submitted")
    assert history[-1]["test_accuracy"] > 0.3 and history[0]["num_nodes"] == 2
    # The job's log is dlray's console: where the ranks run, step progress, epochs and a summary; none of
    # Ray Train's per-report lines (they come back with --verbose: test_console.py).
    log = done.stdout
    assert "TrainingReport(" not in log and "Checkpoint successfully created" not in log
    assert "[dlray] 2 workers on 2 node(s), cpu: " in log and "[dlray] epoch 1/2 step 5/40 | loss " in log  # step of the run's budget
    assert "[dlray] epoch 2/2 step 40/40 | train_loss " in log and "[dlray] finished in " in log and "next: dlray export " in log


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
