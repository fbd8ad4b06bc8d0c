"""A CUDA out-of-memory error explained (dlray.oom): the message path on CPU (the error raised by hand, as the
allocator raises it), and on a GPU a real one with the allocator's snapshot written under the run directory."""

import pickle

import pytest
import torch

from dlray.config import load_config
from dlray.oom import OutOfMemory, explained, record_history
from dlray.plan import gib, plan

from helpers import REPO


def test_a_cuda_oom_names_the_step_the_rank_the_plan_and_what_would_fit(tmp_path):
    cfg = load_config(REPO / "jobs/debug/gpt_cpu.yaml", [f"run.storage_path={tmp_path}", "run.name=oom"])
    with pytest.raises(OutOfMemory) as error:
        with explained(cfg, 7, 1, torch.device("cpu")):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    text = str(error.value)
    assert "\n" not in text, "the console shows an error's last line"
    assert text.startswith("CUDA out of memory at step 7 on rank 1: ") and f"the plan (dlray plan) expected {gib(plan(cfg).total_bytes)} per device" in text
    assert "activations " in text and "To fit: strategy.name=fsdp (" in text and "train.micro_batch_size=8 train.gradient_accumulation_steps=2 (" in text
    assert isinstance(error.value.__cause__, torch.cuda.OutOfMemoryError)
    assert not (tmp_path / "oom").exists(), "no allocator snapshot off a GPU"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_cuda_oom_writes_the_allocators_snapshot(tmp_path):
    cfg = load_config(REPO / "jobs/debug/gpt_cpu.yaml", [f"run.storage_path={tmp_path}", "run.name=oom", "scaling.use_gpu=true", "scaling.num_workers=1"])
    device = torch.device("cuda", 0)
    record_history(device)
    try:
        with pytest.raises(OutOfMemory) as error:
            with explained(cfg, 3, 0, device):
                kept = torch.empty(1 << 20, device=device)  # noqa: F841  (in the snapshot)
                torch.empty(2 * torch.cuda.get_device_properties(device).total_memory, dtype=torch.uint8, device=device)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    text = str(error.value)
    assert "at step 3 on rank 0: " in text and " allocated, " in text and " at the peak, of " in text
    snapshot = tmp_path / "oom/memory/oom-rank0-step3.pickle"
    assert f"the allocator's history: {snapshot}" in text
    assert pickle.loads(snapshot.read_bytes())["segments"], "the snapshot holds the allocator's segments"
