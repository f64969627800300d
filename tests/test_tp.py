"""Tensor parallelism: processes launched by torchrun (gloo on CPU) compute what one process computes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, quantized_copy
from model_args import ModelArgs
from quantized_layers import NF4Linear
from tp import check_world_size, resized


def torchrun(ranks: int, *argv, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               *[str(arg) for arg in argv]]
    env = {**os.environ, **(env or {})}
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if "exitcode  : -6" in run.stderr:  # a rank aborted (SIGABRT): seen rarely in long local suites, once
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return run


def sharded_check(ranks: int, checkpoint, dtype: str = "fp32", max_new_tokens: int = 16,
                  prompt: str = "The capital of France is", kv_cache: str = "float", env=None) -> dict:
    """scripts/check_tp.py: the sharded model's logits and greedy tokens against the whole model's."""
    run = torchrun(ranks, "scripts/check_tp.py", "--checkpoint_path", checkpoint, "--dtype", dtype, "--json",
                   "--max_new_tokens", max_new_tokens, "--prompt", prompt, "--kv_cache", kv_cache, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_int8(tiny_dir, tmp_path_factory):
    return quantized_copy(tiny_dir, tmp_path_factory.mktemp("tp") / "tiny", "--mode", "int8")


def test_two_ranks_equal_one_on_the_tiny_model(tiny_dir):
    result = sharded_check(2, tiny_dir)
    assert result["max_abs_logit_diff"] <= 1e-4
    assert result["tokens"] == result["expected_tokens"]


def test_two_ranks_in_bf16_give_the_same_greedy_tokens(tiny_dir):
    result = sharded_check(2, tiny_dir, dtype="bf16")
    assert result["tokens"] == result["expected_tokens"]


# brisk's CPU kernels round activations to int8, a step function: the ranks' all-reduced sums, equal to the
# whole model's up to float rounding, can round an activation the other way. Quantized checkpoints are
# compared exactly through the plain (dequantizing) products.
PLAIN_LAYERS = {"BRISK_CPU_KERNELS": "off"}


def test_two_ranks_share_an_int8_checkpoint(tiny_int8):
    result = sharded_check(2, tiny_int8, env=PLAIN_LAYERS)
    assert result["max_abs_logit_diff"] <= 1e-4
    assert result["tokens"] == result["expected_tokens"]


@pytest.mark.slow
def test_three_ranks_share_an_nf4_checkpoint_with_float_absmaxes(smollm2_dir, tmp_path):
    checkpoint = quantized_copy(smollm2_dir, tmp_path / "smollm2", "--mode", "nf4", "--no_double_quant")
    result = sharded_check(3, checkpoint, max_new_tokens=8)
    assert result["max_abs_logit_diff"] <= 1e-4
    assert result["tokens"] == result["expected_tokens"]


def test_nf4_absmaxes_in_8_bits_are_not_split():
    """Their blocks of 256 run across rows and groups: no rank's share holds whole blocks in general."""
    with pytest.raises(ValueError, match="quantize with --mode nf4 --no_double_quant for tensor parallelism"):
        resized(NF4Linear(64, 64, 32), 64, 32)


@pytest.mark.slow
def test_three_ranks_equal_one_on_smollm2(smollm2_dir):
    result = sharded_check(3, smollm2_dir, max_new_tokens=24)
    assert result["max_abs_logit_diff"] <= 1e-4
    assert result["tokens"] == result["expected_tokens"]
    assert len(result["peak_rss_gb_per_rank"]) == 3


@pytest.mark.slow
def test_three_ranks_in_bf16_give_smollm2s_greedy_tokens(smollm2_dir):
    # In bf16 each rank's partial sum is rounded before the all-reduce, so logits move by up to ~0.8 and
    # only confident tokens are certain to match: counting, whose smallest top-2 margin is 1.9 logits.
    result = sharded_check(3, smollm2_dir, dtype="bf16", prompt="1, 2, 3, 4, 5, 6,")
    assert result["tokens"] == result["expected_tokens"]


@pytest.mark.slow
def test_three_ranks_equal_one_on_smollm2_int8(smollm2_int8):
    result = sharded_check(3, smollm2_int8, max_new_tokens=24, env=PLAIN_LAYERS)
    assert result["max_abs_logit_diff"] <= 1e-4
    assert result["tokens"] == result["expected_tokens"]


def test_world_size_must_divide_the_heads():
    smollm2 = ModelArgs.from_name("SmolLM2-135M")
    check_world_size(smollm2, 3)
    with pytest.raises(ValueError, match=r"world size 2 does not divide the model's 9 attention heads "
                                         r"\(9 heads, 3 KV heads, 1536 feed-forward units\): "
                                         r"use --nproc_per_node in \[1, 3\]"):
        check_world_size(smollm2, 2)


def test_world_size_must_divide_the_kv_heads():
    with pytest.raises(ValueError, match="world size 16 does not divide the model's 8 KV heads"):
        check_world_size(ModelArgs.from_name("Llama-3-8B"), 16)


def test_generate_refuses_two_ranks_for_smollm2_in_one_line(smollm2_dir):
    run = torchrun(2, "generate.py", "--checkpoint_path", smollm2_dir, "--max_new_tokens", 2)
    assert run.returncode != 0
    assert ("error: world size 2 does not divide the model's 9 attention heads (9 heads, 3 KV heads, "
            "1536 feed-forward units): use --nproc_per_node in [1, 3]\n") in run.stderr
    assert "Traceback" not in run.stderr.split("error: world size")[0]  # nothing from inside brisk before it


def test_int4_groups_that_a_share_would_cut_are_refused(tiny_dir, tmp_path):
    int4 = quantized_copy(tiny_dir, tmp_path / "tiny", "--mode", "int4", "--groupsize", "32")
    run = torchrun(2, "scripts/check_tp.py", "--checkpoint_path", int4)
    assert run.returncode != 0
    assert ("error: layers.0.feed_forward.w2 cannot be split into 2 shares of whole quantization groups "
            "(groupsize 32, 80 input features per rank)") in run.stderr


def test_generate_under_torchrun_prints_the_single_process_text_once(tiny_dir):
    argv = ["--checkpoint_path", tiny_dir, "--prompt", "the quick brown", "--temperature", "0",
            "--max_new_tokens", 12]
    alone = subprocess.run([sys.executable, "generate.py", *map(str, argv)], cwd=ROOT, capture_output=True,
                           text=True)
    sharded = torchrun(2, "generate.py", *argv)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert sharded.stdout == alone.stdout
    assert "per rank, 2 ranks" in sharded.stderr


def test_sampling_under_torchrun_follows_the_seed(tiny_dir):
    argv = ["--checkpoint_path", tiny_dir, "--prompt", "the quick brown", "--seed", 7, "--max_new_tokens", 12]
    alone = subprocess.run([sys.executable, "generate.py", *map(str, argv)], cwd=ROOT, capture_output=True,
                           text=True)
    assert torchrun(2, "generate.py", *argv).stdout == alone.stdout


def test_speculative_decoding_under_torchrun(tiny_dir):
    argv = ["--checkpoint_path", tiny_dir, "--prompt", "the quick brown fox the quick brown fox the quick",
            "--temperature", "0", "--max_new_tokens", 12, "--speculative", "prompt_lookup"]
    alone = subprocess.run([sys.executable, "generate.py", *map(str, argv)], cwd=ROOT, capture_output=True,
                           text=True)
    sharded = torchrun(2, "generate.py", *argv)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert sharded.stdout == alone.stdout


@pytest.mark.slow
def test_compiled_decode_under_torchrun(tiny_dir):
    argv = ["--checkpoint_path", tiny_dir, "--prompt", "the quick brown", "--temperature", "0",
            "--max_new_tokens", 12, "--dtype", "fp32"]
    alone = subprocess.run([sys.executable, "generate.py", *map(str, argv)], cwd=ROOT, capture_output=True,
                           text=True)
    sharded = torchrun(2, "generate.py", *argv, "--compile")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert sharded.stdout == alone.stdout


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two CUDA devices")
def test_two_ranks_over_nccl_equal_one(tiny_dir):
    run = torchrun(2, "scripts/check_tp.py", "--checkpoint_path", tiny_dir, "--device", "cuda", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["max_abs_logit_diff"] <= 1e-3 and result["tokens"] == result["expected_tokens"]
