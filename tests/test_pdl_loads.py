"""The kernels launched early (programmatic dependent launch) read what the kernel before them
wrote only through plain loads (csrc/common.cuh, load_produced). A read-only load (ld.global.nc:
__ldg, const __restrict__) declares its data constant for the whole kernel, so ptxas may schedule
it before the PDL wait, and did for the narrow GEMM's token scales; a strong one (ld.global.cg,
.ca: __ldcg, __ldca) skips or bypasses the L1 that the plain load shares across a CTA's warps,
measured 0.35 us slower on the narrow GEMM (NOTES.md, "GEMM", thirty-fourth session). Checked in
the PTX nvcc makes for sm_90a: each ld.global whose address derives from such a parameter is a
plain one. Runs where nvcc is installed (this machine and CI), no GPU needed."""
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


def loads_of_produced_data(ptx: str):
    """(kernel, instruction) of every ld.global whose address derives from a produced
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
            if op.startswith("ld.global") and read_tainted:
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
        _, kernels = loads_of_produced_data(text)
        unknown = [k for k in kernels if k not in PRODUCED_PARAMS]
        assert not unknown, f"{source}: list the produced parameters of {unknown}"
        seen.update(kernels)
    assert seen == set(PRODUCED_PARAMS)


def not_plain(found):
    # ld.global.<type> or ld.global.v<n>.<type>; anything else carries a cache or memory-order
    # qualifier (nc, ca, cg, cs, lu, volatile, relaxed, acquire, ...).
    return [(k, s) for k, s in found if not re.match(r"ld\.global(\.v\d)?\.[bsuf]\d+\s", s)]


def test_what_the_grid_before_wrote_is_read_by_plain_loads(ptx):
    reading = set()
    for source, text in ptx.items():
        found, _ = loads_of_produced_data(text)
        reading.update(k for k, _ in found)
        assert not not_plain(found), f"{source}: {not_plain(found)[:3]}"
    # The taint reaches each kernel's loads; the Hopper GEMM copies its operands (cp.async, TMA).
    assert reading == set(PRODUCED_PARAMS) - {"w4a8_gemm_wgmma_kernel"}


def test_the_check_sees_a_read_only_or_strong_load():
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
	ld.global.v4.u32 	{%r2, %r3, %r4, %r5}, [%rd4];
	ld.global.cg.f32 	%f3, [%rd4];
	ld.global.f32 	%f4, [%rd9];
}
"""
    found, kernels = loads_of_produced_data(ptx)
    assert kernels == ["w4a8_narrow_kernel"]
    assert [s for _, s in not_plain(found)] == ["ld.global.nc.f32 \t%f1, [%rd4]",
                                               "ld.global.cg.f32 \t%f3, [%rd4]"]
    assert len(found) == 4  # not the load of an address that no produced parameter reaches
