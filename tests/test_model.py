"""The model computes what Hugging Face transformers computes, and its KV cache, batching and
compilation change nothing."""
import pytest
import torch

from checkpoint import load_model, parameter_count, random_model
from generation import Steps, compile_steps, decode_one_token, generate, prefill, slots_to_attend
from model import ForwardOptions, Transformer
from model_args import ModelArgs
from prepare import prepare
from sampling import Sampling

GREEDY = Sampling(temperature=0)
PROMPT = [504, 3575, 282, 4649, 314, 7042, 28, 284, 260, 3575, 282, 6480, 314]  # "The capital of France is Paris, ..."


def full_logits(model, ids):
    model.setup_caches(1, 256)
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids)))


def test_tiny_logits_equal_transformers(tiny_dir, tiny_reference):
    model = prepare(load_model(tiny_dir), "cpu")
    ids = list(range(3, 200, 3))
    with torch.no_grad():
        expected = tiny_reference(torch.tensor([ids])).logits
    assert (full_logits(model, ids) - expected).abs().max().item() <= 1e-4


def test_smollm2_logits_equal_transformers(smollm2_dir, smollm2_reference):
    model = prepare(load_model(smollm2_dir), "cpu")
    with torch.no_grad():
        expected = smollm2_reference(torch.tensor([PROMPT])).logits
    assert (full_logits(model, PROMPT) - expected).abs().max().item() <= 1e-3


def test_smollm2_greedy_32_tokens_equal_transformers_generate(smollm2_dir, smollm2_reference):
    model = prepare(load_model(smollm2_dir), "cpu")
    model.setup_caches(1, len(PROMPT) + 32)
    [ours], _ = generate(model, [PROMPT], 32, GREEDY)
    with torch.no_grad():
        theirs = smollm2_reference.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False,
                                            eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0, len(PROMPT):].tolist()


def test_cached_decoding_equals_full_forward(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    ids = list(range(5, 69))
    expected = full_logits(model, ids)[0]
    model.setup_caches(1, 256)
    with torch.no_grad():
        prefill = model(torch.tensor([ids[:40]]), torch.arange(40))[0]
        steps = [model(torch.tensor([[ids[i]]]), torch.tensor([i]))[0, 0] for i in range(40, len(ids))]
    assert torch.allclose(torch.cat([prefill, torch.stack(steps)]), expected, atol=1e-5)


@pytest.mark.parametrize("checkpoint", ["tiny_dir", "smollm2_dir"])
def test_batch_of_different_lengths_equals_each_alone(checkpoint, request):
    model = prepare(load_model(request.getfixturevalue(checkpoint)), "cpu")
    prompts = [[i % model.args.vocab_size for i in prompt]
               for prompt in (PROMPT, PROMPT[:4], [28, 253, 1090], PROMPT[2:11])]
    model.setup_caches(len(prompts), len(PROMPT) + 24)
    batched, _ = generate(model, prompts, 24, GREEDY)
    alone = [generate(model, [prompt], 24, GREEDY)[0][0] for prompt in prompts]
    assert batched == alone


def test_rows_each_at_their_own_position_equal_each_alone(tiny_dir):
    # a server's cache: each row a sequence of its own, prefilled row by row (cache_row), then decoded together
    model = prepare(load_model(tiny_dir), "cpu")
    prompts = [list(range(5, 45)), [7, 8, 9], list(range(100, 117))]
    model.setup_caches(len(prompts), 64)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            model(torch.tensor([prompt]), torch.arange(len(prompt)), ForwardOptions(cache_row=row))
        last = torch.tensor([[prompt[-1] + 1] for prompt in prompts])
        together = model(last, torch.tensor([[len(prompt)] for prompt in prompts]))[:, 0]
    alone = [full_logits(model, prompt + [prompt[-1] + 1])[0, -1] for prompt in prompts]
    assert torch.allclose(together, torch.stack(alone), atol=1e-5)


def test_attention_never_reads_the_cache_past_the_attended_slots(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    model.setup_caches(1, 64)
    ids = torch.tensor([[5, 17, 29, 41]])
    with torch.no_grad():
        expected = model(ids, torch.arange(4))
        for layer in model.layers:  # NaN in every slot from 8 on: read, even masked, it would spread
            layer.attention.kv_cache.k_cache[:, :, 8:] = float("nan")
            layer.attention.kv_cache.v_cache[:, :, 8:] = float("nan")
        bounded = model(ids, torch.arange(4), ForwardOptions(attended_slots=8))
    assert torch.allclose(bounded, expected, atol=1e-5)


def test_attended_slots_are_the_next_power_of_two_from_256_within_the_cache():
    assert [slots_to_attend(length, 8192) for length in (1, 256, 257, 300, 513, 4097, 8192)] == [
        256, 256, 512, 512, 1024, 8192, 8192]
    assert slots_to_attend(10, 100) == 100


# steps that attend over the whole cache, whatever generate() asks: the reference for the bounded ones
WHOLE_CACHE = Steps(prefill=lambda model, tokens, input_pos, left_pad, sampling, _: prefill(
                        model, tokens, input_pos, left_pad, sampling),
                    decode=lambda model, token, input_pos, left_pad, sampling, _: decode_one_token(
                        model, token, input_pos, left_pad, sampling))


def test_decoding_past_256_slots_equals_attending_the_whole_cache(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    model.setup_caches(2, 1024)
    prompts = [list(range(5, 255)), list(range(7, 250))]  # left-padded; decoding crosses slot 256
    bounded, timing = generate(model, prompts, 20, GREEDY)
    whole, _ = generate(model, prompts, 20, GREEDY, steps=WHOLE_CACHE)
    assert bounded == whole
    assert timing.attended_slots == 6 * 256 + 13 * 512  # positions 250 to 255, then 256 to 268


def test_generation_stops_at_a_stop_token_and_keeps_it(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu")
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
    model = prepare(load_model(tiny_dir), "cpu")
    model.setup_caches(1, 64)
    prompt = [5, 17, 29, 41, 53, 65]
    eager, _ = generate(model, [prompt], 16, GREEDY)
    compiled, _ = generate(model, [prompt], 16, GREEDY, steps=compile_steps("cpu"))
    assert compiled == eager


@pytest.mark.slow
def test_compiled_decoding_past_256_slots_equals_eager(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    model.setup_caches(1, 1024)
    prompt = list(range(5, 250))
    eager, _ = generate(model, [prompt], 16, GREEDY)
    compiled, _ = generate(model, [prompt], 16, GREEDY, steps=compile_steps("cpu"))  # compiles for 256 and 512
    assert compiled == eager


@pytest.mark.slow
def test_one_compiled_step_serves_a_single_prompt_then_a_padded_batch(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    compiled_steps = compile_steps("cpu")
    for prompts in ([[5, 17]], [[5], [6, 17], [7, 17, 29]]):
        model.setup_caches(len(prompts), 64)
        eager, _ = generate(model, prompts, 8, GREEDY)
        compiled, _ = generate(model, prompts, 8, GREEDY, steps=compiled_steps)
        assert compiled == eager


def test_model_names_are_looked_up_exactly_ignoring_case():
    assert ModelArgs.from_name("smollm2-135m").dim == 576
    assert ModelArgs.from_name("Llama-2-7B").n_layers == 32
    with pytest.raises(ValueError, match="unknown model name 'Llama-2'; known names: Llama-2-7B, Llama-2-13B"):
        ModelArgs.from_name("Llama-2")


# Counts as the model cards and Hugging Face's checkpoints give them (tied embeddings counted once).
PUBLISHED_PARAMETERS = {"Llama-2-7B": 6_738_415_616, "Llama-2-13B": 13_015_864_320, "CodeLlama-7B": 6_738_546_688,
                        "Mistral-7B": 7_241_732_096, "TinyLlama-1.1B": 1_100_048_384, "Llama-3.1-8B": 8_030_261_248,
                        "Llama-3.2-1B": 1_235_814_400, "Llama-3.2-3B": 3_212_749_824,
                        "SmolLM2-135M": 134_515_008, "SmolLM2-360M": 361_821_120, "SmolLM2-1.7B": 1_711_376_384,
                        "Mixtral-8x7B": 46_702_792_704}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_a_named_shape_has_its_published_parameter_count(name):
    assert parameter_count(ModelArgs.from_name(name)) == PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize("name, millions", [("stories15M", 15), ("stories42M", 42), ("stories110M", 110)])
def test_llama2c_stories_shapes_share_the_classifier_as_their_names_count(name, millions):
    assert abs(parameter_count(ModelArgs.from_name(name)) / 1e6 - millions) < 0.03 * millions


@pytest.mark.parametrize("weights", ["float", "int8", "int4-g64"])
def test_random_weights_in_every_format_spread_like_a_normal_of_std_0_02(weights):
    layer = random_model(ModelArgs.from_name("stories15M"), weights=weights).layers[0].feed_forward.w1
    values = layer.weight if weights == "float" else layer.dequantized()
    assert abs(values.mean()) < 2e-4 and values.std().item() == pytest.approx(0.02, rel=0.02)


def test_random_weights_keep_a_tied_embedding_one_tensor():
    model = random_model(ModelArgs.from_name("stories15M"))
    assert model.output.weight is model.tok_embeddings.weight


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


def test_logits_from_the_last_position_are_the_last_row_of_all_logits(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    model.setup_caches(1, 64)
    ids = torch.tensor([[5, 17, 29, 41, 53]])
    with torch.no_grad():
        every = model(ids, torch.arange(5))
        last = model(ids, torch.arange(5), ForwardOptions(logits_from=-1))
    assert last.shape == (1, 1, model.args.vocab_size) and torch.allclose(last[0, 0], every[0, -1], atol=1e-6)
