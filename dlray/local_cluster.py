"""A multi-node Ray cluster on this machine from Python: cluster/local.sh on free ports and a temp
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
