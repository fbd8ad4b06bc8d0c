"""One local Ray per test session, bound to 127.0.0.1; tests that need it ask for `ray_cluster`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import KILLED_AFTER_STEP, KILLED_RUN_TRAINING, REPO, SECRET, kill_a_worker_once_committed, ray_train_worker_pids, validations_after_losing_a_worker

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed compiles its CPU shared-memory collectives (deepspeed_shm_comm) on first use, into one directory per
# user by default: two virtual environments (the checkout's and a fresh clone's, as CI makes one) then rebuild
# it in turn, ~1 min each time. One directory per environment; `make install` builds it there.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# As dlray.local_cluster.init_ray does for a local Ray: the Train controller polls workers for reports every
# 0.25 s instead of 2 s, so the tests' sub-second epochs do not each wait for the next poll.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Also as init_ray does: Ray Data's task workers live from one epoch to the next (Ray ends an idle one after 1 s).
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "60000")
# And as init_ray does: no preemption watcher, an actor process Ray Train starts with every worker group (each run,
# each restart) to watch for drained nodes, of which a local Ray has none (its start only logs a core_worker error).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# pytest's own process (sampling, exported-model checks) computes on one thread, as a Serve
# replica does: on 2 cores Ray's workers run beside it, and oversubscribed threads crawl.
torch.set_num_threads(1)


def pytest_collection_finish(session):
    """The GPU tier fails where it cannot run instead of skipping every test: a run that selected GPU
    tests only (`-m gpu`, `-m gpu_smoke`, tests/test_gpu.py) on a machine where torch sees no CUDA device,
    a CPU build of torch included (`torch==2.13.0` also matches `2.13.0+cpu`). A selection with other
    tests (plain `pytest`, `make test`) still skips them on a CPU."""
    items = session.items
    if session.config.option.collectonly or not items or not all(item.get_closest_marker("gpu") for item in items):
        return
    if torch.version.cuda is None or not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        pytest.exit(f"the GPU tier selected {len(items)} GPU tests, but torch {torch.__version__} ({build}) sees no CUDA device: "
                    "they would all be skipped. Run them where `python -c 'import torch; print(torch.cuda.is_available())'` prints True",
                    returncode=pytest.ExitCode.TESTS_FAILED)


# torch.nn.init's functions as torch defines them. transformers' and diffusers' no_init_weights swap them for
# no-ops while a model loads; one left swapped leaves every model built later in this process uninitialised
# (garbage weights, NaN losses), failing whichever test comes next in the session, never the test alone.
TORCH_INIT = {name: function for name, function in vars(torch.nn.init).items() if name.endswith("_") and callable(function)}


@pytest.fixture(autouse=True)
def torch_init_left_as_it_was():
    """Fails (at teardown) the test after which torch.nn.init's functions are not torch's own: the one that left them swapped."""
    yield
    swapped = sorted(name for name, function in TORCH_INIT.items() if getattr(torch.nn.init, name) is not function)
    assert not swapped, f"torch.nn.init.{', '.join(swapped)} left swapped for {getattr(torch.nn.init, swapped[0])!r}"


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


@pytest.fixture(scope="session")
def killed_worker_run(ray_cluster, tmp_path_factory):
    """One run that loses a worker, for test_train (it resumes to the uninterrupted run's numbers) and
    test_tracking (one MLflow run and one W&B run through the restart, no credentials anywhere):
    `dlray train --verbose` of the debug CNN, streamed, with MLflow and W&B (offline) on, one of its workers killed
    once a checkpoint mid-epoch 1 is committed, then `dlray export` of the run. The CLI joins the session's Ray
    from a shell whose MLFLOW_TRACKING_URI (a store only it names) and W&B key reach the Train controller
    through the runtime env alone: the session's Ray processes were started without them. --verbose: Ray's own
lines are back (test_console), and no credential is in them either (test_tracking)."""
    from dlray.config import load_config
    from dlray.runfiles import read_history
    from dlray.train import run_dir

    job = REPO / "jobs/debug/cnn_cpu.yaml"
    storage = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{storage}/elsewhere/mlflow.db"
    (storage / "elsewhere").mkdir()
    overrides = [f"run.storage_path={storage}", "run.name=tracked", *KILLED_RUN_TRAINING, "data.streaming=true", "run.max_failures=1",
                 "tracking.mlflow.experiment_name=tracked", "tracking.wandb.mode=offline"]
    cfg = load_config(job, overrides)
    env = os.environ | {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": uri, "WANDB_API_KEY": SECRET}
    lingering = set(ray_train_worker_pids())
    process = subprocess.Popen([sys.executable, "-m", "dlray.cli", "train", "--verbose", str(job), *overrides], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    committed = kill_a_worker_once_committed(run_dir(cfg), lingering, KILLED_AFTER_STEP)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    exported = subprocess.run([sys.executable, "-m", "dlray.cli", "export", run_dir(cfg), str(storage / "artifact")], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    return {"cfg": cfg, "storage": storage, "uri": uri, "run_dir": run_dir(cfg), "output": output + exported.stdout + exported.stderr,
            "history": read_history(run_dir(cfg)), "epochs": validations_after_losing_a_worker(run_dir(cfg), committed)}


@pytest.fixture(scope="session")
def serve_port(ray_cluster):
    """The port of the session's Serve: one free port, so that modules serving artifacts share one Serve."""
    from dlray.local_cluster import free_port

    return free_port()


@pytest.fixture(scope="module")
def serve_artifact(serve_port):
    """serve_artifact(artifact, name=None, **serve_keys) -> its base URL: the artifact's endpoint, built by
    dlray.serve.app.build_app (as `serve run` and `serve deploy` build it) with these `serve:` keys, served
    as the Serve app `name` (default: the artifact directory's name) under /<name> on the session's Serve.
    The module's apps are deleted when it ends; Serve goes on for the next module."""
    from ray import serve

    from dlray.serve.app import ServeAddressError, build_app, check_serve_address

    try:
        check_serve_address("127.0.0.1", serve_port)
    except ServeAddressError:  # a module before this one started Serve elsewhere (`dlray serve`'s own tests)
        serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    names = []

    def deploy(artifact, name: str | None = None, **serve_keys) -> str:
        name = name or Path(artifact).name
        serve.run(build_app({"artifact": str(artifact), **serve_keys}), name=name, route_prefix=f"/{name}")
        names.append(name)
        return f"http://127.0.0.1:{serve_port}/{name}"

    yield deploy
    from ray.serve.exceptions import RayServeException

    try:
        running = serve.status().applications
    except RayServeException:  # a test shut Serve down: nothing is left to delete
        return
    for name in names:
        if name in running:  # not deleted by its test already
            serve.delete(name)
