"""Mixtral-style mixture of experts: a tiny random MixtralForCausalLM saved by transformers, converted (its
experts stacked per layer), computes what transformers computes, and a token runs only the experts it chose."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_model
from cpu_kernels import CPUExperts, native_kernels
from conftest import IDS, ROOT, AtenCalls, dequantized_twin, forward_logits, quantized_copy, save_hf_model_as_gguf
from generation import compile_steps, generate, weights_bytes
from model_args import ModelArgs
from prepare import CompiledExperts, prepare
from quantize import ExpertHessians, set_rtn
from quantized_layers import Int4Linear, Int8Linear
from sampling import Sampling


def test_the_converted_checkpoint_holds_each_projections_experts_as_one_layer(tiny_mixtral_dir):
    from safetensors import safe_open

    args = ModelArgs.from_hf_config(tiny_mixtral_dir / "config.json")
    assert (args.n_experts, args.experts_per_token) == (4, 2)
    assert json.loads((tiny_mixtral_dir / "config.json").read_text())["model_type"] == "mixtral"
    with safe_open(tiny_mixtral_dir / "model.safetensors", framework="pt") as converted:
        assert converted.get_slice("layers.1.feed_forward.experts.w1.weight").get_shape() == [4 * 128, 64]
        assert converted.get_slice("layers.1.feed_forward.experts.w2.weight").get_shape() == [4 * 64, 128]
        assert converted.get_slice("layers.1.feed_forward.gate.weight").get_shape() == [4, 64]


def spied_experts(model):
    """The first block's experts (under a compiled step's form, the experts it runs through), recording which
    expert each product is asked of."""
    experts = model.layers[0].feed_forward.experts
    experts = getattr(experts, "experts", experts)
    asked, project = [], experts.project
    experts.project = lambda name, x, expert: asked.append(int(expert)) or project(name, x, expert)
    return experts, asked


@pytest.mark.parametrize("step", ["eager", "compiled"])
def test_a_decode_step_reads_only_the_chosen_experts(tiny_mixtral_dir, step):
    """Eagerly each chosen expert runs over its tokens; in a compiled step's form (CompiledExperts), one token
    runs each of its chosen experts. Either way a decode step of one token multiplies by 2 experts of 4, no
    more."""
    model = prepare(load_model(tiny_mixtral_dir), "cpu", step)
    forward_logits(model, IDS[:5])
    experts, asked = spied_experts(model)
    with torch.no_grad():
        model(torch.tensor([[IDS[5]]]), torch.tensor([5]))
    assert len(asked) == 3 * 2 and len(set(asked)) == 2


def by_definition(experts, x, chosen, weights):
    """Each token's chosen experts one at a time, from their (dequantized) weights: eq. 1-2 of the paper."""
    plain = getattr(experts, "layer", experts)  # the plain experts, under a device's form
    outputs = []
    for t in range(x.shape[0]):
        total = torch.zeros(x.shape[1])
        for j, expert in enumerate(chosen[t].tolist()):
            w1, w3, w2 = (plain.weight(name, expert).float() for name in ("w1", "w3", "w2"))
            total += weights[t, j] * ((F.silu(x[t] @ w1.T) * (x[t] @ w3.T)) @ w2.T)
        outputs.append(total)
    return torch.stack(outputs)


@pytest.mark.parametrize("weights_in", ["fp32", "int4"])
@pytest.mark.parametrize("form", ["eager", "compiled"])
@pytest.mark.parametrize("tokens", [1, 2, 9])
def test_every_way_of_running_experts_computes_the_definition(tiny_mixtral_dir, int4_mixtral_file, tokens, form,
                                                              weights_in):
    """A few tokens (1 or 2: 2 or 4 experts chosen of 4) run their own experts, by int eagerly and by tensor
    in a compiled step's form; more (9) run each chosen expert over its tokens eagerly, and every expert over
    every token, weighted, in the compiled step's form; float experts and int4 ones alike (int4 through brisk's
    kernel, which rounds the activations to int8 blocks: within 3% of the largest output, through two
    layers)."""
    model = prepare(load_model(int4_mixtral_file if weights_in == "int4" else tiny_mixtral_dir), "cpu")
    experts = model.layers[1].feed_forward.experts
    plain = load_model(int4_mixtral_file).layers[1].feed_forward.experts if weights_in == "int4" else experts
    torch.manual_seed(0)
    x, chosen = torch.randn(tokens, 64), torch.stack([torch.randperm(4)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2).softmax(-1)
    run = experts if form == "eager" else CompiledExperts(experts)
    with torch.no_grad():
        out, expected = run(x, chosen, weights), by_definition(plain, x, chosen, weights)
    tolerance = 1e-5 if weights_in == "fp32" or not native_kernels() else 0.03 * expected.abs().max()
    assert torch.allclose(out, expected, rtol=0, atol=tolerance)


@pytest.mark.slow
def test_compiled_steps_equal_eager(tiny_mixtral_dir):
    """One row (gathered experts) and three rows (every expert, weighted), compiled as --compile compiles,
    give the eager model's tokens."""
    eager_model = prepare(load_model(tiny_mixtral_dir), "cpu")
    compiled_model = prepare(load_model(tiny_mixtral_dir), "cpu", "compiled")
    greedy = Sampling(temperature=0)
    for prompts in ([IDS[:9]], [IDS[:9], IDS[20:29], IDS[40:49]]):
        eager_model.setup_caches(len(prompts), 64)
        compiled_model.setup_caches(len(prompts), 64)
        eager, _ = generate(eager_model, prompts, 10, greedy)
        compiled, _ = generate(compiled_model, prompts, 10, greedy, steps=compile_steps("cpu"))
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
    assert (forward_logits(prepare(load_model(out), "cpu"), IDS) - expected).abs().max().item() <= 1e-4


def test_a_gguf_with_one_tensor_per_expert_is_refused_in_one_line(tmp_path):
    """llama.cpp's Mixtral files of before December 2023 kept blk.N.ffn_gate.E.weight, one per expert."""
    from gguf import GGUFWriter

    from cli import UsageError
    from scripts.convert_gguf import convert as convert_gguf

    writer = GGUFWriter(tmp_path / "old.gguf", "llama")
    writer.add_block_count(1), writer.add_embedding_length(64), writer.add_feed_forward_length(128)
    writer.add_head_count(4), writer.add_expert_count(4), writer.add_expert_used_count(2)
    writer.add_tokenizer_model("gpt2"), writer.add_token_list(["a", "b"]), writer.add_token_merges([])
    writer.add_token_types([1, 1])
    writer.add_tensor("blk.0.ffn_gate.3.weight", torch.zeros(128, 64).numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UsageError, match="unexpected GGUF tensor 'blk.0.ffn_gate.3.weight'.*ffn_\\*_exps"):
        convert_gguf(tmp_path / "old.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def int4_mixtral_file(tiny_mixtral_dir, tmp_path_factory):
    return quantized_copy(tiny_mixtral_dir, tmp_path_factory.mktemp("q") / "int4", "--mode", "int4",
                          "--groupsize", "32")


@pytest.mark.parametrize("mode, layer_type", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantized_experts_compute_with_their_dequantized_weights(tiny_mixtral_dir, tmp_path, mode, layer_type,
                                                                  plain_layers):
    """Every expert's projections are quantized, the router is not (rounding it would change the routing),
    and the quantized model's plain layers give the logits of the float model with the dequantized weights."""
    quantized = prepare(load_model(quantized_copy(tiny_mixtral_dir, tmp_path / "q", "--mode", mode, "--groupsize",
                                                  "32")), "cpu")
    feed_forward = quantized.layers[0].feed_forward
    assert isinstance(feed_forward.experts, CPUExperts)  # the CPU's form, holding the plain experts
    assert all(isinstance(getattr(feed_forward.experts.layer, name), layer_type) for name in ("w1", "w2", "w3"))
    assert isinstance(feed_forward.gate, torch.nn.Linear)
    expected = forward_logits(dequantized_twin(load_model(tiny_mixtral_dir), quantized), IDS)
    assert (forward_logits(quantized, IDS) - expected).abs().max().item() <= 1e-3


@pytest.mark.skipif(not native_kernels(), reason="brisk's CPU kernels are unavailable here")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_cpu_kernel_multiplies_by_one_experts_rows(tiny_mixtral_dir, tmp_path, mode):
    """An int4 or int8 expert's product runs brisk's kernel over that expert's rows and scales alone, picked
    by an int (eagerly) or a 0-d tensor (compiled): it equals the plain experts' product, dequantized rows
    times the rows x, to the kernel's rounding of x to int8 blocks."""
    path = quantized_copy(tiny_mixtral_dir, tmp_path / "q", "--mode", mode, "--groupsize", "32")
    experts = prepare(load_model(path), "cpu").layers[1].feed_forward.experts
    plain = load_model(path).layers[1].feed_forward.experts
    assert set(experts.kernels) == {"w1", "w3", "w2"} and experts.layer is None  # no plain copy kept
    torch.manual_seed(0)
    for name, width in (("w1", 64), ("w2", 128)):
        x = torch.randn(3, width)
        for expert in (2, torch.tensor(2), 3):
            expected = plain.project(name, x, expert)
            with AtenCalls() as calls:
                ours = experts.project(name, x, expert)
            assert f"{mode}_linear" in calls.names
            assert (ours - expected).abs().max() <= 0.02 * expected.abs().max(), (name, expert)


def routed_through_first_experts(model):
    """The first block's experts, their Hessians gathered over three prompts, and what those prompts routed."""
    experts = model.layers[0].feed_forward.experts
    hessians, seen = ExpertHessians(experts), []
    hooks = [experts.register_forward_hook(hessians.add),
             experts.register_forward_hook(lambda module, inputs, output: seen.append(inputs[:2]))]
    model.setup_caches(3, 64)
    with torch.no_grad():
        model(torch.tensor([IDS[:60], IDS[5:65], IDS[2:62]]), torch.arange(60))
    for hook in hooks:
        hook.remove()
    return experts, hessians, seen[0]


def test_gptq_quantizes_each_expert_for_the_tokens_routed_to_it(tiny_mixtral_dir):
    """Each expert's rows are quantized with the Hessian of its own tokens: on those tokens, GPTQ's output
    error is below rounding to nearest, expert by expert, for the shared-input w1 and the hidden-input w2."""
    experts, hessians, (tokens, chosen) = routed_through_first_experts(load_model(tiny_mixtral_dir))
    for name in ("w1", "w2"):
        gptq = hessians.quantized(experts, name, 32, 128, 0.01)
        rtn = Int4Linear(gptq.in_features, gptq.out_features, 32)
        set_rtn(rtn, getattr(experts, name).weight)
        rows = gptq.out_features // 4
        for expert in range(4):
            x = tokens[(chosen == expert).any(-1)]
            if name == "w2":
                x = F.silu(experts.project("w1", x, expert)) * experts.project("w3", x, expert)
            weight = getattr(experts, name).weight[expert * rows:(expert + 1) * rows]
            errors = [(x @ (weight - layer.dequantized()[expert * rows:(expert + 1) * rows]).T).pow(2).mean()
                      for layer in (gptq, rtn)]
            assert errors[0] < 0.9 * errors[1], (name, expert, errors)


def test_an_expert_no_calibration_token_chose_is_rounded_to_nearest(tiny_mixtral_dir):
    experts = load_model(tiny_mixtral_dir).layers[0].feed_forward.experts
    hessians = ExpertHessians(experts)
    tokens = torch.randn(100, 64)
    hessians.add(experts, (tokens, torch.tensor([[0, 1]] * 100), torch.full((100, 2), 0.5)), None)
    gptq = hessians.quantized(experts, "w3", 32, 128, 0.01)
    rtn = Int4Linear(64, 4 * 128, 32)
    set_rtn(rtn, experts.w3.weight)
    assert torch.equal(gptq.weight[256:], rtn.weight[256:]) and not torch.equal(gptq.weight[:256], rtn.weight[:256])


@pytest.mark.slow
def test_a_gptq_file_of_a_mixture_computes_with_its_dequantized_weights(tiny_mixtral_dir, tmp_path, plain_layers):
    quantized = load_model(quantized_copy(tiny_mixtral_dir, tmp_path / "q", "--mode", "int4-gptq", "--groupsize", "32",
                                          "--calibration_samples", "4", "--calibration_seq_length", "64"))
    assert isinstance(quantized.layers[1].feed_forward.experts.w2, Int4Linear)
    expected = forward_logits(dequantized_twin(load_model(tiny_mixtral_dir), quantized), IDS)
    assert (forward_logits(quantized, IDS) - expected).abs().max().item() <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_two_ranks_of_a_quantized_mixture_equal_one_process(tiny_mixtral_dir, tmp_path, mode):
    """Each rank takes its share of every expert's quantized rows (int4: whole groups of 32) and columns. Both
    compute with the plain layers: an all-reduce's last-bit differences could round an activation otherwise."""
    quantized = quantized_copy(tiny_mixtral_dir, tmp_path / "q", "--mode", mode, "--groupsize", "32")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "scripts/check_tp.py", "--checkpoint_path", str(quantized), "--json"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "BRISK_CPU_KERNELS": "off"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["max_abs_logit_diff"] <= 1e-4 and result["tokens"] == result["expected_tokens"]


def test_the_bandwidth_report_counts_only_the_experts_a_token_chose(tiny_mixtral_dir):
    """A decode step of one sequence reads 2 of the 4 experts (and looks up one row of the untied embedding)."""
    tensors = load_model(tiny_mixtral_dir).state_dict()
    read = sum(tensor.numel() * 4 for name, tensor in tensors.items() if not name.startswith("tok_embeddings."))
    experts = sum(tensor.numel() * 4 for name, tensor in tensors.items() if ".experts." in name)
    assert weights_bytes(load_model(tiny_mixtral_dir)) == read - experts // 2
