"""scripts/gpu_run.sh's time limit (GPU_CALL_S), on the CPU with stand-ins for the GPU
machine's commands: a step that overruns is stopped and keeps what it wrote, a step that would
not fit is skipped, the steps before are not lost."""
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# python3 that writes a line and then hangs (a bench that never ends); nvidia-smi of an H100.
FAKE_PYTHON = "#!/bin/sh\necho 'first rows'\nexec sleep 60\n"
FAKE_SMI = "#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 580.0, 81559 MiB'\n"


def make_machine(tmp_path):
    root = tmp_path / "tree"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gpu_run.sh", root / "scripts" / "gpu_run.sh")
    (root / ".gpu").mkdir()
    (root / ".gpu" / "setup.sh").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", FAKE_PYTHON), ("nvidia-smi", FAKE_SMI)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return root, bin_dir


def run(root, bin_dir, out, steps, **env):
    start = time.monotonic()
    done = subprocess.run(["bash", str(root / "scripts" / "gpu_run.sh"), *steps],
                          capture_output=True, text=True, timeout=50,
                          env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), **env})
    return done, time.monotonic() - start


def test_an_overrunning_step_is_stopped_and_one_that_does_not_fit_skipped(tmp_path):
    root, bin_dir = make_machine(tmp_path)
    out = tmp_path / "out"
    done, elapsed = run(root, bin_dir, out, ["test", "bench", "sanitize"],
                        GPU_CALL_S="6", GPU_STEP_S="bench=3 sanitize=3")
    log = done.stdout
    assert done.returncode == 1, log + done.stderr
    assert elapsed < 20  # not the fake bench's 60 s
    assert log.count("device: NVIDIA H100") == 1
    assert "skipped: 6 s left, test usually takes 480 s" in log
    assert "stopped: bench ran past the 6 s left" in log
    assert "first rows" in (out / "bench_quick.log").read_text()  # kept after the stop
    # what is left after the stopped bench: about 0 s, a second either way on a loaded machine
    left = re.search(r"skipped: (-?\d+) s left, sanitize usually takes 3 s", log)
    assert left and -1 <= int(left.group(1)) <= 1, log


def test_without_a_limit_steps_run_in_the_script_itself(tmp_path):
    root, bin_dir = make_machine(tmp_path)
    done, _ = run(root, bin_dir, tmp_path / "out", ["nonsense", "test"])
    assert done.returncode == 2  # an unknown step ends the run, as before
    assert "unknown step nonsense" in done.stdout
    assert "=== test" not in done.stdout


def test_the_benches_know_every_name_the_script_passes_them():
    """Every implementation and shape gpu_run.sh hands bench_gemm.py / profile_gemm.py, and every
    format it hands bench_e2e.py, exists there (a renamed one would end a device call with a
    KeyError, maybe after minutes of other work), and both benches refuse an unknown name before
    they touch the GPU."""
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_gemm import IMPLS, SHAPES
    script = (ROOT / "scripts" / "gpu_run.sh").read_text()
    lists = re.findall(r"--impls (?:\$\{BENCH_IMPLS:-)?([\w,]+)", script)
    assert len(lists) == 3, lists  # bench, bench-all, bench-ab
    names = {name for names in lists for name in names.split(",")}
    ncu = re.search(r"NCU_RUNS:-([^}]*)\}", script).group(1).split()
    assert ncu
    for run in ncu:
        impl, shape, m, _ = run.split(":", 3)
        names.add(impl)
        assert shape in SHAPES and int(m) > 0, run
    assert names - set(IMPLS) == set(), names - set(IMPLS)
    from bench_e2e import FORMATS, split_variants
    formats = [f for found in re.findall(r'--formats "?(?:\$\{E2E_FORMATS:-)?([\w,]+)', script)
               for f in found.split(",")]
    formats += re.findall(r"prepare (\w+)", script)
    formats += [run.split("+")[0] for run in
                re.search(r"PROFILE_FORMATS:-([^}]*)\}", script).group(1).split()]
    assert {"fp16", "w8a8", "w4a16", "qqq_channel", "qqq_g128"} <= set(formats), formats
    assert {split_variants(f)[0] for f in formats} <= set(FORMATS), formats
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gemm.py"), "--impls",
                           "qqq_channel,qqq_g128_int"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown --impls qqq_g128_int" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--workdir",
                           "unused", "--formats", "fp16,qqq_g128_int_pdl"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "unknown --formats qqq_g128_int_pdl" in done.stderr, \
        done.stderr
