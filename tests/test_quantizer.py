"""qqq-quantize: the checkpoint it writes, its grids, and its refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import offline.checkpoint as checkpoint
from offline.checkpoint import LINEAR_NAMES, CheckpointError
from offline.grid import Grid, rtn
from offline.quantize import main, quantize_model
from vllm_qqq.format import pack, unpack


@pytest.mark.parametrize("g", [-1, 128])
def test_checkpoint_reloads_bit_identically(tiny_fp16, qqq_checkpoints, g):
    out = qqq_checkpoints[g]
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["wbits"], qc["group_size"]) == ("qqq", 4, g)
    assert qc["smooth"] is False and qc["gptq"] is False  # no calibration text: RTN
    assert qc["calibration"] is None
    assert qc.get("int_group_scales", False) == (g == 128)  # g128's default
    assert (out / "tokenizer.json").is_file()
    stored = load_file(str(out / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tiny_fp16, dtype="auto")
    source = model.state_dict()
    for i in range(model.config.num_hidden_layers):
        for name in LINEAR_NAMES:
            p = f"model.layers.{i}.{name}"
            assert f"{p}.weight" not in stored
            expect = pack(rtn(source[f"{p}.weight"], g, int_scales=g == 128))
            for key, t in expect.items():
                assert torch.equal(stored[f"{p}.{key}"], t), f"{p}.{key}"
    for key, t in source.items():
        if not any(f".{n}." in key for n in LINEAR_NAMES):
            assert torch.equal(stored[key], t), key


@pytest.mark.parametrize("g", [-1, 128])
def test_rtn_lies_on_the_grid_and_is_nearest(g):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(128, 512, generator=gen)
    w[3] = 0  # an all-zero row still gets a valid (positive) scale
    qw = rtn(w, g)
    stored = pack(qw)
    back = unpack(stored["B"], stored["s_channel"], stored["s_group"], g)
    assert torch.equal(back.codes, qw.codes)
    assert (qw.channel > 0).all() and (qw.group is None or (qw.group > 0).all())
    lo, hi = (-7, 7) if g == -1 else (0, 15)
    assert qw.codes.min() >= lo and qw.codes.max() <= hi
    # Every representable value, tried against the chosen one. Per-channel RTN is exactly the
    # nearest; with groups the codes round w / (channel * s_group) while the grid point is
    # channel * round((code - 8) * s_group), so it may miss the nearest by one int8 step.
    grid = Grid(w, g)
    chosen = qw.dequantize().t()
    candidates = torch.stack([grid.dequant(torch.full_like(w, c, dtype=torch.long), 0)
                              for c in range(lo, hi + 1)])
    best = (candidates - w).abs().min(dim=0).values
    err = (chosen - w).abs()
    slack = 1e-6 if g == -1 else qw.channel[:, None] * (1 + 1e-6)
    assert (err <= best + slack).all()
    assert (err <= best + 1e-6).float().mean() > 0.9


@pytest.mark.parametrize("g", [-1, 128])
def test_clipped_ranges_lower_the_rounding_error(g):
    """--clip: every row (per-channel) or group (g128) keeps the range with the least squared
    rounding error among CLIPS (the absmax one included), so no row or group gets worse, heavy
    tails get better, and the result still lies on the format's grid."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(64, 512, generator=gen)
    w[:, ::41] *= 8  # outliers: a shorter range rounds the bulk better
    w[5] = 0
    plain, clipped = Grid(w, g), Grid(w, g, clip=True)
    size = 512 if g == -1 else g

    def err(grid):
        return (w - grid.quantize(w)).pow(2).reshape(64, -1, size).sum(dim=2)

    assert (err(clipped) <= err(plain) * (1 + 1e-6) + 1e-12).all()
    assert err(clipped).sum() < 0.95 * err(plain).sum()
    qw = rtn(w, g, clip=True)
    stored = pack(qw)
    back = unpack(stored["B"], stored["s_channel"], stored["s_group"], g)
    assert torch.equal(back.codes, qw.codes)
    torch.testing.assert_close(qw.dequantize().t(), clipped.quantize(w), rtol=0, atol=1e-6)
    assert torch.equal(Grid(w, g).channel, plain.channel)  # clip off: the absmax grid, as before


def test_integer_group_scales_round_no_worse_than_either_neighbour():
    """--int-group-scales: every group scale is an integer in [1, 18], the floor or the ceiling
    of the fp16 one, whichever rounds the group with less error; per-channel has no groups."""
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(64, 512, generator=gen) * torch.rand(1, 512, generator=gen) * 3
    w[:, ::37] *= 6
    fp16, integer = Grid(w, 128), Grid(w, 128, int_scales=True)
    s = integer.group.float()
    assert torch.equal(s, s.round()) and s.min() >= 1 and s.max() <= 18
    assert ((s == fp16.group.float().floor()) | (s == fp16.group.float().ceil())).all()

    def err(group):
        grid = Grid(w, 128)
        grid.group, grid._group_f = group.half(), group.float()
        return (w - grid.quantize(w)).pow(2).reshape(64, 4, 128).sum(dim=2).t()  # [G, N]

    floor, ceil = (err(f(fp16.group.float()).clamp(1, 18)) for f in (torch.floor, torch.ceil))
    assert (err(s) <= torch.minimum(floor, ceil) * (1 + 1e-6)).all()
    with pytest.raises(ValueError, match="group_size 128"):
        Grid(w, -1, int_scales=True)


def test_interrupted_write_leaves_nothing(tiny_fp16, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(tiny_fp16, tmp_path / "out", group_size=128)
    assert list(tmp_path.iterdir()) == []


def _copy_with_config(src, dst, **changes):
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_refusals(tiny_fp16, tmp_path):
    with pytest.raises(CheckpointError, match="not supported"):
        quantize_model(_copy_with_config(tiny_fp16, tmp_path / "gpt2",
                                         architectures=["GPT2LMHeadModel"]), tmp_path / "o1")
    with pytest.raises(CheckpointError, match="no config.json"):
        quantize_model(tmp_path, tmp_path / "o2")
    with pytest.raises(CheckpointError, match="already exists"):
        quantize_model(tiny_fp16, tiny_fp16)
    fp32 = tmp_path / "fp32"
    AutoModelForCausalLM.from_pretrained(tiny_fp16, dtype=torch.float32).save_pretrained(fp32)
    with pytest.raises(CheckpointError, match="FP16 or BF16"):
        quantize_model(fp32, tmp_path / "o3")


def test_unwritable_out_dir_is_refused_before_quantizing(tiny_fp16, tmp_path, monkeypatch):
    def quantized(*args, **kwargs):
        raise AssertionError("quantized before refusing the output directory")

    monkeypatch.setattr("offline.quantize.rtn", quantized)
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="cannot write"):
        quantize_model(tiny_fp16, tmp_path / "file" / "out")
    # A new directory's parents are made, and the probe leaves nothing behind.
    monkeypatch.undo()
    out = quantize_model(tiny_fp16, tmp_path / "a" / "b" / "out")
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_group_size_must_divide_k(tmp_path):
    from offline.tiny_model import make_tiny_llama
    model = make_tiny_llama(tmp_path / "odd", intermediate=320, layers=1)  # down_proj K = 320
    with pytest.raises(CheckpointError, match="down_proj.*does not divide"):
        quantize_model(model, tmp_path / "out", group_size=128)
    assert not (tmp_path / "out").exists()


def test_cli(tiny_fp16, tmp_path, caplog):
    assert main([str(tiny_fp16), str(tmp_path / "q"), "--group-size", "128"]) == 0
    assert (tmp_path / "q" / "model.safetensors").is_file()
    assert main([str(tiny_fp16), str(tmp_path / "q")]) == 2
    assert "already exists" in caplog.text
    # g128's default: integer group scales, recorded in the config; --no-int-group-scales keeps
    # the fp16 ones; per-channel has no group scales to make integers.
    assert main([str(tiny_fp16), str(tmp_path / "qf"), "--group-size", "128",
                 "--no-int-group-scales"]) == 0
    integer, fp16 = (load_file(tmp_path / d / "model.safetensors") for d in ("q", "qf"))
    name = next(k for k in integer if k.endswith("s_group"))
    assert torch.equal(integer[name].float(), integer[name].float().round())
    assert not torch.equal(fp16[name].float(), fp16[name].float().round())
    configs = {d: json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]
               for d in ("q", "qf")}
    assert configs["q"]["int_group_scales"] is True and "int_group_scales" not in configs["qf"]
    assert main([str(tiny_fp16), str(tmp_path / "qi2"), "--int-group-scales"]) == 2
    assert "group-size 128" in caplog.text
    # --clip reaches the grid: some fp16 group scales shrink below the absmax ones, none grow.
    assert main([str(tiny_fp16), str(tmp_path / "qc"), "--group-size", "128", "--clip",
                 "--no-int-group-scales"]) == 0
    clipped = load_file(tmp_path / "qc" / "model.safetensors")
    assert (clipped[name] <= fp16[name]).all() and (clipped[name] < fp16[name]).any()
