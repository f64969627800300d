"""Qwen2 / Qwen2.5: a Llama with biases on the query, key and value projections. A tiny random Qwen2ForCausalLM
saved by transformers, converted, computes what transformers computes, through every path the Llama takes."""
import json
import subprocess
import sys

import pytest
import torch

from checkpoint import load_model, parameter_count
from conftest import ROOT, quantized_copy
from generation import generate
from model import BiasAfter, ModelArgs
from quantized_layers import Int4Linear, Int8Linear
from sampling import Sampling

IDS = list(range(3, 200, 3))


@pytest.fixture(scope="module")
def qwen2_reference(tiny_qwen2_hf_dir):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(tiny_qwen2_hf_dir, dtype=torch.float32).eval()


def logits(model, ids: list) -> torch.Tensor:
    model.setup_caches(1, 256)
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids)))[0]


def test_the_converted_config_keeps_the_biases_and_the_rope_base(tiny_qwen2_dir):
    args = ModelArgs.from_hf_config(tiny_qwen2_dir / "config.json")
    assert (args.qkv_bias, args.rope_base, args.tie_embeddings) == (True, 1e6, False)
    assert json.loads((tiny_qwen2_dir / "config.json").read_text())["model_type"] == "qwen2"


def test_logits_equal_transformers(tiny_qwen2_dir, qwen2_reference):
    with torch.no_grad():
        expected = qwen2_reference(torch.tensor([IDS])).logits[0]
    assert (logits(load_model(tiny_qwen2_dir), IDS) - expected).abs().max().item() <= 1e-4


def test_greedy_tokens_equal_transformers_generate(tiny_qwen2_dir, qwen2_reference):
    model = load_model(tiny_qwen2_dir)
    model.setup_caches(1, 64)
    [ours], _ = generate(model, [IDS[:10]], 24, Sampling(temperature=0))
    with torch.no_grad():
        theirs = qwen2_reference.generate(torch.tensor([IDS[:10]]), max_new_tokens=24, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0, 10:].tolist()


def test_cached_decoding_equals_the_full_forward(tiny_qwen2_dir):
    model = load_model(tiny_qwen2_dir)
    expected = logits(model, IDS)
    with torch.no_grad():
        prefill = model(torch.tensor([IDS[:40]]), torch.arange(40))[0]
        steps = [model(torch.tensor([[IDS[i]]]), torch.tensor([i]))[0, 0] for i in range(40, len(IDS))]
    assert torch.allclose(torch.cat([prefill, torch.stack(steps)]), expected, atol=1e-5)


def test_a_batch_of_different_lengths_equals_each_alone(tiny_qwen2_dir):
    model = load_model(tiny_qwen2_dir)
    prompts = [IDS[:7], IDS[:19], IDS[:3]]
    alone = []
    for prompt in prompts:
        model.setup_caches(1, 64)
        alone += generate(model, [prompt], 12, Sampling(temperature=0))[0]
    model.setup_caches(3, 64)
    batched, _ = generate(model, prompts, 12, Sampling(temperature=0))
    assert batched == alone


def dequantized_twin(float_model, quantized):
    """The float model given the quantized model's weights, dequantized (biases kept as they are): what the
    quantized model should compute, whatever kernels it runs."""
    for name, linear in float_model.named_modules():
        if isinstance(linear, torch.nn.Linear) and name != "output":
            form = quantized.get_submodule(name)
            layer = (form.form if isinstance(form, BiasAfter) else form).layer
            linear.weight.data = layer.dequantized()[:, :linear.in_features].float()
    return float_model


@pytest.mark.parametrize("mode, layer_type", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantized_layers_keep_their_biases(tiny_qwen2_dir, tmp_path, mode, layer_type):
    """A quantized file keeps each q/k/v bias as it was, and the quantized model, its CPU kernels swapped in,
    adds them: prefill and cached decode steps give the logits of the float model with the dequantized weights."""
    quantized = load_model(quantized_copy(tiny_qwen2_dir, tmp_path / "q", "--mode", mode, "--groupsize", "32"))
    wq = quantized.layers[0].attention.wq
    assert isinstance(wq, BiasAfter) and isinstance(wq.form.layer, layer_type)
    expected = logits(dequantized_twin(load_model(tiny_qwen2_dir), quantized), IDS)
    quantized.setup_caches(1, 256)
    with torch.no_grad():
        prefill = quantized(torch.tensor([IDS[:40]]), torch.arange(40))[0]
        steps = [quantized(torch.tensor([[IDS[i]]]), torch.tensor([i]))[0, 0] for i in range(40, len(IDS))]
    assert (torch.cat([prefill, torch.stack(steps)]) - expected).abs().max().item() <= 1e-3


def test_qwen25_shapes_have_their_published_parameter_counts():
    names = ("Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-7B")
    counts = {name: parameter_count(ModelArgs.from_name(name)) for name in names}
    assert counts == {"Qwen2.5-0.5B": 494_032_768, "Qwen2.5-1.5B": 1_543_714_304, "Qwen2.5-7B": 7_615_616_512}


def test_biases_on_every_projection_are_refused():
    with pytest.raises(ValueError, match="biases on every attention or feed-forward projection are not supported"):
        ModelArgs.from_hf_config({**ModelArgs().to_hf_config(), "attention_bias": True})


@pytest.mark.slow
def test_compiled_decode_equals_eager(tiny_qwen2_dir):
    argv = ["generate.py", "--checkpoint_path", str(tiny_qwen2_dir), "--prompt", "the quick brown",
            "--temperature", "0", "--max_new_tokens", "12", "--dtype", "fp32"]
    eager = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    compiled = subprocess.run([sys.executable, *argv, "--compile"], cwd=ROOT, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    assert compiled.stdout == eager.stdout


@pytest.mark.slow
def test_two_ranks_split_the_biases_with_their_heads(tiny_qwen2_dir):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "scripts/check_tp.py", "--checkpoint_path", str(tiny_qwen2_dir), "--json"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["max_abs_logit_diff"] <= 1e-4 and result["tokens"] == result["expected_tokens"]
