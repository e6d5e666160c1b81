"""GPTQ (Hessian-based error compensation) onto the QQQ grid of offline/grid.py.

Columns are quantized one at a time, in order of decreasing Hessian diagonal (act-order), and each
column's rounding error is spread over the columns not yet quantized through the inverse Hessian's
Cholesky factor. The grid's scales are fixed before the loop (static groups), so act-order needs no
g_idx: every column keeps the group of its original index.
"""

import torch

from offline.grid import Grid


class Hessian:
    """Running H = 2/n * sum(x x^T) over the rows x of a layer's inputs."""

    def __init__(self, columns: int, device="cpu"):
        self.h = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.h.device, torch.float32)
        new = self.n + x.shape[0]
        self.h.mul_(self.n / new).addmm_(x.t(), x, alpha=2.0 / new)
        self.n = new


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, block_size: int = 128,
         damp: float = 0.01, act_order: bool = True) -> torch.Tensor:
    """Codes [N, K] (long) for weight [N, K] on `grid`, compensating rounding errors with H."""
    w = weight.detach().to(torch.float32).clone()
    h = hessian.to(w.device, torch.float32).clone()
    n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = (torch.argsort(torch.diag(h), descending=True) if act_order
             else torch.arange(k, device=w.device))
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    # Upper Cholesky factor of H^-1: row i holds how column i's error moves the later columns.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(n, k, dtype=torch.long, device=w.device)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = int(order[b0 + i])
            c = grid.codes(wb[:, i:i + 1], col)
            codes[:, b0 + i] = c[:, 0]
            e = (wb[:, i] - grid.dequant(c, col)[:, 0]) / hb[i, i]
            wb[:, i:] -= e[:, None] * hb[i, i:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    out = torch.empty_like(codes)
    out[:, order] = codes
    return out
