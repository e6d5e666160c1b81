"""The benchmarks' own arithmetic (benchmarks/), on made-up inputs: what the GPU runs report rests
on it."""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_e2e import split_variants  # noqa: E402
from profile_decode import timeline  # noqa: E402


def test_timeline_credits_an_early_launch_only_past_the_kernel_before_it():
    # norm 0-5; the GEMM launched early at 2 (PDL), ends 12; 2 us of launch gap; quant 14-16.
    per_name, busy, idle = timeline([("gemm", 2.0, 12.0), ("norm", 0.0, 5.0),
                                     ("quant", 14.0, 16.0)])
    assert per_name == {"norm": [5.0, 0.0], "gemm": [7.0, 0.0], "quant": [2.0, 2.0]}
    assert (busy, idle) == (14.0, 2.0)


def test_timeline_a_kernel_inside_another_adds_nothing_and_names_add_up():
    per_name, busy, idle = timeline([("a", 0.0, 10.0), ("b", 3.0, 4.0), ("a", 11.0, 12.0)])
    assert per_name == {"a": [11.0, 1.0], "b": [0.0, 0.0]}
    assert (busy, idle) == (11.0, 1.0)


def test_timeline_busy_plus_idle_is_the_span_and_busy_the_union():
    rng = random.Random(0)
    for _ in range(200):
        kernels = []
        for i in range(rng.randrange(1, 30)):
            start = rng.uniform(0, 100)
            kernels.append((f"k{i % 4}", start, start + rng.uniform(0.1, 20)))
        per_name, busy, idle = timeline(kernels)
        span = max(k[2] for k in kernels) - min(k[1] for k in kernels)
        assert busy + idle == pytest.approx(span)
        # The union of the intervals, measured on a fine grid.
        grid = [x / 50 for x in range(0, 6001)]
        covered = sum(any(s <= x < e for _, s, e in kernels) for x in grid) / 50
        assert busy == pytest.approx(covered, abs=0.02 * len(kernels) + 0.05)
        assert sum(v[0] for v in per_name.values()) == pytest.approx(busy)
        assert all(v[0] >= 0 and v[1] >= 0 for v in per_name.values())


@pytest.mark.parametrize("name, expected", [
    ("qqq_channel", ("qqq_channel", {})),
    ("qqq_channel_kernel_quant", ("qqq_channel", {"VLLM_QQQ_COMPILED_QUANT": "0"})),
    ("qqq_g128_pdl_plain_inductor", ("qqq_g128", {"TORCHINDUCTOR_ENABLE_PDL": "1",
                                                 "VLLM_QQQ_INDUCTOR_PDL": "0"})),
    ("fp16", ("fp16", {})),
    ("fp16_compile_small", ("fp16", {"BENCH_COMPILE_SIZES": "1,16"})),
    ("qqq_channel_looped_rows", ("qqq_channel", {"VLLM_QQQ_PERSISTENT_ROWS": "0"})),
    ("qqq_g128_fused_silu", ("qqq_g128", {"VLLM_QQQ_FUSED_QUANT": "silu"})),
    ("qqq_channel_fused", ("qqq_channel", {"VLLM_QQQ_FUSED_QUANT": "1"})),
    ("qqq_channel_unfused", ("qqq_channel", {"VLLM_QQQ_FUSED_QUANT": "0"})),
])
def test_split_variants_takes_the_suffixes_off_the_format(name, expected):
    assert split_variants(name) == expected


def test_bench_gemm_names_the_formats_it_builds(monkeypatch):
    """qqq_g128 builds g128 as qqq-quantize writes it, integer group scales (int16 in the kernel
    layout), qqq_g128_fp16 fp16 ones, qqq_channel none; the generated variants take the same
    names. Run on the CPU, where ops.w4a8_linear is the reference: each layer also computes."""
    import torch

    import bench_gemm
    monkeypatch.setattr(bench_gemm, "DEV", "cpu")
    built = []
    device_weight = bench_gemm.device_weight
    monkeypatch.setattr(bench_gemm, "device_weight",
                        lambda w: built.append(device_weight(w)) or built[-1])
    x = torch.randn(3, 256, dtype=torch.float16)
    for name, dtype in (("qqq_channel", None), ("qqq_g128", torch.int16),
                        ("qqq_g128_fp16", torch.float16)):
        built.clear()
        f, _ = bench_gemm.IMPLS[name](256, 128)
        group = built[0]["qqq_group"]
        assert group.numel() == 0 if dtype is None else group.dtype == dtype, name
        y = f(x)
        assert y.shape == (3, 128) and torch.isfinite(y).all()
    assert dict(bench_gemm.GROUP_MODES) == {"channel": -1, "g128": "int", "g128_fp16": 128}
    for variant in ("narrow", "splitk", "narrow_s3", "tile_tma_64x8"):
        assert f"qqq_g128_{variant}" in bench_gemm.IMPLS
        assert f"qqq_g128_fp16_{variant}" in bench_gemm.IMPLS
