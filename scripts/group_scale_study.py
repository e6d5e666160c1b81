"""What integer group scales would cost in weight error: a planning measurement for a cheaper g128
decode (an integer s_group makes w8 = (code - 8) * s_group an exact integer product, no fp16 step).

    python scripts/group_scale_study.py [MODEL_DIR]   (default .cache/qwen2.5-coder-1.5b-fp16,
                                                       from scripts/fetch_real_model.py)

For every decoder linear layer, round-to-nearest g128 with the format's fp16 group scales against
the same with integer scales: ceil(s) (never narrower than the group's range) and round(s), both
within [1, 18] so every product stays in int8 (code 0 is already barred above 16). Prints the
relative squared error sum((W - Q)^2) / sum(W^2) per projection and overall, with per-channel RTN
for scale.
"""

import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from offline.grid import (  # noqa: E402
    _channel_codes, _fp16_group_scales, _group_codes, _group_values)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def errors(w: torch.Tensor) -> dict[str, float]:
    """Squared RTN error of w [N, K] for each kind of scale."""
    w = w.float()
    n, k = w.shape
    channel = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    w3 = w.reshape(n, k // 128, 128)
    gmax = w3.abs().amax(dim=2).clamp_min(1e-12)
    fp16 = _fp16_group_scales(gmax, channel).float()
    ch = channel[:, None, None]
    out = {}
    for name, gs in (("fp16", fp16), ("int_ceil", fp16.ceil().clamp(1, 18)),
                     ("int_round", fp16.round().clamp(1, 18))):
        gs = gs[:, :, None]
        out[name] = (w3 - _group_values(_group_codes(w3, ch, gs), ch, gs)).pow(2).sum().item()
    step = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 7
    out["per_channel"] = (w - _channel_codes(w, step) * step).pow(2).sum().item()
    out["weight"] = w.pow(2).sum().item()
    return out


def main():
    model = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/qwen2.5-coder-1.5b-fp16")
    totals = {p: {} for p in PROJECTIONS}
    for file in sorted(model.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                proj = next((p for p in PROJECTIONS if key.endswith(f"{p}.weight")), None)
                if proj is None:
                    continue
                for name, v in errors(f.get_tensor(key)).items():
                    totals[proj][name] = totals[proj].get(name, 0.0) + v
    kinds = ("fp16", "int_ceil", "int_round", "per_channel")
    print(f"model: {model}")
    print("| projection | " + " | ".join(kinds) + " | int_ceil / fp16 | int_round / fp16 |")
    print("|---" * (len(kinds) + 3) + "|")
    overall = {}
    for proj, t in list(totals.items()) + [("all", overall)]:
        if proj != "all":
            for name, v in t.items():
                overall[name] = overall.get(name, 0.0) + v
        rel = {name: t[name] / t["weight"] for name in kinds}
        print(f"| {proj} | " + " | ".join(f"{rel[x]:.3e}" for x in kinds) +
              f" | {rel['int_ceil'] / rel['fp16']:.3f} | {rel['int_round'] / rel['fp16']:.3f} |")


if __name__ == "__main__":
    main()
