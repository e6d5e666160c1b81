"""conftest's gpu_hang_guard, run on the CPU: a GPU test past its limit ends the run with its
stack on the terminal's stderr; other tests are not timed."""
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# The project's conftest under another name (this one is "conftest" too), its guard's two parts.
CONFTEST = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("project_conftest", {str(TESTS / "conftest.py")!r})
project = importlib.util.module_from_spec(spec)
spec.loader.exec_module(project)
pytest_configure = project.pytest_configure
gpu_hang_guard = project.gpu_hang_guard
"""

CASES = """
import time
import pytest


def test_cpu_runs_past_the_limit():
    time.sleep(3)


@pytest.mark.gpu
@pytest.mark.vllm
def test_vllm_runs_past_the_limit():
    time.sleep(3)


@pytest.mark.gpu
def test_gpu_in_time():
    pass


@pytest.mark.gpu
def test_gpu_hangs():
    time.sleep(120)


@pytest.mark.gpu
def test_gpu_after_the_hang():
    pass
"""


def test_a_hung_gpu_test_ends_the_run_with_its_stack(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_cases.py").write_text(CASES)
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                          "-W", "ignore::pytest.PytestUnknownMarkWarning", "test_cases.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=100,
                         env={"QQQ_GPU_TEST_LIMIT_S": "2", "PATH": "/usr/bin:/bin"})
    elapsed = time.monotonic() - start
    assert run.returncode == 1, run.stdout + run.stderr
    assert elapsed < 60  # not the hung test's 120 s
    assert "Timeout (0:00:02)" in run.stderr
    assert "in test_gpu_hangs" in run.stderr
    for name in ("cpu_runs_past_the_limit", "vllm_runs_past_the_limit", "gpu_in_time"):
        assert f"test_{name} PASSED" in run.stdout
    assert "test_gpu_after_the_hang" not in run.stdout
