"""`dlray serve` as a user runs it, against the session's Ray: it refuses a port other than the one
Serve already listens on, and once the app is up it prints every route and a curl command that works."""

import os
import shlex
import signal
import subprocess
import sys

import httpx
import pytest
from typer.testing import CliRunner

from dlray.cli import app
from dlray.local_cluster import free_port

from helpers import REPO, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def port(ray_cluster):
    from ray import serve

    serve.shutdown()  # Serve keeps the port it first started on; this module picks its own
    yield free_port()
    serve.shutdown()


def test_serve_refuses_a_port_other_than_the_one_serve_listens_on(digits_run, port):
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    asked = free_port()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner().invoke(app, ["serve", str(digits_run[3]), f"port={asked}"])
    finally:
        signal.signal(signal.SIGTERM, previous)  # the command makes SIGTERM stop it as Ctrl-C does
    assert result.exit_code == 2, result.output
    assert f"Serve already listens on 127.0.0.1:{port}" in result.stderr and f"not on 127.0.0.1:{asked} as asked" in result.stderr
    assert f"with port={port}" in result.stderr and "serve shutdown" in result.stderr


def test_serve_prints_its_routes_and_a_curl_command_that_works(digits_run, port, tmp_path):
    import ray

    artifact, out = digits_run[3], tmp_path / "stdout"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # the session's Ray, where the fixture put Serve
    with open(out, "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "dlray.cli", "serve", str(artifact), f"port={port}"], cwd=REPO, env=env, stdout=stdout, stderr=stderr)
    try:
        wait_for(lambda: "curl" in out.read_text() or process.poll() is not None, 120, lambda: f"dlray serve printed its example or ended: {out.read_text()}", 0.2)
        printed = out.read_text().splitlines()
        assert printed[-2] == "example:", out.read_text() + (tmp_path / "stderr").read_text()[-4000:]
        base = f"http://127.0.0.1:{port}"
        assert printed[0].startswith("[dlray] Ray at ") and printed[1] == f"starting {artifact}" and printed[2] == f"serving {artifact}; Ctrl-C to stop"
        routes = printed[3:-2]
        assert routes == [f"  GET  {base}/healthz", f"  POST {base}/v1/classify", f"  GET  {base}/docs", f"  GET  {base}/openapi.json"]
        for line in routes:
            method, url = line.split()
            if method == "GET":
                assert httpx.get(url).status_code == 200, url

        curl = shlex.split(printed[-1])
        assert curl[:3] == ["curl", "-s", f"{base}/v1/classify"]
        headers = dict(curl[i + 1].split(": ", 1) for i, word in enumerate(curl) if word == "-H")
        response = httpx.post(curl[2], content=curl[curl.index("-d") + 1], headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["label"] in map(str, range(10))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
