"""Where dlray's Ray comes from: `init_ray` joins the cluster in RAY_ADDRESS or starts a local Ray
(dlray train, tune, serve); `local_cluster` runs a multi-node Ray cluster on this machine from Python: cluster/local.sh on free ports and a temp
dir of its own, so it never meets another Ray here. Used by `dlray bench cluster` and the tests.

    with local_cluster(worker_nodes=1, cpus_per_node=2) as cluster:
        subprocess.run([RAY, "job", "submit", "--address", cluster.dashboard, ...], env=cluster.client_env())
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class LocalCluster:
    env: dict[str, str]  # what local.sh ran with, no auth variables: a client given this is refused
    token: str
    dashboard: str

    def client_env(self) -> dict[str, str]:
        """Environment for a `ray job ...` client that the cluster accepts."""
        return {**self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}


@contextlib.contextmanager
def local_cluster(worker_nodes: int, cpus_per_node: int, port_base: int = 23000):
    # A short temp dir: Ray's socket paths must stay under the 107-character limit.
    temp_dir = tempfile.mkdtemp(prefix="dlray-ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "RAY_BIN": RAY, "DLRAY_RAY_TEMP_DIR": temp_dir, "DLRAY_NODE_CPUS": str(cpus_per_node), "DLRAY_RAY_PORT": str(free_port()),
        "DLRAY_DASHBOARD_PORT": str(free_port()), "DLRAY_CLIENT_PORT": str(free_port()), "DLRAY_PORT_BASE": str(port_base),
    }
    script = str(REPO / "cluster/local.sh")
    try:
        up = subprocess.run(["bash", script, "up", "--workers", str(worker_nodes)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        if up.returncode:
            raise RuntimeError(f"cluster/local.sh up failed:\n{up.stdout}\n{up.stderr}")
        token = subprocess.run([RAY, "get-auth-token"], env=env, capture_output=True, text=True, check=True).stdout.strip()
        yield LocalCluster(env, token, f"http://127.0.0.1:{env['DLRAY_DASHBOARD_PORT']}")
    finally:
        subprocess.run(["bash", script, "down"], cwd=REPO, env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_ray(verbose: bool = True) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local one bound to 127.0.0.1 (and say so).
    Not `verbose` (the CLI's default): Ray's INFO lines stay off in every process of this job.

    The tracking credentials of this environment (MLFLOW_*, WANDB_*) go to every process of the job in
    its runtime env: the Train controller logs to MLflow / W&B. A job from `ray job submit` has them
    from its own runtime env (--runtime-env-json), and Ray refuses the same variable set twice.
    """
    import ray
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from dlray import trackers
    from dlray.console import quiet_ray_logging

    if ray.is_initialized():
        return

    quiet = {} if verbose else quiet_ray_logging()
    env_vars = {} if RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ else trackers.tracking_env()
    if not verbose and "RAY_DATA_LOG_LEVEL" not in os.environ:  # Ray Data's INFO lines at each execution's start and end
        env_vars["RAY_DATA_LOG_LEVEL"] = "WARNING"
    runtime_env = {"env_vars": env_vars} if env_vars else None  # none at all otherwise: Ray's default workers, as before
    if os.environ.get("RAY_ADDRESS"):
        context = ray.init(runtime_env=runtime_env, **quiet)
    else:
        # Ray Train's controller takes one report per worker each time it polls them (every 2 s by
        # default), and a worker reporting again sooner waits: short epochs on a laptop lost up to
        # 2 s each (a 6-epoch debug run: 45 s, polled every 0.25 s: 27 s). The local raylet passes
        # the setting on to the controller it starts.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        # Ray Train's preemption watcher acts on nodes a cluster drains (spot reclaims); a local Ray has
        # none to drain, and the watcher's start only logs a core_worker error about its arguments.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray ends a task worker idle for 1 s while a node runs more workers than it has CPUs, which a
        # laptop always does (the Train controller, the workers, the splits' coordinators). Streamed
        # data's tasks then got a new worker each epoch, whose first task imports torch: a ~2 s stall
        # mid-epoch (a 0.6 s digits epoch took 2.7). A minute keeps them from one epoch to the next.
        os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "60000")
        # One logical CPU more than the cores: streamed data's preprocessing tasks need a CPU
        # while the training workers hold one each, and a laptop has no CPU node to run them on.
        context = ray.init(num_cpus=(os.cpu_count() or 1) + 1, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", runtime_env=runtime_env, **quiet)
    if not verbose:
        resources = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        gpus = f", {resources['GPU']:.0f} GPUs" if resources.get("GPU") else ""
        where = f"Ray at {os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS") else "a local Ray on 127.0.0.1"
        print(f"[dlray] {where}: {nodes} node(s), {resources.get('CPU', 0):.0f} CPUs{gpus}; dashboard {context.dashboard_url or 'off'}", flush=True)
