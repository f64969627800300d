"""Speculative decoding against plain decoding, on a prompt where guessing should help (repeating given
text) and one where it should not (open-ended writing). Greedy, batch 1; each mode runs --repeats
times, interleaved (plain, lookup, lookahead, draft, plain, ...), and the median is reported, so that a machine
that drifts still gives fair ratios. Prints a Markdown table.

    python scripts/bench_speculative.py [--draft_checkpoint_path checkpoints/NAME/model_int8.safetensors]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import load_model, stored_weights  # noqa: E402
from generation import generate  # noqa: E402
from prepare import activation_dtype, prepare  # noqa: E402
from sampling import Sampling  # noqa: E402
from speculative import DraftModel, lookahead_generate, speculative_generate  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

PASSAGE = ("The Amazon rainforest covers much of the Amazon basin of South America. The basin covers seven "
           "million square kilometres, of which five and a half million are covered by the rainforest. The "
           "region includes territory belonging to nine nations and 3,344 formally acknowledged indigenous "
           "territories. The majority of the forest, sixty percent, is in Brazil.")
PROMPTS = {
    "repeat a passage": f"Repeat the following text word for word.\n\n{PASSAGE}",
    "open-ended story": "Write a short story about a lighthouse keeper who finds a strange map.",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct"))
    parser.add_argument("--draft_checkpoint_path", type=Path,
                        default=Path("checkpoints/SmolLM2-135M-Instruct/model_q4_1.safetensors"))
    parser.add_argument("--speculate_k", type=int, default=5)
    parser.add_argument("--lookahead_n", type=int, default=3, help="lookahead: n-grams of n + 1 tokens")
    parser.add_argument("--lookahead_window", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    target, tokenizer = prepare(load_model(args.checkpoint_path), "cpu"), load_tokenizer(args.checkpoint_path)
    draft = None
    if args.draft_checkpoint_path.is_file():  # with the activations --dtype auto gives it, as generate.py does
        dtype = activation_dtype("auto", "cpu", weights=stored_weights(args.draft_checkpoint_path))
        draft = prepare(load_model(args.draft_checkpoint_path, "cpu", dtype), "cpu")
    target.setup_caches(1, 1024)
    if draft:
        draft.setup_caches(1, 1024)
    greedy = Sampling(temperature=0)
    print("| prompt | mode | tokens/s | speed-up | acceptance | tokens per target pass |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, text in PROMPTS.items():
        prompt = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": text}]))
        modes = {"plain": None, "prompt lookup": None, "lookahead": None}
        if draft:
            modes[f"draft ({args.draft_checkpoint_path.name})"] = DraftModel(draft)
        seconds, stats, tokens = {mode: [] for mode in modes}, {}, {}
        for _ in range(args.repeats):
            for mode, drafter in modes.items():
                started = time.perf_counter()
                if mode == "plain":
                    [output], _ = generate(target, [prompt], args.max_new_tokens, greedy, tokenizer.stop_ids)
                elif mode == "lookahead":
                    output, stats[mode] = lookahead_generate(target, prompt, args.max_new_tokens, args.lookahead_n,
                                                             args.lookahead_window, tokenizer.stop_ids)
                else:
                    output, stats[mode] = speculative_generate(target, prompt, args.max_new_tokens, greedy,
                                                               args.speculate_k, drafter, tokenizer.stop_ids)
                seconds[mode].append(time.perf_counter() - started)
                tokens[mode] = len(output)
        plain_rate = tokens["plain"] / statistics.median(seconds["plain"])
        for mode in modes:
            rate = tokens[mode] / statistics.median(seconds[mode])
            acceptance = f"{stats[mode].acceptance_rate:.0%}" if mode in stats else ""
            per_pass = f"{stats[mode].tokens_per_step:.2f}" if mode in stats else "1.00"
            print(f"| {label} | {mode} | {rate:.1f} | {rate / plain_rate:.2f}x | {acceptance} | {per_pass} |",
                  flush=True)


if __name__ == "__main__":
    main()
