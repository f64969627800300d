"""The model computes what Hugging Face transformers computes, and its KV cache, batching and
compilation change nothing."""
import pytest
import torch

from generate import compile_step, decode_one_token, generate
from model import (CPU_HAS_BF16_ARITHMETIC, KNOWN_MODELS, Linear, ModelArgs, Transformer, decode_attention,
                   load_model)
from sampling import Sampling

GREEDY = Sampling(temperature=0)
PROMPT = [504, 3575, 282, 4649, 314, 7042, 28, 284, 260, 3575, 282, 6480, 314]  # "The capital of France is Paris, ..."


def full_logits(model, ids):
    model.setup_caches(1, 256)
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids)))


def test_tiny_logits_equal_transformers(tiny_dir, tiny_reference):
    model = load_model(tiny_dir)
    ids = list(range(3, 200, 3))
    with torch.no_grad():
        expected = tiny_reference(torch.tensor([ids])).logits
    assert (full_logits(model, ids) - expected).abs().max().item() <= 1e-4


def test_smollm2_logits_equal_transformers(smollm2_dir, smollm2_reference):
    model = load_model(smollm2_dir)
    with torch.no_grad():
        expected = smollm2_reference(torch.tensor([PROMPT])).logits
    assert (full_logits(model, PROMPT) - expected).abs().max().item() <= 1e-3


def test_smollm2_greedy_32_tokens_equal_transformers_generate(smollm2_dir, smollm2_reference):
    model = load_model(smollm2_dir)
    model.setup_caches(1, len(PROMPT) + 32)
    [ours], _ = generate(model, [PROMPT], 32, GREEDY)
    with torch.no_grad():
        theirs = smollm2_reference.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False,
                                            eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0, len(PROMPT):].tolist()


def test_cached_decoding_equals_full_forward(tiny_dir):
    model = load_model(tiny_dir)
    ids = list(range(5, 69))
    expected = full_logits(model, ids)[0]
    model.setup_caches(1, 256)
    with torch.no_grad():
        prefill = model(torch.tensor([ids[:40]]), torch.arange(40))[0]
        steps = [model(torch.tensor([[ids[i]]]), torch.tensor([i]))[0, 0] for i in range(40, len(ids))]
    assert torch.allclose(torch.cat([prefill, torch.stack(steps)]), expected, atol=1e-5)


@pytest.mark.parametrize("checkpoint", ["tiny_dir", "smollm2_dir"])
def test_batch_of_different_lengths_equals_each_alone(checkpoint, request):
    model = load_model(request.getfixturevalue(checkpoint))
    prompts = [[i % model.args.vocab_size for i in prompt]
               for prompt in (PROMPT, PROMPT[:4], [28, 253, 1090], PROMPT[2:11])]
    model.setup_caches(len(prompts), len(PROMPT) + 24)
    batched, _ = generate(model, prompts, 24, GREEDY)
    alone = [generate(model, [prompt], 24, GREEDY)[0][0] for prompt in prompts]
    assert batched == alone


def test_generation_stops_at_a_stop_token_and_keeps_it(tiny_dir):
    model = load_model(tiny_dir)
    model.setup_caches(1, 64)
    prompt = [5, 17, 29, 41, 53]
    [free], _ = generate(model, [prompt], 20, GREEDY)
    stop = free[5]
    [stopped], _ = generate(model, [prompt], 20, GREEDY, stop_ids={stop})
    assert stopped == free[:free.index(stop) + 1]


def test_head_dim_different_from_dim_over_heads():
    args = ModelArgs(dim=48, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=64, vocab_size=50)
    model = Transformer(args).eval()
    model.setup_caches(1, 16)
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]]), torch.arange(3)).shape == (1, 3, 50)


@pytest.mark.slow
def test_compiled_decode_equals_eager(tiny_dir):
    model = load_model(tiny_dir)
    model.setup_caches(1, 64)
    prompt = [5, 17, 29, 41, 53, 65]
    eager, _ = generate(model, [prompt], 16, GREEDY)
    compiled_step = compile_step(decode_one_token, "cpu")
    compiled, _ = generate(model, [prompt], 16, GREEDY, decode_step=compiled_step)
    assert compiled == eager


@pytest.mark.slow
def test_one_compiled_step_serves_a_single_prompt_then_a_padded_batch(tiny_dir):
    model = load_model(tiny_dir)
    compiled_step = compile_step(decode_one_token, "cpu")
    for prompts in ([[5, 17]], [[5], [6, 17], [7, 17, 29]]):
        model.setup_caches(len(prompts), 64)
        eager, _ = generate(model, prompts, 8, GREEDY)
        compiled, _ = generate(model, prompts, 8, GREEDY, decode_step=compiled_step)
        assert compiled == eager


@pytest.mark.slow
def test_compiled_one_row_bf16_matvec_equals_the_matmul():
    layer = Linear(576, 1536).to(torch.bfloat16)
    x = torch.randn(1, 1, 576, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)  # one row on the CPU: the fused multiply-and-sum
    expected = (x.float() @ layer.weight.float().T).to(torch.bfloat16)
    assert torch.allclose(compiled(x).float(), expected.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa_with_grouped_heads_and_padding(dtype):
    q = torch.randn(2, 9, 1, 64, dtype=dtype)  # two rows, one query each, 9 heads over 3 K/V heads
    k, v = torch.randn(2, 3, 40, 64, dtype=dtype), torch.randn(2, 3, 40, 64, dtype=dtype)
    slots = torch.arange(40)
    mask = ((slots <= 30) & (slots >= torch.tensor([[0], [7]])))[:, None, None, :]  # row 1: 7 padding slots
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(decode_attention(q, k, v, mask).float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(CPU_HAS_BF16_ARITHMETIC, reason="this CPU computes bf16 natively")
def test_bf16_layer_over_many_rows_computes_in_fp32_on_a_cpu_without_bf16_arithmetic():
    layer = Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x), (x.float() @ layer.weight.float().T).to(torch.bfloat16))


def test_model_names_are_looked_up_exactly_ignoring_case():
    assert ModelArgs.from_name("smollm2-135m").dim == 576
    assert ModelArgs.from_name("Llama-2-7B").n_layers == 32
    with pytest.raises(ValueError, match="unknown model name 'Llama-2'; known names: Llama-2-7B, Llama-2-13B"):
        ModelArgs.from_name("Llama-2")


def test_every_named_model_has_consistent_heads():
    for name in KNOWN_MODELS:
        args = ModelArgs.from_name(name)
        assert args.n_heads % args.n_kv_heads == 0 and args.head_dim * args.n_heads >= args.dim // 2, name


def test_hf_config_round_trips():
    args = ModelArgs.from_name("Llama-3.2-1B")
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args


def test_load_rejects_weights_that_do_not_match_the_config(tiny_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "wrong")
    config_file = tmp_path / "wrong" / "config.json"
    config = config_file.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    config_file.write_text(config)
    with pytest.raises(ValueError, match="does not match its config.json"):
        load_model(tmp_path / "wrong")
