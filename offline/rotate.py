"""Rotation of the residual stream (weights only, no runtime cost), the other outlier pipeline.

RMSNorm weights are first fused into the linears that read the norm's output, leaving unit norms;
an RMSNorm with unit weight commutes with any orthogonal Q (it only divides by the RMS, which Q
keeps). Then every weight that writes the residual stream (embedding, o_proj, down_proj) is
multiplied by Q on its output side and every weight that reads it (q/k/v, gate/up, lm_head) by Q
on its input side, so the model computes the same function on a rotated residual stream whose
outliers are spread over all channels. Q is a random orthogonal matrix (fixed seed): hidden sizes
such as 1536 have no plain Hadamard matrix.

With heads=True (qqq-quantize --rotate-heads), each head's values are rotated too: v_proj's rows of a KV head are multiplied by
R^T and o_proj's input columns of every attention head by R (one R, so grouped KV heads work),
which attention passes through unchanged (softmax(QK^T) V R, then (.) R^T inside o_proj). This
spreads outliers of o_proj's input, whose int8 activation quantization has no norm to fold into.
R is the normalized Hadamard matrix when the head size is a power of two. Measured on the study
model (Qwen2.5-1.5B, g128) it made perplexity worse (15.10 vs 14.81), so it is off by default.
"""

import torch

READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
           "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]  # a Haar-random orthogonal matrix


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix / sqrt(n), orthogonal; n a power of two."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


@torch.no_grad()
def _rotate_heads(attn, head_dim: int, r: torch.Tensor) -> None:
    v, o = attn.v_proj, attn.o_proj
    wv = v.weight.double().view(-1, head_dim, v.in_features)  # [kv heads, d, hidden]
    v.weight.copy_(torch.einsum("ji,hjk->hik", r, wv).reshape(v.weight.shape).to(v.weight.dtype))
    if v.bias is not None:
        v.bias.copy_((v.bias.double().view(-1, head_dim) @ r).reshape(-1).to(v.bias.dtype))
    wo = o.weight.double().view(o.out_features, -1, head_dim)  # [hidden, heads, d]
    o.weight.copy_((wo @ r).reshape(o.weight.shape).to(o.weight.dtype))


@torch.no_grad()
def _fuse_norm(norm: torch.nn.Module, readers: list[torch.nn.Linear]) -> None:
    g = norm.weight.double()
    for lin in readers:
        lin.weight.copy_((lin.weight.double() * g[None, :]).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


def rotations(config, seed: int = 0, heads: bool = False):
    """The residual stream's Q [hidden, hidden] and, with heads, the head rotation R (else None)."""
    q = random_orthogonal(config.hidden_size, seed)
    if not heads:
        return q, None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    r = (hadamard(head_dim) if head_dim & (head_dim - 1) == 0
         else random_orthogonal(head_dim, seed + 1))
    return q, r


@torch.no_grad()
def rotate_ends(model, q: torch.Tensor) -> None:
    """The parts of the rotation outside the decoder layers: the embedding (it writes the residual
    stream) and the lm_head, which takes the final norm's weight and reads the stream. A tie
    between the two is broken first. Each tensor is rounded to its dtype once."""
    inner = model.model
    if getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = torch.nn.Parameter(inner.embed_tokens.weight.detach().clone())
        model.config.tie_word_embeddings = False
    emb, head = inner.embed_tokens.weight, model.lm_head.weight
    emb.copy_((emb.double() @ q).to(emb.dtype))
    head.copy_(((head.double() * inner.norm.weight.double()[None, :]) @ q).to(head.dtype))
    inner.norm.weight.fill_(1.0)


@torch.no_grad()
def rotate_layer(layer, q: torch.Tensor, r: torch.Tensor | None = None) -> None:
    """One decoder layer's part: its norms fused into the linears that read them, the readers
    rotated on their input side and the writers on their output side; with r, each attention
    head's values. Layer by layer, so that only the layer being quantized needs fp32 copies."""
    device = layer.input_layernorm.weight.device  # the layer may be on the calibration GPU
    q = q.to(device)
    r = None if r is None else r.to(device)
    _fuse_norm(layer.input_layernorm, [layer.get_submodule(n) for n in READERS[:3]])
    _fuse_norm(layer.post_attention_layernorm, [layer.get_submodule(n) for n in READERS[3:]])

    def right(w):  # x -> x Q on the input side of a reader: W <- W Q
        w.copy_((w.double() @ q).to(w.dtype))

    for name in READERS:
        right(layer.get_submodule(name).weight)
    for name in WRITERS:
        lin = layer.get_submodule(name)
        lin.weight.copy_((q.t() @ lin.weight.double()).to(lin.weight.dtype))
        if lin.bias is not None:
            right(lin.bias[None, :])
    if r is not None:
        _rotate_heads(layer.self_attn, r.shape[0], r)


def rotate_model(model, seed: int = 0, heads: bool = False) -> None:
    """Fuse the norms and rotate the residual stream of a Llama/Qwen-style model in place (and,
    with heads, each attention head's values). Ties between the embedding and lm_head are broken
    (the lm_head takes the final norm)."""
    q, r = rotations(model.config, seed, heads)
    rotate_ends(model, q)
    for layer in model.model.layers:
        rotate_layer(layer, q, r)
