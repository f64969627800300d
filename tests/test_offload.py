"""Offloaded inference: blocks streamed from disk or host memory give exactly the in-memory model's tokens,
and --offload disk keeps the process under its memory budget on a model larger than the budget."""
import re
import shutil
import subprocess
import sys

import pytest
import torch

import offload
import quantize
from checkpoint import load_model
from cli import UsageError, parse_size
from conftest import ROOT
from generate import main
from generation import generate
from offload import load_offloaded, plan_blocks
from sampling import Sampling
from scripts.random_checkpoint import write
from tokenizer import load_tokenizer


def greedy_tokens(model, tokenizer, prompts, max_new_tokens=16) -> list:
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    model.setup_caches(len(encoded), max(map(len, encoded)) + max_new_tokens)
    outputs, _ = generate(model, encoded, max_new_tokens, Sampling(temperature=0))
    return outputs


@pytest.fixture
def weights_only_budget(monkeypatch):
    """Budgets counted in weights alone: the test process's own memory (which varies) counts as zero."""
    monkeypatch.setattr(offload, "resident_memory", lambda: 0)


PROMPTS = ["the quick brown fox", "Hello world! How are"]


@pytest.mark.parametrize("mode", ["disk", "cpu"])
@pytest.mark.parametrize("blocks_in_budget", [None, 1, 3])  # None: no budget, every block streams
def test_streamed_tiny_model_gives_the_in_memory_tokens(tiny_dir, weights_only_budget, mode, blocks_in_budget):
    tokenizer = load_tokenizer(tiny_dir)
    expected = greedy_tokens(load_model(tiny_dir), tokenizer, PROMPTS)
    budget = None
    if blocks_in_budget is not None:  # embedding (tied head) + norm, then whole blocks
        in_memory = load_model(tiny_dir)
        resident = sum(t.numel() * 4 for n, t in in_memory.state_dict().items()
                       if not n.startswith(("layers.", "output.")))
        block = sum(t.numel() * 4 for t in in_memory.layers[0].state_dict().values())
        budget = (resident + blocks_in_budget * block) / offload.HEADROOM + 1
    streamed = load_offloaded(tiny_dir, "cpu", torch.float32, mode, budget)
    assert greedy_tokens(streamed, tokenizer, PROMPTS) == expected


def test_one_block_budget_loads_each_block_before_it_runs(tiny_dir, weights_only_budget):
    in_memory = load_model(tiny_dir)
    block = sum(t.numel() * 4 for t in in_memory.layers[0].state_dict().values())
    resident = sum(t.numel() * 4 for n, t in in_memory.state_dict().items() if not n.startswith(("layers.", "output.")))
    streamed = load_offloaded(tiny_dir, "cpu", torch.float32, "disk", (resident + block) / offload.HEADROOM + 1)
    assert len(streamed.streamer.buffers) == 1 and streamed.streamer.pool is None
    tokenizer = load_tokenizer(tiny_dir)
    assert greedy_tokens(streamed, tokenizer, PROMPTS) == greedy_tokens(in_memory, tokenizer, PROMPTS)


@pytest.mark.parametrize("mode", ["disk", "cpu"])
def test_streamed_smollm2_gives_the_in_memory_tokens(smollm2_dir, mode):
    tokenizer = load_tokenizer(smollm2_dir)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    expected = greedy_tokens(load_model(smollm2_dir), tokenizer, prompts, 24)
    assert greedy_tokens(load_offloaded(smollm2_dir, "cpu", torch.float32, mode), tokenizer, prompts, 24) == expected


@pytest.mark.parametrize("mode, groupsize", [("int8", None), ("int4", 64)])
def test_streamed_quantized_smollm2_gives_its_in_memory_tokens(smollm2_dir, tmp_path, mode, groupsize):
    """Streamed blocks compute with the plain (dequantized) products, as the in-memory model loaded (not
    prepared for brisk's CPU kernels) does."""
    directory = tmp_path / "smollm2"
    shutil.copytree(smollm2_dir, directory)
    quantize.main(["--checkpoint_path", str(directory), "--mode", mode, "--output", str(directory / "q.safetensors"),
                   *(["--groupsize", str(groupsize)] if groupsize else [])])
    tokenizer = load_tokenizer(directory)
    expected = greedy_tokens(load_model(directory / "q.safetensors"), tokenizer, PROMPTS, 24)
    streamed = load_offloaded(directory / "q.safetensors", "cpu", torch.float32, "disk")
    assert greedy_tokens(streamed, tokenizer, PROMPTS, 24) == expected
    fp32_block = 4 * sum(t.numel() for t in load_model(smollm2_dir).layers[0].state_dict().values())
    assert streamed.streamer.bytes_per_pass < 30 * fp32_block / (3 if mode == "int8" else 6)


def test_sizes_are_read_in_decimal_and_binary_units():
    assert parse_size("150MB") == 150_000_000
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("1.5GiB") == 3 * 2**29
    with pytest.raises(UsageError, match="--memory_budget '2 potatoes' is not a size: write it like 150MB"):
        parse_size("2 potatoes")


def test_budget_plans_resident_blocks_and_two_buffers():
    megabyte = 1_000_000  # 90% of a budget goes to weights, the rest to activations
    assert plan_blocks(100 * megabyte, 0, 10 * megabyte, 10 * megabyte, 12) == (6, 2)  # 8 of 12 fit: 6 stay, 2 stream
    assert plan_blocks(100 * megabyte, 0, 10 * megabyte, 5 * megabyte, 8) == (8, 0)  # everything fits
    assert plan_blocks(25 * megabyte, 0, 10 * megabyte, 10 * megabyte, 8) == (0, 1)  # one buffer, no prefetch


def test_a_budget_below_one_block_is_one_line_naming_the_block(capsys, smollm2_dir):
    assert main(["--checkpoint_path", str(smollm2_dir), "--offload", "disk", "--memory_budget", "150MB"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: --memory_budget 150MB cannot hold one transformer block \(14 MB\) besides the "
                        r"embedding, norm and head \(113 MB\) and the running process \(\d+ MB\): give at least "
                        r"\d+MB", error), error


def test_offload_with_compile_is_refused(capsys, tiny_dir):
    assert main(["--checkpoint_path", str(tiny_dir), "--offload", "disk", "--compile"]) == 2
    assert "--offload streams blocks eagerly in one process: drop --compile / --aot / torchrun" in capsys.readouterr().err


def test_generate_with_batch_size_prints_every_prompt_as_one_batch_would(tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick brown\nhello world\nthe lazy dog\none two three\nfive six\n")
    argv = [sys.executable, "generate.py", "--checkpoint_path", str(tiny_dir), "--prompt_file", str(prompts),
            "--temperature", "0", "--max_new_tokens", "8"]
    one_batch = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    streamed = subprocess.run(argv + ["--offload", "disk", "--batch_size", "2"], cwd=ROOT, capture_output=True,
                              text=True)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == one_batch.stdout
    assert "prompts 5-5:" in streamed.stderr and "MB per token" in streamed.stderr


@pytest.mark.slow
def test_disk_offload_stays_under_the_budget_on_a_larger_model(smollm2_dir, tmp_path):
    checkpoint = write("SmolLM2-360M", tmp_path / "random-360M", smollm2_dir, torch.float32)
    size_gb = checkpoint.stat().st_size / 1e9
    run = subprocess.run([sys.executable, "generate.py", "--checkpoint_path", str(checkpoint), "--offload", "disk",
                          "--memory_budget", "900MB", "--max_new_tokens", "4", "--temperature", "0"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    peak_gb = float(re.search(r"peak memory ([\d.]+) GB", run.stderr).group(1))
    kv_cache_gb = float(re.search(r"KV cache (\d+) MB", run.stderr).group(1)) / 1e3
    assert size_gb > 1.4 and peak_gb < 0.9 + kv_cache_gb, run.stderr
