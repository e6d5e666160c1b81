"""Rotation of the residual stream (weights only, no runtime cost), the other outlier pipeline.

RMSNorm weights are first fused into the linears that read the norm's output, leaving unit norms;
an RMSNorm with unit weight commutes with any orthogonal Q (it only divides by the RMS, which Q
keeps). Then every weight that writes the residual stream (embedding, o_proj, down_proj) is
multiplied by Q on its output side and every weight that reads it (q/k/v, gate/up, lm_head) by Q
on its input side, so the model computes the same function on a rotated residual stream whose
outliers are spread over all channels. Q is a random orthogonal matrix (fixed seed), or with
kind="hadamard" a Hadamard matrix with random signs on its rows, whose entries all have the same
magnitude 1 / sqrt(n), so that one channel's outlier spreads evenly over all (hidden sizes that
are not a power of two, such as 1536 = 12 x 128, take Paley's construction for the odd factor).

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


def _paley(m: int) -> torch.Tensor:
    """Paley's Hadamard matrix of order m (entries +-1), m - 1 a prime q = 3 (mod 4): I + S, S the
    skew matrix bordering q's Jacobsthal matrix (the quadratic character of j - i mod q)."""
    q = m - 1
    squares = {i * i % q for i in range(1, q)}
    chi = [0] + [1 if i in squares else -1 for i in range(1, q)]
    s = torch.zeros(m, m, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1, -1
    s[1:, 1:] = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)],
                             dtype=torch.float64)
    return s + torch.eye(m, dtype=torch.float64)


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def hadamard_any(n: int) -> torch.Tensor | None:
    """An orthogonal Hadamard matrix / sqrt(n) of order n: Sylvester's where n is a power of two,
    else Paley's of order m = (odd part of n) x 2^c, where m - 1 is a prime = 3 (mod 4), times
    Sylvester's of n / m (1536: 12 x 128; 3584: 224 x 16). None where neither is found."""
    power = n & -n
    odd = n // power
    if odd == 1:
        return hadamard(n)
    m = odd
    while m <= n:
        if _is_prime(m - 1) and (m - 1) % 4 == 3:
            return torch.kron(_paley(m) / m ** 0.5, hadamard(n // m))
        m *= 2
    return None


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """A Hadamard matrix with random signs on its rows (orthogonal); a random orthogonal matrix
    where hadamard_any has none of order n."""
    h = hadamard_any(n)
    if h is None:
        return random_orthogonal(n, seed)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    return signs[:, None] * h


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


# The residual stream's rotation by kind (qqq-quantize --rotation): Q of order n for a seed.
ROTATIONS = {"orthogonal": random_orthogonal, "hadamard": random_hadamard}


def rotations(config, seed: int = 0, heads: bool = False, kind: str = "orthogonal"):
    """The residual stream's Q [hidden, hidden] (kind: a random orthogonal matrix, or a Hadamard
    matrix with random signs) and, with heads, the head rotation R (else None)."""
    if kind not in ROTATIONS:
        raise ValueError(f"rotation kind must be one of {tuple(ROTATIONS)}, got {kind!r}")
    q = ROTATIONS[kind](config.hidden_size, seed)
    if not heads:
        return q, None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    r = (hadamard(head_dim) if head_dim & (head_dim - 1) == 0
         else random_orthogonal(head_dim, seed + 1))
    return q, r


def untie_lm_head(model) -> None:
    """Give the lm_head a weight of its own where it shares the embedding's."""
    if getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.config.tie_word_embeddings = False


@torch.no_grad()
def rotate_ends(model, q: torch.Tensor) -> None:
    """The parts of the rotation outside the decoder layers: the embedding (it writes the residual
    stream) and the lm_head, which takes the final norm's weight and reads the stream. A tie
    between the two is broken first. Each tensor is rounded to its dtype once."""
    inner = model.model
    untie_lm_head(model)
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


def rotate_model(model, seed: int = 0, heads: bool = False, kind: str = "orthogonal") -> None:
    """Fuse the norms and rotate the residual stream of a Llama/Qwen-style model in place (and,
    with heads, each attention head's values). Ties between the embedding and lm_head are broken
    (the lm_head takes the final norm)."""
    q, r = rotations(model.config, seed, heads, kind)
    rotate_ends(model, q)
    for layer in model.model.layers:
        rotate_layer(layer, q, r)
