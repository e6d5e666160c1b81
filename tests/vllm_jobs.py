"""Jobs the tests run in a fresh interpreter, each starting its own vLLM engine.

    python tests/vllm_jobs.py generate MODEL_DIR QUANTIZATION DTYPE PROMPT_IDS_JSON [TP [LORA_DIR]]
        prints one line: RESULT <json list of generated token id lists>; TP: tensor-parallel
        ranks (default 1); LORA_DIR: a PEFT LoRA adapter every request runs with
    python tests/vllm_jobs.py ppl MODEL_DIR DTYPE WINDOWS_JSON
        prints RESULT <json {"ppl": ...}> from vLLM's prompt logprobs over the token windows
    python tests/vllm_jobs.py load MODEL_DIR
        starts an engine with quantization="qqq"; exits non-zero with vLLM's error if it fails
"""

import json
import os
import sys


def make_llm(model_dir, quantization, dtype, **kw):
    import torch
    from vllm import LLM
    if torch.cuda.is_available():
        kw.setdefault("attention_backend", "TRITON_ATTN")  # the GPU kit has no FlashAttention
        kw.setdefault("gpu_memory_utilization", 0.3)
    kw.setdefault("max_model_len", 256)
    return LLM(model_dir, quantization=None if quantization == "auto" else quantization,
               dtype=dtype, max_num_batched_tokens=max(256, kw["max_model_len"]), max_num_seqs=8,
               seed=0, **kw)


def main():
    job, model_dir = sys.argv[1], sys.argv[2]
    if job == "generate":
        quantization, dtype, prompts = sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
        tp = int(sys.argv[6]) if len(sys.argv) > 6 else 1
        lora_dir = sys.argv[7] if len(sys.argv) > 7 else None
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        lora = {} if lora_dir is None else dict(enable_lora=True, max_lora_rank=16)
        llm = make_llm(model_dir, quantization, dtype, tensor_parallel_size=tp, **lora)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
                            lora_request=LoRARequest("adapter", 1, lora_dir) if lora_dir else None)
        config = llm.llm_engine.vllm_config
        # The plugin's graph pass, if installed: how many pairs it fused (read here only where the
        # engine runs in this process, VLLM_ENABLE_V1_MULTIPROCESSING=0).
        fusion = config.compilation_config.inductor_compile_config.get(
            "post_grad_custom_post_pass")
        print("RESULT", json.dumps({"quantization": config.model_config.quantization,
                                    "fused": getattr(fusion, "fused", None),
                                    "tokens": [list(o.outputs[0].token_ids) for o in outs]}))
    elif job == "ppl":
        import math

        from vllm import SamplingParams
        dtype, windows = sys.argv[3], json.loads(sys.argv[4])
        llm = make_llm(model_dir, "qqq", dtype, max_model_len=max(len(w) for w in windows) + 8)
        outs = llm.generate([{"prompt_token_ids": w} for w in windows],
                            SamplingParams(max_tokens=1, prompt_logprobs=0))
        nll, count = 0.0, 0
        for w, o in zip(windows, outs):
            for t in range(1, len(w)):
                nll -= o.prompt_logprobs[t][w[t]].logprob
                count += 1
        print("RESULT", json.dumps({"ppl": math.exp(nll / count), "tokens": count}))
    elif job == "load":
        make_llm(model_dir, "qqq", "auto", enforce_eager=True)
        print("LOADED")
    else:
        raise SystemExit(f"unknown job {job}")


if __name__ == "__main__":
    main()
    # The job is done and the engine has shut down; skip the interpreter's teardown, where the CPU
    # build once aborted ("terminate called without an active exception", SIGABRT) after printing
    # its RESULT. Errors before this point still exit non-zero.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
