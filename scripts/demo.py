"""The main job: make the bundled tiny Llama, quantize it with QQQ, generate with vLLM.

    python scripts/demo.py [WORKDIR] [--group-size -1|128]
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM-CPU's default needs more RAM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("workdir", type=Path, nargs="?", default=Path("out/demo"))
    parser.add_argument("--group-size", type=int, default=128, choices=(-1, 128))
    args = parser.parse_args()

    from offline.quantize import quantize_model
    from offline.tiny_model import make_tiny_llama

    fp16_dir = args.workdir / "tiny-llama-fp16"
    qqq_dir = args.workdir / f"tiny-llama-qqq-g{args.group_size}"
    if not (fp16_dir / "config.json").exists():
        make_tiny_llama(fp16_dir)
    if not qqq_dir.exists():
        quantize_model(fp16_dir, qqq_dir, group_size=args.group_size)

    from vllm import LLM, SamplingParams

    llm = LLM(str(qqq_dir), quantization="qqq", max_model_len=256, max_num_batched_tokens=256,
              max_num_seqs=8, seed=0)
    prompts = ["The capital of France is", "the small model reads", "one token after another"]
    for out in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16)):
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")


if __name__ == "__main__":
    main()
