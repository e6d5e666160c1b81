"""The kernels launched early (programmatic dependent launch) read what the kernel before them
wrote only through coherent loads. A read-only load (ld.global.nc: __ldg, const __restrict__)
declares its data constant for the whole kernel, so ptxas may schedule it before the PDL wait;
it did for the narrow GEMM's token scales (csrc/common.cuh, load_produced). Checked in the PTX
nvcc makes for sm_90a: no ld.global.nc whose address derives from such a parameter. Runs where
nvcc is installed (this machine and CI), no GPU needed."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"

# Each kernel that waits for the grid before it, and the indices of its parameters that the
# grid before it writes (activations, token scales, residual).
PRODUCED_PARAMS = {
    "w4a8_narrow_kernel": (0, 1),
    "w4a8_gemm_kernel": (0, 1),
    "w4a8_gemm_wgmma_kernel": (0, 1),
    "quant_per_token_kernel": (0,),
    "add_rms_norm_quant_kernel": (0, 1),
    "silu_mul_quant_kernel": (0,),
}

REGISTER = re.compile(r"%[a-z]+\d+")


def kernel_name(entry: str) -> str:
    names = [name for name in PRODUCED_PARAMS if name in entry]
    return names[0] if names else ""


def read_only_loads_of_produced_data(ptx: str):
    """(kernel, instruction) of every ld.global.nc whose address derives from a produced
    parameter: a forward taint over the PTX's virtual registers (each written once)."""
    found, kernels = [], []
    for body in re.split(r"\n(?=(?:\.visible )?\.entry )", ptx)[1:]:
        entry = re.match(r"(?:\.visible )?\.entry (\S+)\(", body).group(1)
        if "griddepcontrol.wait" not in body:
            continue
        name = kernel_name(entry)
        kernels.append(name or entry)
        if not name:
            continue
        produced = {f"{entry}_param_{i}" for i in PRODUCED_PARAMS[name]}
        tainted = set()
        for line in body.split("\n"):
            statement = re.sub(r"^@!?%p\d+\s+", "", line.strip()).rstrip(";")
            parts = statement.split(None, 1)
            if len(parts) < 2:
                continue
            op, operands = parts
            if op.startswith("ld.param"):
                if any(p + "]" in operands for p in produced):
                    tainted.update(REGISTER.findall(operands.split(",")[0]))
                continue
            if operands.startswith("["):  # a store or a copy: no register written
                continue
            end = operands.index("}") + 1 if operands.startswith("{") else operands.find(",")
            written, read = (operands, "") if end < 0 else (operands[:end], operands[end:])
            read_tainted = bool(set(REGISTER.findall(read)) & tainted)
            if op.startswith("ld.global.nc") and read_tainted:
                found.append((name, statement))
            if read_tainted:
                tainted.update(REGISTER.findall(written))
    return found, kernels


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    out = tmp_path_factory.mktemp("ptx")
    texts = {}
    for source in sorted(CSRC.glob("*.cu")):  # every kernel file, new ones included
        target = out / (source.name + ".ptx")
        subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90a", "--expt-relaxed-constexpr",
                        f"-I{CSRC}", "-ptx", str(source), "-o", str(target)],
                       check=True, capture_output=True)
        texts[source.name] = target.read_text()
    return texts


def test_every_early_kernel_is_listed(ptx):
    """The table and the PTX agree both ways: each kernel that waits is listed, and each listed
    kernel is found waiting (so the parsing above sees them)."""
    seen = set()
    for source, text in ptx.items():
        _, kernels = read_only_loads_of_produced_data(text)
        unknown = [k for k in kernels if k not in PRODUCED_PARAMS]
        assert not unknown, f"{source}: list the produced parameters of {unknown}"
        seen.update(kernels)
    assert seen == set(PRODUCED_PARAMS)


def test_no_read_only_load_of_what_the_grid_before_wrote(ptx):
    for source, text in ptx.items():
        found, _ = read_only_loads_of_produced_data(text)
        assert not found, f"{source}: {found[:3]}"


def test_the_check_sees_a_read_only_load():
    """The taint reaches a load through address arithmetic (what __ldg of a_scale + row makes)."""
    ptx = """
.visible .entry k_w4a8_narrow_kernel_x(
	.param .u64 k_w4a8_narrow_kernel_x_param_0,
	.param .u64 k_w4a8_narrow_kernel_x_param_1
)
{
	ld.param.u64 	%rd1, [k_w4a8_narrow_kernel_x_param_1];
	griddepcontrol.wait;
	cvta.to.global.u64 	%rd2, %rd1;
	mul.wide.s32 	%rd3, %r1, 4;
	add.s64 	%rd4, %rd2, %rd3;
	@%p1 ld.global.nc.f32 	%f1, [%rd4];
	ld.global.f32 	%f2, [%rd4];
}
"""
    found, kernels = read_only_loads_of_produced_data(ptx)
    assert kernels == ["w4a8_narrow_kernel"]
    assert [s for _, s in found] == ["ld.global.nc.f32 \t%f1, [%rd4]"]
