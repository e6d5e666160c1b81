"""The accuracy study's reference methods (offline/references.py) on the tiny model."""

import torch

from offline.checkpoint import LINEAR_NAMES
from offline.fake_quant import W4A8Linear, load_fake_quant_model
from offline.references import W8A8Linear, load_weight_only, smoothquant_w8a8


def _tokens(seed, n=2, length=48):
    return torch.randint(3, 500, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_smoothquant_w8a8_quantizes_every_linear_and_stays_close(tiny_fp16):
    from transformers import AutoModelForCausalLM
    fp = AutoModelForCausalLM.from_pretrained(tiny_fp16, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_fp16, dtype=torch.float32).eval()
    smoothquant_w8a8(model, _tokens(0, n=4))
    for layer in model.model.layers:
        assert all(isinstance(layer.get_submodule(n), W8A8Linear) for n in LINEAR_NAMES)
    x = _tokens(1)
    ref, out = fp(x).logits, model(x).logits
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel  # quantized (not identical), and 8-bit close


@torch.no_grad()
def test_weight_only_skips_activation_quantization(qqq_checkpoints):
    w4a8 = load_fake_quant_model(qqq_checkpoints[128], torch.float32, exact=False)
    w4a16 = load_weight_only(qqq_checkpoints[128])
    a = w4a8.model.layers[0].mlp.down_proj
    b = w4a16.model.layers[0].mlp.down_proj
    assert isinstance(b, W4A8Linear) and not b.quant_acts and a.quant_acts
    x = torch.randn(5, a.w_dq.shape[0]) * 3
    assert torch.equal(b(x), x @ b.w_dq)  # the same weights, activations untouched
    assert not torch.equal(a(x), b(x))
