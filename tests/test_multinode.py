"""Multi-node behaviour with several real Ray nodes on this host (see multinode_scenarios.py)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multinode]


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    """Every scenario's results, run once on one cluster."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_ADDRESS": ""}
    storage = tmp_path_factory.mktemp("multinode")
    done = subprocess.run([sys.executable, str(REPO / "tests/multinode_scenarios.py"), str(storage)], env=env, capture_output=True, text=True, timeout=1200)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_spread_ranks_land_on_two_nodes_and_match_the_single_node_run(scenarios):
    result = scenarios["placement"]
    single, spread = result["single"], result["spread"]
    assert {r["num_nodes"] for r in single} == {1}
    assert {r["num_nodes"] for r in spread} == {2}, "SPREAD put both ranks on one node"
    for a, b in zip(single, spread):  # same seed, same data order: crossing nodes changes nothing
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=1e-6)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert spread[-1]["val_accuracy"] > 0.5
    # The probe behind the shared-storage check really asks every node: a file none has is unseen by all.
    assert len(result["unseen_marker_nodes"]) == 4  # head + 3 worker nodes


def test_losing_a_training_node_resumes_from_the_last_checkpoint_and_preprocessing_stays_on_the_cpu_node(scenarios):
    result = scenarios["node-loss"]
    assert result["error"] is None, result["error"]
    history = result["epochs"]
    assert [r["epoch"] for r in history] == list(range(3))
    # The node went once epoch 0's checkpoint was committed: the run went on from it (or a later one), not from scratch.
    resumed = [r for r in history if r["resumed_from_step"] > 0]
    assert resumed and resumed[0]["resumed_from_step"] >= history[0]["global_step"], history
    assert {r["num_nodes"] for r in history} == {2}
    # Streamed data: the training workers on the training nodes, the decode/resize tasks on the
    # CPU-only node (the training nodes' CPUs are the workers'), as Ray's task records place them.
    assert result["training"] == ["trainer"]
    assert result["preprocessing"] == ["cpu-only"], result


@pytest.mark.skipif(os.environ.get("DLRAY_PREEMPTION_SCENARIO") != "1", reason="opt-in (DLRAY_PREEMPTION_SCENARIO=1): see multinode_scenarios.SCENARIOS")
def test_a_node_drained_for_preemption_checkpoints_at_the_next_step_and_the_run_resumes_there(scenarios):
    result = scenarios["preemption"]
    # run.max_failures=0: the restart was charged to run.max_preemption_failures (a PreemptionError), or the run would have failed.
    assert result["error"] is None, result["error"]
    assert result["drained_node_was_draining"] and 0 < result["deadline_s"] <= 12, result
    saved = result["preemption_checkpoint"]
    assert saved["reason"].startswith("preemption of ranks [1] announced, deadline in "), saved
    # The signal reached the loop within a few step reports of the drain (Ray's watcher polls every 0.2 s here).
    assert 0 < saved["global_step"] - result["step_at_drain"] <= 5, result
    # The run resumed exactly there: lost only the steps trained between that checkpoint and the node's loss.
    assert result["resumed_at_step"] == saved["global_step"] and result["last_step_before_loss"] - saved["global_step"] <= 5, result
    assert not result["resumed_on_victim"] and result["resumed_num_nodes"] == 2, result
    history = result["epochs"]
    assert [r["epoch"] for r in history] == [0, 1, 2, 3] and history[-1]["resumed_from_step"] == saved["global_step"], history
    # Every validation reported once: epoch 0's before the drain, the others after the restart.
    assert result["validations"] == [r["global_step"] for r in history], result
