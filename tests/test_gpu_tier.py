"""The GPU tier (tests/test_gpu.py) cannot pass by skipping: run alone on a machine where torch sees
no CUDA device it fails, while a run of it with other tests (`make test` on a CPU) skips it; and it
collects without the dev extras. Two pytest runs in one subprocess (the second reuses the first's
imports; no Ray starts)."""

import subprocess
import sys

import pytest
import torch

from helpers import REPO

# pytest with the dev extras (pyproject's optional `dev` dependencies, but pytest) made unimportable;
# each argument is one pytest run's arguments, and each run's exit code is printed after its output.
WITHOUT_DEV_EXTRAS = """
import importlib.abc, shlex, sys

class NoDevExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"openai", "schemathesis", "ruff", "mypy", "lm_eval"}:
            raise ModuleNotFoundError(f"No module named {name!r} (a dev extra: hidden)", name=name)

sys.meta_path.insert(0, NoDevExtras())
import pytest
for args in sys.argv[1:]:
    print(f"exit code {int(pytest.main(['-p', 'no:cacheprovider', '-q', *shlex.split(args)]))}", flush=True)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a CUDA device runs the GPU tier itself")
def test_the_gpu_tier_alone_fails_without_a_cuda_device_and_among_other_tests_is_skipped():
    alone = "tests/test_gpu.py -m gpu_smoke"
    among_others = "tests/test_gpu.py::test_precision_auto_on_the_gpu_and_the_peak_of_an_h100_or_h200 tests/test_gpu_jobs.py::test_the_gpu_jobs_are_there"
    result = subprocess.run([sys.executable, "-c", WITHOUT_DEV_EXTRAS, alone, among_others], cwd=REPO, capture_output=True, text=True, timeout=300)
    first, _, second = result.stdout.partition(f"exit code {int(pytest.ExitCode.TESTS_FAILED)}\n")
    # TESTS_FAILED, not INTERRUPTED as a collection error (a missing import) would leave it: the module collected.
    assert second, result.stdout + result.stderr
    assert "GPU tests, but torch" in first and "sees no CUDA device: they would all be skipped" in first, first
    assert "1 passed, 1 skipped" in second and second.endswith(f"exit code {int(pytest.ExitCode.OK)}\n"), second
