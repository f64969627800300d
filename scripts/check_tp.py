"""Check tensor parallelism: run the sharded model on every rank and, on rank 0, the whole model too, and
compare their logits and greedy tokens.

    torchrun --standalone --nproc_per_node=3 scripts/check_tp.py
    torchrun --standalone --nproc_per_node=2 scripts/check_tp.py --checkpoint_path checkpoints/X --json
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quantized_kv_cache  # noqa: E402
import tp  # noqa: E402
from checkpoint import load_model  # noqa: E402
from cli import DTYPES, UsageError, fail, peak_memory_gb, pick_device  # noqa: E402
from generation import generate  # noqa: E402
from prepare import prepare  # noqa: E402
from sampling import Sampling  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def prompt_logits_and_tokens(model, prompt: list, max_new_tokens: int, device: str):
    tokens = torch.tensor([prompt], device=device)
    model.setup_caches(1, len(prompt) + max_new_tokens)
    with torch.no_grad():
        logits = model(tokens, torch.arange(len(prompt), device=device))
    [generated], _ = generate(model, [prompt], max_new_tokens, Sampling(temperature=0))
    return logits.float(), generated


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct"))
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--kv_cache", default="float", choices=list(quantized_kv_cache.KV_CACHE_TYPES),
                        help="the KV cache of both models, each rank's holding its own heads")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    try:
        device, dtype = pick_device(args.device), DTYPES[args.dtype]
        tp.init(device)
        try:
            model = prepare(load_model(args.checkpoint_path, device, dtype, shard=tp.sharded_loader()), device)
            quantized_kv_cache.use(model, args.kv_cache)
            prompt = load_tokenizer(args.checkpoint_path).encode(args.prompt)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(str(error)) from None
        logits, generated = prompt_logits_and_tokens(model, prompt, args.max_new_tokens, device)
        memory = tp.gathered(round(peak_memory_gb(), 3))
        if tp.rank() == 0:
            whole = quantized_kv_cache.use(prepare(load_model(args.checkpoint_path, device, dtype), device),
                                           args.kv_cache)
            expected_logits, expected = prompt_logits_and_tokens(whole, prompt, args.max_new_tokens, device)
            result = dict(world_size=tp.world_size(), dtype=args.dtype, device=device,
                          max_abs_logit_diff=(logits - expected_logits).abs().max().item(),
                          tokens=generated, expected_tokens=expected, peak_rss_gb_per_rank=memory)
            print(json.dumps(result) if args.json else
                  f"{tp.world_size()} ranks ({device}, {args.dtype}): logits differ from the whole model's by at "
                  f"most {result['max_abs_logit_diff']:.2e}; greedy tokens "
                  f"{'identical' if generated == expected else 'DIFFER'} ({len(generated)}); peak memory per rank "
                  f"(GB) {memory}")
    except UsageError as error:
        return fail(str(error)) if tp.rank() == 0 else 2
    finally:
        tp.finish()
    return 0


if __name__ == "__main__":
    tp.leave(main())
