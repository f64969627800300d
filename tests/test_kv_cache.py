"""Quantized KV caches (quantized_kv_cache.py): what attention reads back is each key and value within half a
quantization step; with one, decoding equals itself batched, speculative, streamed, served and split across
ranks; the memory figures and --memory_budget count the quantized bytes."""
import argparse
import re

import pytest
import torch

import quantized_kv_cache
import serve
from checkpoint import load_model
from cli import UsageError
from engine import ModelRunner
from generate import main
from generation import cache_bytes_per_slot, compile_steps, generate, kv_cache_bytes
from model import Transformer
from model_args import ModelArgs
from offload import load_offloaded
from prepare import prepare
from quantized_kv_cache import Int4KVCache, Int8KVCache
from sampling import Sampling
from speculative import speculative_generate
from test_tp import sharded_check
from tokenizer import load_tokenizer

GREEDY = Sampling(temperature=0)


def written(cache, x: torch.Tensor) -> torch.Tensor:
    """x (1, heads, seq, head_dim) written at slots 2 ... and read back: what attention sees."""
    k, _ = cache.update(torch.arange(2, 2 + x.shape[2]), x, x)
    return k[:, :, 2:2 + x.shape[2]]


def test_int8_keys_come_back_within_half_a_step_of_their_absmax_over_127():
    x = torch.randn(1, 3, 5, 64) * torch.tensor([1.0, 10.0, 0.01])[None, :, None, None]
    read = written(Int8KVCache(1, 16, 3, 64, torch.float32), x)
    step = x.abs().amax(-1, keepdim=True) / 127  # one scale per head and slot
    assert ((read - x).abs() <= step / 2 * 1.0001).all()
    assert not torch.equal(read, x)


@pytest.mark.parametrize("head_dim, asked, groupsize", [(128, 64, 64), (32, 64, 32), (96, 64, 96), (64, 16, 16)])
def test_int4_keys_come_back_within_half_a_step_of_their_group(head_dim, asked, groupsize):
    x = torch.randn(1, 2, 5, head_dim) * 3 + 1
    read = written(Int4KVCache(1, 16, 2, head_dim, torch.float32, asked), x)
    groups = x.unflatten(-1, (-1, groupsize))
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # min / max per group along the head dimension
    error = (read - x).abs().unflatten(-1, (-1, groupsize))
    assert (error <= step[..., None] / 2 * 1.0001 + 1e-6).all()


@pytest.mark.parametrize("cache_type", [Int8KVCache, Int4KVCache])
def test_a_row_and_slots_not_written_stay_empty(cache_type):
    cache = cache_type(2, 8, 1, 64, torch.float32)
    cache.update(torch.tensor([[1, 2]]), torch.randn(1, 1, 2, 64), torch.randn(1, 1, 2, 64), cache_row=1)
    k, v = cache.update(torch.tensor([[5]]), torch.zeros(1, 1, 1, 64), torch.zeros(1, 1, 1, 64), cache_row=1)
    assert (k[0, 0, [0, 3, 4, 5, 6, 7]] == 0).all() and (k[0, 0, [1, 2]] != 0).any()
    k_row0, _ = cache.update(torch.tensor([0]), torch.zeros(1, 1, 1, 64), torch.zeros(1, 1, 1, 64))
    assert (k_row0 == 0).all()


def test_cache_bytes_count_what_each_type_stores():
    model = Transformer(ModelArgs.from_name("SmolLM2-135M"))  # 30 layers, 3 KV heads of 64, fp32
    # values, scales (and minimums) of each head and slot
    per_head_and_slot = {"float": 64 * 4, "int8": 64 + 4, "int4": 64 // 2 + 2 * 4, "int4-g16": 64 // 2 + 4 * 2 * 4}
    for kind, size in per_head_and_slot.items():
        quantized_kv_cache.use(model, kind)
        assert cache_bytes_per_slot(model) == 30 * 3 * 2 * size
        assert kv_cache_bytes(model, batch=2, slots=100) == 30 * 3 * 2 * size * 200


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return prepare(load_model(smollm2_dir), "cpu"), load_tokenizer(smollm2_dir)


def greedy(model, prompts: list, n: int, kind: str) -> list:
    quantized_kv_cache.use(model, kind)
    model.setup_caches(len(prompts), max(map(len, prompts)) + n)
    outputs, _ = generate(model, prompts, n, GREEDY)
    return outputs


def top_two_gap(model, tokens: list) -> float:
    """How far the best next token's logit is ahead of the second best's, with the float cache."""
    quantized_kv_cache.use(model, "float")
    model.setup_caches(1, len(tokens))
    with torch.no_grad():
        best, second = model(torch.tensor([tokens]), torch.arange(len(tokens)))[0, -1].topk(2).values.tolist()
    return best - second


@pytest.mark.parametrize("text", ["The capital of France is", "def fibonacci(n):"])
def test_int8_cache_gives_the_fp32_caches_first_32_greedy_tokens_on_smollm2(smollm2, text):
    """Or the same tokens up to a near-tie: a token whose two best logits, with the fp32 cache, are within
    0.1 of each other, which fp32 rounding alone can reorder."""
    model, tokenizer = smollm2
    prompt = tokenizer.encode(text)
    [quantized], [exact] = greedy(model, [prompt], 32, "int8"), greedy(model, [prompt], 32, "float")
    same = next((i for i, (a, b) in enumerate(zip(quantized, exact)) if a != b), 32)
    assert same == 32 or top_two_gap(model, prompt + exact[:same]) < 0.1


def test_int4_cache_changes_what_smollm2_reads(smollm2):
    """The test above would pass with a cache that stored nothing quantized: this one fails then."""
    model, tokenizer = smollm2
    prompt = tokenizer.encode("Once upon a time, there was")
    assert greedy(model, [prompt], 8, "int4") != greedy(model, [prompt], 8, "float")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_batch_with_a_quantized_cache_equals_each_prompt_alone(tiny_dir, kind):
    model = prepare(load_model(tiny_dir), "cpu")
    prompts = [[5, 17, 29, 3], [60], [200, 7, 31]]
    assert greedy(model, prompts, 12, kind) == [greedy(model, [prompt], 12, kind)[0] for prompt in prompts]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_speculative_decoding_with_a_quantized_cache_equals_its_plain_greedy(smollm2, kind):
    model, tokenizer = smollm2
    text = "Repeat exactly: the quick brown fox jumps over the lazy dog by the river."
    prompt = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": text}]))
    expected = greedy(model, [prompt], 24, kind)[0]
    model.setup_caches(1, len(prompt) + 32)
    output, stats = speculative_generate(model, prompt, 24, GREEDY, 5)
    assert output == expected and stats.accepted > 0


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_streamed_model_with_a_quantized_cache_equals_the_in_memory_one(tiny_dir, kind):
    prompts = [[5, 17, 29, 3], [60, 2]]
    streamed = load_offloaded(tiny_dir, "cpu", torch.float32, "disk")
    assert greedy(streamed, prompts, 12, kind) == greedy(prepare(load_model(tiny_dir), "cpu"), prompts, 12, kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_compiled_decode_with_a_quantized_cache_equals_eager(tiny_dir, kind):
    model = quantized_kv_cache.use(prepare(load_model(tiny_dir), "cpu"), kind)
    model.setup_caches(2, 64)
    eager, _ = generate(model, [[5, 17, 29], [8]], 12, GREEDY)
    compiled, _ = generate(model, [[5, 17, 29], [8]], 12, GREEDY, steps=compile_steps("cpu"))
    assert compiled == eager


def test_a_preempted_rows_quantized_slots_come_back_whole(tiny_dir):
    """The engine swaps every buffer of a row out and back: values, scales and minimums."""
    model = quantized_kv_cache.use(prepare(load_model(tiny_dir), "cpu"), "int4")
    runner = ModelRunner(model, rows=2, max_seq_length=64)
    with torch.no_grad():
        runner.prefill(0, [5, 17, 29, 3, 60, 2, 7, 31], 0, 64)
    cache = model.layers[0].attention.kv_cache
    kept = [buffer[0, :, :8].clone() for buffer in cache.buffers()]
    runner.swap_out(0, 8, key=1)
    for buffer in cache.buffers():
        buffer.zero_()
    runner.swap_in(1, 8, key=1)
    assert len(kept) == 6  # keys and values: packed values, scales, minimums
    assert all(torch.equal(buffer[1, :, :8], slots) and slots.count_nonzero() for buffer, slots in
               zip(cache.buffers(), kept))


@pytest.mark.slow
def test_two_ranks_with_an_int8_cache_equal_one(tiny_dir):
    result = sharded_check(2, tiny_dir, kv_cache="int8")
    assert result["max_abs_logit_diff"] <= 1e-4
    assert result["tokens"] == result["expected_tokens"]


def test_memory_budget_picks_the_largest_batch_that_fits(tiny_dir, capsys, tmp_path):
    prompts = ["one", "two", "three", "four", "five"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    slots = max(len(load_tokenizer(tiny_dir).encode(prompt)) for prompt in prompts) + 20
    row = slots * cache_bytes_per_slot(quantized_kv_cache.use(prepare(load_model(tiny_dir), "cpu"), "int4"))
    argv = ["--checkpoint_path", str(tiny_dir), "--prompt_file", str(tmp_path / "prompts.txt"),
            "--max_new_tokens", "20", "--kv_cache", "int4", "--temperature", "0", "--dtype", "fp32"]
    assert main(argv + ["--memory_budget", f"{2 * row + 10}B"]) == 0
    err = capsys.readouterr().err
    assert f"KV cache (int4): 2 rows x {slots} slots, {2 * row / 1e6:.1f} MB" in err
    assert len(re.findall(r"prompts \d-\d: time to first token", err)) == 3  # 2 + 2 + 1
    assert main(argv + ["--memory_budget", f"{row - 1}B"]) == 2
    last_line = capsys.readouterr().err.splitlines()[-1]  # after the "loaded" line: the model gives the row's size
    assert re.fullmatch(rf"error: --memory_budget \d+B cannot hold one row of KV cache for {slots} tokens \(0\.\d+ MB "
                        r"with --kv_cache int4\): raise it, or quantize the cache \(--kv_cache\)", last_line)


def test_the_server_fills_its_memory_budget_with_cache_rows(tiny_dir):
    model = quantized_kv_cache.use(prepare(load_model(tiny_dir), "cpu"), "int8")
    row = cache_bytes_per_slot(model) * 64  # one row of 64 tokens
    args = argparse.Namespace(memory_budget=f"{5 * row + 1}B", slots=None, kv_cache="int8")
    assert serve.rows_within_budget(args, model, 64) == 5
    args.slots = 3  # --slots, given, is the most it takes
    assert serve.rows_within_budget(args, model, 64) == 3
    args.memory_budget = f"{row - 1}B"
    with pytest.raises(UsageError, match="cannot hold one row of KV cache for 64 tokens"):
        serve.rows_within_budget(args, model, 64)
