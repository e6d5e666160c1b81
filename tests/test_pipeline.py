"""The calibrated quantizer's stages on a tiny model: smoothing folds exactly, GPTQ beats RTN on
its own calibration data, the pipeline writes a valid checkpoint, bad calibration text is refused."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from offline.calibration import CalibrationError, calibration_samples, read_text
from offline.gptq import Hessian, gptq
from offline.grid import Grid
from offline.quantize import main, quantize_model
from offline.smooth import fold_into_linear, fold_into_norm, search_scales


def test_smoothing_folds_preserve_the_float_model(tiny_fp16):
    model = AutoModelForCausalLM.from_pretrained(tiny_fp16, dtype=torch.float32)
    x = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        before = model(x).logits
        gen = torch.Generator().manual_seed(0)
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            s = torch.rand(a.q_proj.in_features, generator=gen) * 8 + 0.1
            fold_into_norm(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj], s)
            s = torch.rand(m.gate_proj.in_features, generator=gen) * 8 + 0.1
            fold_into_norm(layer.post_attention_layernorm, [m.gate_proj, m.up_proj], s)
            s = torch.rand(m.down_proj.in_features, generator=gen) * 8 + 0.1
            fold_into_linear(m.up_proj, m.down_proj, s)
        after = model(x).logits
    # Exact in real arithmetic; fp32 rounding of the scaled weights is all that differs.
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_fold_into_linear_v_to_o_with_bias():
    gen = torch.Generator().manual_seed(1)
    v, o = torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)
    x = torch.randn(10, 64, generator=gen)
    with torch.no_grad():
        before = o(v(x))
        fold_into_linear(v, o, torch.rand(64, generator=gen) * 4 + 0.25)
        torch.testing.assert_close(o(v(x)), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("g", [-1, 128])
def test_search_scales_reduce_quantized_error_on_outliers(g):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(512, 256, generator=gen)
    x[:, :4] *= 40  # activation outlier channels, as in real LLMs
    w = torch.randn(128, 256, generator=gen) / 16
    from offline.smooth import _quantized_error
    ref = [x @ w.t()]
    s = search_scales(x, [w], g)
    assert _quantized_error(x, [w], s, g, ref) < 0.8 * _quantized_error(
        x, [w], torch.ones(256), g, ref)


@pytest.mark.parametrize("g", [-1, 128])
def test_gptq_beats_rtn_on_calibration_data(g):
    gen = torch.Generator().manual_seed(3)
    k, n = 512, 256
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)  # correlated inputs
    x = torch.randn(4096, k, generator=gen) @ mix
    w = torch.randn(n, k, generator=gen) / k**0.5
    hess = Hessian(k)
    for chunk in x.split(1000):
        hess.add(chunk)
    torch.testing.assert_close(hess.h, 2 * x.t() @ x / x.shape[0], rtol=1e-3, atol=1e-3)
    grid = Grid(w, g)
    rtn_err = (x @ (grid.quantize(w) - w).t()).pow(2).sum()
    codes = gptq(w, hess.h, grid)
    lo, hi = (-7, 7) if g == -1 else (0, 15)
    assert codes.min() >= lo and codes.max() <= hi
    if g == 128:  # every code times its group scale stays on the int8 grid
        prod = torch.round((codes.float() - 8) * grid._group_scale(0, k))
        assert prod.min() >= -128 and prod.max() <= 127
    gptq_err = (x @ (grid.dequant(codes, 0) - w).t()).pow(2).sum()
    assert gptq_err < 0.8 * rtn_err, (gptq_err, rtn_err)


def test_calibrated_checkpoint(tiny_fp16, calib_text, tmp_path):
    out = quantize_model(tiny_fp16, tmp_path / "q", 128, calib=calib_text, nsamples=8, seqlen=64,
                         smooth=True, rotate=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["smooth"] and qc["gptq"] and qc["group_size"] == 128 and not qc["rotate"]
    assert qc["calibration"] == "8 x 64"  # what the checkpoint was calibrated on, recorded
    from offline.fake_quant import load_fake_quant_model  # unpacks and checks every tensor
    fq = load_fake_quant_model(out)
    fp = AutoModelForCausalLM.from_pretrained(tiny_fp16, dtype=torch.float32)
    from transformers import AutoTokenizer
    windows = calibration_samples(AutoTokenizer.from_pretrained(tiny_fp16),
                                  read_text(calib_text), 4, 64, seed=9)
    with torch.no_grad():
        a, b = fp(windows).logits, fq(windows).logits
    rel = (a - b).norm() / a.norm()
    assert 0 < rel < 0.5, rel  # quantized, and still the same model


def test_bad_calibration_text(tiny_fp16, tiny_without_tokenizer, tmp_path, caplog):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CalibrationError, match="empty"):
        quantize_model(tiny_fp16, tmp_path / "o1", calib=empty)
    short = tmp_path / "short.txt"
    short.write_text("the model reads.")
    with pytest.raises(CalibrationError, match="at least 65"):
        quantize_model(tiny_fp16, tmp_path / "o2", calib=short, seqlen=64)
    with pytest.raises(CalibrationError, match="does not exist"):
        quantize_model(tiny_fp16, tmp_path / "o3", calib=tmp_path / "nope.txt")
    assert main([str(tiny_fp16), str(tmp_path / "o4"), "--calib", str(short)]) == 2
    assert "tokens" in caplog.text
    for flag in ("--nsamples", "--seqlen"):
        assert main([str(tiny_fp16), str(tmp_path / "o5"), "--calib", str(short), flag, "0"]) == 2
    assert "at least one window of at least one token" in caplog.text
    with pytest.raises(CalibrationError, match="bare has no tokenizer that loads"):
        quantize_model(tiny_without_tokenizer, tmp_path / "o6", calib=short)
    assert not any(p.name.startswith(("o1", "o2", "o3", "o4", "o5", "o6"))
                   for p in tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the refusal without a GPU")
def test_cli_refuses_a_device_it_cannot_use(tiny_fp16, tmp_path, capsys):
    for device, message in (("cuda", "no CUDA GPU is available"), ("gpu", "not a torch device")):
        with pytest.raises(SystemExit) as stop:
            main([str(tiny_fp16), str(tmp_path / "o"), "--device", device])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("n", [12, 256, 1000, 1536, 3584])
def test_random_hadamard_is_orthogonal_with_equal_entries(n):
    """Sylvester's (256), Paley's (12) and their products (1000 = 500 x 2, 1536 = 12 x 128,
    3584 = 224 x 16): orthogonal, every entry +-1 / sqrt(n)."""
    from offline.rotate import hadamard_any, random_hadamard
    q = random_hadamard(n, seed=1)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(q.abs(), torch.full_like(q, n ** -0.5), atol=1e-12, rtol=0)
    # the signs are random: neither the plain matrix nor another seed's
    assert not torch.equal(q, hadamard_any(n)) and not torch.equal(q, random_hadamard(n, seed=2))


@pytest.mark.parametrize("kind", ["orthogonal", "hadamard"])
def test_rotation_preserves_the_float_model(tiny_fp16, kind):
    from offline.rotate import rotate_model
    model = AutoModelForCausalLM.from_pretrained(tiny_fp16, dtype=torch.float32)
    model.config.tie_word_embeddings = True  # exercise untying too
    model.lm_head.weight = model.model.embed_tokens.weight
    x = torch.randint(0, 500, (2, 24))
    seen = []
    o_proj = model.model.layers[1].self_attn.o_proj
    hook = o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        before = model(x).logits
        rotate_model(model, seed=3, heads=True, kind=kind)
        after = model(x).logits
    hook.remove()
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # o_proj's input (attention output, per head) is rotated by the head rotation R.
    from offline.rotate import hadamard
    d = model.config.hidden_size // model.config.num_attention_heads
    heads_before = seen[0].reshape(2, 24, -1, d).double()
    torch.testing.assert_close(seen[1].reshape(2, 24, -1, d).double(), heads_before @ hadamard(d),
                               rtol=1e-4, atol=1e-4)
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))


def test_rotate_pipeline_checkpoint(tiny_fp16, calib_text, tmp_path):
    assert main([str(tiny_fp16), str(tmp_path / "r"), "--group-size", "-1", "--no-smooth",
                 "--calib", str(calib_text), "--nsamples", "4", "--seqlen", "64"]) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["rotate"] and qc["gptq"] and not qc["smooth"] and not cfg["tie_word_embeddings"]
    assert qc["rotation"] == "hadamard"  # the per-channel default
    assert main([str(tiny_fp16), str(tmp_path / "o"), "--group-size", "-1", "--no-smooth",
                 "--rotation", "orthogonal", "--calib", str(calib_text), "--nsamples", "4",
                 "--seqlen", "64"]) == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())[
        "quantization_config"]["rotation"] == "orthogonal"
    # Same GPTQ without rotation: on this random model (no outliers to spread) rotation should
    # neither help much nor hurt; a broken rotation would be far off.
    assert main([str(tiny_fp16), str(tmp_path / "p"), "--group-size", "-1", "--no-rotate",
                 "--no-smooth", "--calib", str(calib_text), "--nsamples", "4", "--seqlen",
                 "64"]) == 0
    qc = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert not qc["rotate"] and qc["gptq"] and not qc["smooth"]
    from offline.fake_quant import load_fake_quant_model
    fp = AutoModelForCausalLM.from_pretrained(tiny_fp16, dtype=torch.float32)
    x = torch.randint(0, 500, (2, 32))
    with torch.no_grad():
        a = fp(x).logits
        err_rot = (load_fake_quant_model(tmp_path / "r")(x).logits - a).norm() / a.norm()
        err_plain = (load_fake_quant_model(tmp_path / "p")(x).logits - a).norm() / a.norm()
        err_orth = (load_fake_quant_model(tmp_path / "o")(x).logits - a).norm() / a.norm()
    assert 0 < err_rot < 1.5 * err_plain, (err_rot, err_plain)
    assert 0 < err_orth < 1.5 * err_plain, (err_orth, err_plain)


@pytest.mark.parametrize("args,rotate,smooth,rotation", [
    (["--group-size", "128"], True, False, "orthogonal"),
    (["--group-size", "-1"], True, True, "hadamard"),
    (["--group-size", "128", "--smooth"], False, True, None),
    (["--group-size", "-1", "--no-rotate"], False, True, None),
    (["--group-size", "-1", "--no-smooth", "--rotation", "orthogonal"], True, False,
     "orthogonal")])
def test_default_pipeline_by_group_size(tiny_fp16, calib_text, tmp_path, args, rotate, smooth,
                                        rotation):
    """Rotation + GPTQ for g128, Hadamard rotation + smoothing + GPTQ per-channel (the study's
    better rows), unless a flag picks; g128 with integer group scales."""
    assert main([str(tiny_fp16), str(tmp_path / "q"), *args, "--calib", str(calib_text),
                 "--nsamples", "4", "--seqlen", "64"]) == 0
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (qc["rotate"], qc["smooth"], qc["gptq"], qc["rotation"]) == (rotate, smooth, True,
                                                                          rotation)
    assert qc.get("int_group_scales", False) == ("128" in args)  # g128: integer group scales


@pytest.mark.parametrize("group_size", [-1, 128])
def test_python_api_defaults_are_the_cli_pipeline(tiny_fp16, calib_text, tmp_path, group_size):
    """quantize_model without pipeline flags makes qqq-quantize's checkpoint, tensor for tensor:
    library callers get the study's better pipeline for the group size, not another one."""
    cli, api = tmp_path / "cli", tmp_path / "api"
    assert main([str(tiny_fp16), str(cli), "--group-size", str(group_size), "--calib",
                 str(calib_text), "--nsamples", "4", "--seqlen", "64"]) == 0
    quantize_model(tiny_fp16, api, group_size, calib=calib_text, nsamples=4, seqlen=64)
    qc = {d: json.loads((d / "config.json").read_text())["quantization_config"] for d in (cli, api)}
    assert qc[api] == qc[cli] and qc[api]["rotate"]
    assert qc[api]["smooth"] == (group_size == -1)
    a, b = (load_file(str(d / "model.safetensors")) for d in (cli, api))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_quantization_holds_one_layer_in_fp32(tiny_fp16, calib_text, tmp_path, monkeypatch):
    """Bounded host memory: while a layer is calibrated, every other layer stays in the source
    dtype (not a whole fp32 copy of the model), and the layers already quantized no longer hold
    their linears' weights (the packed tensors replace them). Rotation runs layer by layer too."""
    import offline.pipeline as pipeline
    collect, seen = pipeline._collect, []

    def watch(layer, *args, **kwargs):
        layers = list(model_holder[0].model.layers)
        fp32 = [i for i, l in enumerate(layers) if any(p.dtype == torch.float32
                                                       for p in l.parameters())]
        emptied = [i for i, l in enumerate(layers) if l.self_attn.q_proj.weight.numel() == 0
                   and l.mlp.down_proj.weight.numel() == 0]
        seen.append((layers.index(layer), fp32, emptied))
        return collect(layer, *args, **kwargs)

    model_holder = []
    quantize_layers = pipeline.quantize_layers

    def grab(model, *args, **kwargs):
        model_holder.append(model)
        return quantize_layers(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_collect", watch)
    import offline.quantize as quantize
    monkeypatch.setattr(quantize, "quantize_layers", grab)
    quantize_model(tiny_fp16, tmp_path / "q", 128, calib=calib_text, nsamples=4, seqlen=64,
                   rotate=True, smooth=False)
    assert {i for i, _, _ in seen} == {0, 1}
    for i, fp32, emptied in seen:
        assert fp32 == [i], (i, fp32)
        assert emptied == list(range(i)), (i, emptied)


@pytest.mark.gpu
@pytest.mark.parametrize("group_size,rotate", [(128, True), (-1, False)])
def test_calibration_on_the_gpu(tiny_fp16, calib_text, tmp_path, group_size, rotate):
    """--device cuda: each layer is rotated (rotation on the GPU too) and calibrated there. Its
    checkpoint is as good as the CPU run's: GPU fp32 sums round differently, so GPTQ may choose
    other codes, but the logit error against the float model stays within 1.25x of the CPU's."""
    from offline.fake_quant import load_fake_quant_model
    runs = {}
    for device in ("cpu", "cuda"):
        runs[device] = quantize_model(tiny_fp16, tmp_path / device, group_size, calib=calib_text,
                                      nsamples=8, seqlen=64, rotate=rotate, smooth=not rotate,
                                      device=device)
    fp = AutoModelForCausalLM.from_pretrained(tiny_fp16, dtype=torch.float32)
    x = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = fp(x).logits
        err = {d: ((load_fake_quant_model(p)(x).logits - a).norm() / a.norm()).item()
               for d, p in runs.items()}
    assert 0 < err["cuda"] < 1.25 * err["cpu"], err


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [-1, 128])
def test_rtn_on_the_gpu_writes_the_cpu_checkpoint(tiny_fp16, tmp_path, group_size):
    """Without calibration text, --device cuda rounds each layer to nearest on the GPU: the
    same tensors as on the CPU, bit for bit (the grid's divisions and roundings are IEEE on
    both)."""
    paths = {d: quantize_model(tiny_fp16, tmp_path / d, group_size, device=d)
             for d in ("cpu", "cuda")}
    tensors = {d: load_file(p / "model.safetensors") for d, p in paths.items()}
    assert tensors["cpu"].keys() == tensors["cuda"].keys()
    for name, t in tensors["cpu"].items():
        assert torch.equal(t, tensors["cuda"][name]), name


def test_lm_head_quantized_from_a_tied_model(tiny_fp16, tmp_path):
    """--quantize-lm-head on a model whose lm_head shares the embedding (RTN): the checkpoint
    keeps the embedding as it was, its lm_head tensors are the QQQ rounding of that same matrix,
    and config.json unties the two and records the lm_head."""
    from offline.grid import rtn
    from vllm_qqq.format import pack
    src = tmp_path / "tied"
    shutil.copytree(tiny_fp16, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    ckpt = quantize_model(src, tmp_path / "qqq", -1, lm_head=True)
    emb = load_file(str(src / "model.safetensors"))["model.embed_tokens.weight"]
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert torch.equal(tensors["model.embed_tokens.weight"], emb)
    assert "lm_head.weight" not in tensors
    for name, t in pack(rtn(emb, -1)).items():
        assert torch.equal(tensors[f"lm_head.{name}"], t), name
    out = json.loads((ckpt / "config.json").read_text())
    assert out["tie_word_embeddings"] is False and out["quantization_config"]["lm_head"] is True


def test_lm_head_off_the_format_is_refused(tiny_fp16, tmp_path, caplog):
    """A vocabulary that is no multiple of 64 cannot be a QQQ lm_head: qqq-quantize says so
    before quantizing (status 2, no output directory); without the flag the model quantizes."""
    src = tmp_path / "vocab520"
    model = AutoModelForCausalLM.from_pretrained(tiny_fp16)
    model.resize_token_embeddings(520, mean_resizing=False)
    model.save_pretrained(src)
    assert main([str(src), str(tmp_path / "out"), "--quantize-lm-head"]) == 2
    assert "lm_head (256 -> 520): QQQ needs output features N divisible by 64" in caplog.text
    assert not (tmp_path / "out").exists()
    assert main([str(src), str(tmp_path / "plain")]) == 0


@pytest.mark.parametrize("group_size", [-1, 128])
def test_lm_head_in_row_chunks_is_the_whole_matrix(tiny_fp16, calib_text, group_size):
    """The lm_head is quantized a block of rows at a time (bounded memory); with GPTQ on the same
    inputs, 128-row blocks give the tensors of one block of all 512 rows."""
    from offline.calibration import load_tokenizer
    from offline.pipeline import capture_first_layer_inputs, quantize_lm_head
    model = AutoModelForCausalLM.from_pretrained(tiny_fp16, dtype=torch.float32)
    samples = calibration_samples(load_tokenizer(tiny_fp16), read_text(calib_text), 4, 64, 0)
    inputs, _ = capture_first_layer_inputs(model, samples, "cpu")
    weight = model.lm_head.weight.data.clone()
    whole = quantize_lm_head(model, inputs, group_size, True, "cpu", False, rows=512)
    model.lm_head.weight.data = weight
    chunked = quantize_lm_head(model, inputs, group_size, True, "cpu", False, rows=128)
    assert whole.keys() == chunked.keys()
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name
    assert model.lm_head.weight.numel() == 0  # released once packed
