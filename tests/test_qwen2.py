"""Qwen2 / Qwen2.5: a Llama with biases on the query, key and value projections. A tiny random Qwen2ForCausalLM
saved by transformers, converted, computes what transformers computes, through every path the Llama takes."""
import json
import subprocess
import sys

import pytest
import torch

from checkpoint import load_model, parameter_count
from cpu_kernels import QuantizedCPULinear, native_kernels
from conftest import IDS, ROOT, dequantized_twin, forward_logits, quantized_copy, save_hf_model_as_gguf
from model import BiasAfter
from model_args import ModelArgs
from prepare import prepare
from quantized_layers import Int4Linear, Int8Linear
from scripts.convert_gguf import convert as convert_gguf


def test_the_converted_config_keeps_the_biases_and_the_rope_base(tiny_qwen2_dir):
    args = ModelArgs.from_hf_config(tiny_qwen2_dir / "config.json")
    assert (args.qkv_bias, args.rope_base, args.tie_embeddings) == (True, 1e6, False)
    assert json.loads((tiny_qwen2_dir / "config.json").read_text())["model_type"] == "qwen2"


def test_a_qwen2_gguf_converts_to_the_logits_of_transformers(tiny_qwen2_hf_dir, qwen2_reference, tmp_path):
    """llama.cpp's 'qwen2' architecture: q/k/v biases stored beside the weights, Q and K rows in Hugging
    Face's order (unlike its 'llama' architecture, which interleaves them)."""
    gguf_path = save_hf_model_as_gguf(tiny_qwen2_hf_dir, tmp_path / "qwen2.gguf", "qwen2", "qwen2")
    out = convert_gguf(gguf_path, tmp_path / "out").parent
    args = ModelArgs.from_hf_config(out / "config.json")
    assert (args.qkv_bias, args.rope_base, args.tie_embeddings) == (True, 1e6, False)
    with torch.no_grad():
        expected = qwen2_reference(torch.tensor([IDS])).logits[0]
    assert (forward_logits(prepare(load_model(out), "cpu"), IDS) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("mode, layer_type", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantized_layers_keep_their_biases(tiny_qwen2_dir, tmp_path, mode, layer_type):
    """A quantized file keeps each q/k/v bias as it was, and the quantized model's plain layers add them:
    prefill and cached decode steps give the logits of the float model with the dequantized weights."""
    quantized = load_model(quantized_copy(tiny_qwen2_dir, tmp_path / "q", "--mode", mode, "--groupsize", "32"))
    wq = quantized.layers[0].attention.wq
    assert isinstance(wq, layer_type) and wq.bias is not None
    expected = forward_logits(dequantized_twin(load_model(tiny_qwen2_dir), quantized), IDS)
    quantized.setup_caches(1, 256)
    with torch.no_grad():
        prefill = quantized(torch.tensor([IDS[:40]]), torch.arange(40))[0]
        steps = [quantized(torch.tensor([[IDS[i]]]), torch.tensor([i]))[0, 0] for i in range(40, len(IDS))]
    assert (torch.cat([prefill, torch.stack(steps)]) - expected).abs().max().item() <= 1e-3


@pytest.mark.skipif(not native_kernels(), reason="brisk's CPU kernels are unavailable here")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_kernels_forms_add_the_biases_after_the_product(tiny_qwen2_dir, tmp_path, mode):
    """brisk's kernel form computes x times the weight only: the layer's bias follows it (BiasAfter). On
    activations the kernel rounds to int8 exactly (integers within +-127, 127 among them, times 2^-4), it
    gives the plain layer's outputs, bias included, to the rounding of the scales it reads in fp16."""
    path = quantized_copy(tiny_qwen2_dir, tmp_path / "q", "--mode", mode, "--groupsize", "32")
    wq = prepare(load_model(path), "cpu").layers[0].attention.wq
    assert isinstance(wq, BiasAfter) and isinstance(wq.form, QuantizedCPULinear)
    plain = load_model(path).layers[0].attention.wq
    x = torch.randint(-127, 128, (3, wq.form.in_features)).float()
    x[:, ::32] = 127
    with torch.no_grad():
        expected = plain(x / 16)
        error = (wq(x / 16) - expected).abs().max()  # the kernel reads the scales in fp16 (11 bits)
    assert error <= 2**-10 * expected.abs().max() and error < plain.bias.abs().max() / 10


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
