"""One local Ray per test session, bound to 127.0.0.1; tests that need it ask for `ray_cluster`."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# pytest's own process (sampling, exported-model checks) computes on one thread, as a Serve
# replica does: on 2 cores Ray's workers run beside it, and oversubscribed threads crawl.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        # Logical CPUs above the 2 physical cores: 2 training workers plus Serve replicas fit at once.
        ray.init(num_cpus=4, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", log_to_driver=True)
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture()
def storage(tmp_path):
    path = tmp_path / "runs"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def digits_run(ray_cluster, tmp_path_factory):
    """The README's main job (jobs/cnn_digits.yaml) trained once per session, and its export."""
    from dlray.config import load_config
    from dlray.export import export
    from dlray.train import fit, run_dir

    storage = tmp_path_factory.mktemp("digits")
    cfg = load_config(REPO / "jobs/cnn_digits.yaml", [f"run.storage_path={storage}", "run.name=digits"])
    result = fit(cfg)
    assert result.error is None, result.error
    artifact = export(run_dir(cfg), storage / "artifact")
    return cfg, result, run_dir(cfg), artifact


def wait_for_committed_checkpoint(run_dir, epoch: int, timeout_s: float = 300) -> None:
    """Block until Ray Train has committed the checkpoint of `epoch` (its controller lists it in
    checkpoint_manager_snapshot.json); a checkpoint still being uploaded is, rightly, not one to
    resume from, so failures injected earlier would restart from scratch."""
    import time

    snapshot, name = Path(run_dir) / "checkpoint_manager_snapshot.json", f"checkpoint_epoch{epoch:04d}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if snapshot.exists() and name in snapshot.read_text():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{name} was not committed within {timeout_s} s")
