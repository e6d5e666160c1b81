"""Inductor's reduction heuristic for the kernels in front of each QQQ GEMM.

Under vLLM's torch.compile the per-token quantization is traced (VLLM_QQQ_COMPILED_QUANT=1), so
Inductor fuses it into the norm or SiLU-and-mul kernel before the GEMM: one row reduction (the
row's absmax) over K = hidden or intermediate size. Inductor keeps a whole row in registers
("persistent" reduction, one pass) only up to 1024 entries; longer rows get a loop that reads the
row once per pass: twice for SiLU-and-mul + quantization, three times for add + RMSNorm +
quantization. At decode batch sizes each row is one program on one SM, so those passes are
back-to-back round trips of latency, not bandwidth.
"""

import torch
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

# Inductor gives a persistent row at most 16 warps: up to 16384 entries that is 32 fp32 values a
# thread and input (8 warps and 16 values up to 8192), measured faster than the loop at 14336
# (benchmarks/results/row_quant_h100.log; whether it spills registers there is not measured).
# Longer rows (Llama-3-70B's 28672) would hold 64 a thread, not tried: they keep the loop.
PERSISTENT_ROW_LIMIT = 16384


class PersistentRows(InductorChoices):
    """Inductor's choices, with persistent inner reductions for rows of up to 16384 entries."""

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
        if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
            return True
        if cooperative_reduction or not torch._inductor.config.triton.persistent_reductions:
            return False
        if features.get_reduction_hint() != ReductionHint.INNER:
            return False
        return V.graph.sizevars.statically_known_leq(features.reduction_numel,
                                                     PERSISTENT_ROW_LIMIT)
