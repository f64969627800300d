"""Mixtral-style mixture of experts: a tiny random MixtralForCausalLM saved by transformers, converted (its
experts stacked per layer), computes what transformers computes, and a token runs only the experts it chose."""
import json

import pytest
import torch

from checkpoint import load_model
from conftest import IDS, forward_logits, save_hf_model_as_gguf
from generation import compile_steps, generate
from model import ModelArgs, run_experts
from sampling import Sampling


def test_the_converted_checkpoint_stacks_each_layers_experts(tiny_mixtral_dir):
    from safetensors import safe_open

    args = ModelArgs.from_hf_config(tiny_mixtral_dir / "config.json")
    assert (args.n_experts, args.experts_per_token) == (4, 2)
    assert json.loads((tiny_mixtral_dir / "config.json").read_text())["model_type"] == "mixtral"
    with safe_open(tiny_mixtral_dir / "model.safetensors", framework="pt") as converted:
        assert converted.get_slice("layers.1.feed_forward.experts.w1").get_shape() == [4, 160, 64]
        assert converted.get_slice("layers.1.feed_forward.experts.w2").get_shape() == [4, 64, 160]
        assert converted.get_slice("layers.1.feed_forward.gate.weight").get_shape() == [4, 64]


def spied_experts(model):
    """The first block's experts, recording which experts each weight lookup asks for."""
    experts = model.layers[0].feed_forward.experts
    asked, weight = [], experts.weight
    experts.weight = lambda name, index: asked.append(torch.as_tensor(index).flatten().tolist()) or weight(name, index)
    return experts, asked


@pytest.mark.parametrize("compiling", [False, True])
def test_a_decode_step_reads_only_the_chosen_experts(tiny_mixtral_dir, monkeypatch, compiling):
    """Eagerly each chosen expert runs over its tokens; in a compiled step (is_compiling), one token gathers
    its chosen experts' weights. Either way a decode step of one token reads 2 experts of 4, no more."""
    model = load_model(tiny_mixtral_dir)
    forward_logits(model, IDS[:5])
    experts, asked = spied_experts(model)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    with torch.no_grad():
        model(torch.tensor([[IDS[5]]]), torch.tensor([5]))
    read = {expert for experts_asked in asked for expert in experts_asked}
    assert len(asked) == 3 * (1 if compiling else 2) and len(read) == 2


@pytest.mark.parametrize("tokens", [1, 2, 9])
def test_the_ways_of_running_experts_agree(tiny_mixtral_dir, monkeypatch, tokens):
    """Each expert over its own tokens (eager) equals the compiled step's forms: gathered weights for a few
    tokens (1 or 2 tokens, 2 or 4 experts chosen), every expert over every token, weighted, for more (9)."""
    experts = load_model(tiny_mixtral_dir).layers[1].feed_forward.experts
    torch.manual_seed(0)
    x, chosen = torch.randn(tokens, 64), torch.stack([torch.randperm(4)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2).softmax(-1)
    with torch.no_grad():
        eager = run_experts(experts, x, chosen, weights)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        static = run_experts(experts, x, chosen, weights)
    assert torch.allclose(eager, static, atol=1e-5)


@pytest.mark.slow
def test_compiled_steps_equal_eager(tiny_mixtral_dir):
    """One row (gathered experts) and three rows (every expert, weighted), compiled as --compile compiles."""
    model = load_model(tiny_mixtral_dir)
    greedy = Sampling(temperature=0)
    for prompts in ([IDS[:9]], [IDS[:9], IDS[20:29], IDS[40:49]]):
        model.setup_caches(len(prompts), 64)
        eager, _ = generate(model, prompts, 10, greedy)
        compiled, _ = generate(model, prompts, 10, greedy, steps=compile_steps("cpu"))
        assert compiled == eager


@pytest.mark.parametrize("mode", ["disk", "cpu"])
def test_streamed_experts_give_the_in_memory_tokens(tiny_mixtral_dir, mode):
    """Offloading streams each block's stacked experts with its other weights (no budget: every block)."""
    from offload import load_offloaded

    prompts = [IDS[:9], IDS[20:27]]
    in_memory, streamed = load_model(tiny_mixtral_dir), load_offloaded(tiny_mixtral_dir, "cpu", torch.float32, mode)
    for model in (in_memory, streamed):
        model.setup_caches(2, 64)
    assert generate(streamed, prompts, 12, Sampling(temperature=0))[0] == \
        generate(in_memory, prompts, 12, Sampling(temperature=0))[0]


def test_a_mixtral_gguf_with_stacked_experts_converts_to_the_logits_of_transformers(
        tiny_mixtral_hf_dir, mixtral_reference, tmp_path):
    """llama.cpp writes Mixtral as its 'llama' architecture with an expert count, each layer's experts stacked
    in ffn_gate_exps / ffn_up_exps / ffn_down_exps and the router as ffn_gate_inp."""
    from scripts.convert_gguf import convert as convert_gguf

    gguf_path = save_hf_model_as_gguf(tiny_mixtral_hf_dir, tmp_path / "mixtral.gguf", "llama", "llama-bpe")
    out = convert_gguf(gguf_path, tmp_path / "out").parent
    args = ModelArgs.from_hf_config(out / "config.json")
    assert (args.n_experts, args.experts_per_token) == (4, 2)
    with torch.no_grad():
        expected = mixtral_reference(torch.tensor([IDS])).logits[0]
    assert (forward_logits(load_model(out), IDS) - expected).abs().max().item() <= 1e-4


def test_quantizing_a_mixture_is_refused_in_one_line(tiny_mixtral_dir, tmp_path, capsys):
    import quantize

    output = tmp_path / "q.safetensors"
    assert quantize.main(["--checkpoint_path", str(tiny_mixtral_dir), "--mode", "int8", "--output", str(output)]) == 2
    error = capsys.readouterr().err.strip()
    assert "is a mixture of experts" in error and len(error.splitlines()) == 1 and not output.exists()
