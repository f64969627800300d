"""The command line: text on stdout, figures on stderr, one clear line for bad input."""
import subprocess
import sys

import pytest
import torch

import generation
import runtime
import speculative
from checkpoint import load_model
from cpu_kernels import native_kernels
from conftest import ROOT, quantized_copy
from generate import main
from generation import generate
from prepare import prepare
from sampling import Penalties, Sampling, penalize, probabilities, sample
from speculative import load_draft
from tokenizer import load_tokenizer


def run_main(capsys, *argv):
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_text_goes_to_stdout_and_figures_to_stderr(smollm2_dir):
    result = subprocess.run(
        [sys.executable, "generate.py", "--checkpoint_path", smollm2_dir, "--prompt", "The capital of France is",
         "--temperature", "0", "--max_new_tokens", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "The capital of France is Paris.\n"
    assert "tokens/s" in result.stderr and "memory bandwidth" in result.stderr


def test_chat_wraps_the_prompt_in_the_template_and_stops_at_end_of_turn(capsys, smollm2_dir):
    status, out, err = run_main(capsys, "--checkpoint_path", smollm2_dir, "--chat", "--prompt",
                                "What is the capital of France?", "--temperature", 0, "--max_new_tokens", 40)
    assert status == 0
    assert out == "The capital of France is Paris.\n"


def test_batch_from_prompt_file_prints_each_completion(capsys, tiny_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("the quick brown\nhello\n")
    status, out, err = run_main(capsys, "--checkpoint_path", tiny_dir, "--prompt_file", tmp_path / "prompts.txt",
                                "--temperature", 0, "--max_new_tokens", 5)
    assert status == 0
    first, second = out.strip("\n").split("\n\n")
    assert first.startswith("the quick brown") and second.startswith("hello")


def test_interactive_chat_reusing_the_cache_equals_fresh_runs(capsys, monkeypatch, smollm2_dir):
    questions = ["Name a fruit.", "And a vegetable?"]
    answers = iter(questions)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers, ""))  # "" ends the chat
    status, out, err = run_main(capsys, "--checkpoint_path", smollm2_dir, "--interactive", "--temperature", 0,
                                "--max_new_tokens", 30)
    assert status == 0

    tokenizer, model = load_tokenizer(smollm2_dir), prepare(load_model(smollm2_dir), "cpu")
    model.setup_caches(1, 256)
    messages, expected = [], ""
    for question in questions:  # each turn from scratch: the whole conversation prefilled again
        messages.append({"role": "user", "content": question})
        conversation = tokenizer.encode(tokenizer.render_chat(messages))
        [reply], _ = generate(model, [conversation], 30, Sampling(0), tokenizer.stop_ids)
        text = tokenizer.decode([t for t in reply if t not in tokenizer.stop_ids])
        messages.append({"role": "assistant", "content": text})
        expected += text + "\n"
    assert out == expected


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    (["--random_weights", "Llama-2"], "unknown model name 'Llama-2'; known names: Llama-2-7B"),
    (["--random_weights", "Llama-3.1-405B"], "Llama-3.1-405B (float, torch.float32) takes 1623.4 GB, more than the"),
    (["--random_format", "int8"], "--random_format stores random weights: add --random_weights NAME"),
])
def test_bad_arguments_are_one_line_and_status_2(capsys, tiny_dir, argv, message):
    status, out, err = run_main(capsys, "--checkpoint_path", tiny_dir, *argv)
    assert status == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_empty_prompt_without_a_bos_token_is_refused(capsys, tiny_dir):
    status, out, err = run_main(capsys, "--checkpoint_path", tiny_dir, "--prompt", "")
    assert status == 2 and out == ""
    assert err == "error: --prompt is empty and this tokenizer adds no BOS token to start from: give some text\n"


def test_empty_prompt_with_a_bos_token_generates_from_it(capsys, tiny_dir, tmp_path):
    import json
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "bos")
    config_file = tmp_path / "bos" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "add_bos_token": True}))
    status, out, err = run_main(capsys, "--checkpoint_path", tmp_path / "bos", "--prompt", "", "--temperature", 0,
                                "--max_new_tokens", 4)
    assert status == 0 and "decode 3 tokens" in err


def test_prompt_file_that_is_not_utf8_is_one_line(capsys, tiny_dir, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    status, _, err = run_main(capsys, "--checkpoint_path", tiny_dir, "--prompt_file", tmp_path / "latin1.txt")
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --prompt_file {tmp_path / 'latin1.txt'} is not UTF-8 text (byte 3)")


def test_prompt_file_without_a_prompt_is_refused(capsys, tiny_dir, tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n")
    status, out, err = run_main(capsys, "--checkpoint_path", tiny_dir, "--prompt_file", tmp_path / "blank.txt")
    assert status == 2 and out == "" and "holds no prompt: write one prompt per line" in err


@pytest.mark.parametrize("argv, message", [
    (["--max_seq_length", "0"], "--max_seq_length must be >= 2"),
    (["--profile", "no/such/dir/trace.json"], "--profile no/such/dir/trace.json: there is no directory"),
    (["--prompt_file", "no_such_prompts.txt"], "--prompt_file no_such_prompts.txt: no such file"),
])
def test_more_bad_arguments_are_one_line_and_status_2(capsys, tiny_dir, argv, message):
    status, out, err = run_main(capsys, "--checkpoint_path", tiny_dir, *argv)
    assert status == 2 and out == "" and message in err and err.count("\n") == 1


def test_compiling_is_announced_before_it_starts(capsys, tiny_dir, monkeypatch):
    stderr_at_first_call = []

    def compile_step(step, device, cuda_graphs=True):  # stands in for torch.compile, which compiles at the first call
        def compiled(*args):
            if not stderr_at_first_call:
                stderr_at_first_call.append(capsys.readouterr().err)
            return step(*args)
        return compiled

    monkeypatch.setattr(generation, "compile_step", compile_step)
    status, _, err = run_main(capsys, "--checkpoint_path", tiny_dir, "--compile", "--max_new_tokens", 4)
    assert status == 0 and "compiling with torch.compile" in stderr_at_first_call[0] and "compiled in" in err


def test_missing_checkpoint(capsys, tmp_path):
    status, _, err = run_main(capsys, "--checkpoint_path", tmp_path / "nothing" / "model.safetensors")
    assert status == 2 and "no tokenizer" in err and err.count("\n") == 1


def test_corrupt_checkpoint(capsys, tiny_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    status, _, err = run_main(capsys, "--checkpoint_path", broken)
    assert status == 2 and "cannot read" in err and "re-convert the checkpoint" in err and err.count("\n") == 1


def test_prompt_longer_than_the_context(capsys, tiny_dir):
    status, _, err = run_main(capsys, "--checkpoint_path", tiny_dir, "--prompt", "hello " * 300)
    assert status == 2 and "longer than the model's context of 256" in err


def test_max_new_tokens_past_the_context(capsys, tiny_dir):
    status, _, err = run_main(capsys, "--checkpoint_path", tiny_dir, "--prompt", "hello", "--max_new_tokens", 300)
    assert status == 2 and "exceeds the model's context of 256: lower --max_new_tokens to" in err


def test_random_weights_take_a_larger_tokenizer_whose_prompt_ids_fit_the_shape(capsys, smollm2_dir):
    """SmolLM2's 49152-token tokenizer for stories15M's 32000-token shape: "Once upon a time" is ids < 6500."""
    status, out, err = run_main(capsys, "--checkpoint_path", smollm2_dir, "--random_weights", "stories15M",
                                "--max_new_tokens", 4)
    assert status == 0 and out == "" and "loaded stories15M" in err and "tokens/s" in err


def test_random_weights_refuse_a_prompt_id_outside_the_shapes_vocabulary(capsys, smollm2_dir):
    status, out, err = run_main(capsys, "--checkpoint_path", smollm2_dir, "--random_weights", "stories15M",
                                "--prompt", "photosynthesis")  # SmolLM2's ids 43042, 14870
    assert status == 2 and out == ""
    assert "the prompt encodes to token id 43042, outside stories15M's vocabulary of 32000" in err


# with brisk's CPU kernels a step reads their fp16 scales; without, the layers' fp32 scales (and int4's zeros)
SCALE_BYTES = 2 if native_kernels() else 4


@pytest.mark.parametrize("random_format, bytes_per_weight", [
    ("float", 4), ("int8", 1 + SCALE_BYTES / 288), ("int4-g32", 0.5 + 2 * SCALE_BYTES / 32)])
def test_random_weights_stored_quantized_read_the_bytes_of_that_format(capsys, tiny_dir, random_format,
                                                                       bytes_per_weight):
    """stories15M: 15.19M weights, its tied embedding and output head counted once, nearly all in linear layers
    (the head included); int8 adds a scale per output row of 288 weights, int4 a scale and min per group of 32
    (SCALE_BYTES each)."""
    status, _, err = run_main(capsys, "--checkpoint_path", tiny_dir, "--random_weights", "stories15M",
                              "--random_format", random_format, "--dtype", "fp32", "--max_new_tokens", 3)
    weights_mb = float(err.split("(weights ")[1].split(" MB")[0])
    assert status == 0 and weights_mb == pytest.approx(15.19 * bytes_per_weight, abs=0.6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(capsys, tiny_dir):
    status, _, err = run_main(capsys, "--checkpoint_path", tiny_dir, "--device", "cuda")
    assert status == 2 and "no CUDA device is available" in err


def test_top_k_1_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    assert torch.equal(sample(logits, Sampling(temperature=1.0, top_k=1)), logits.argmax(-1, keepdim=True))


def test_tiny_top_p_keeps_only_the_most_likely_token():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    assert torch.equal(sample(logits, Sampling(temperature=1.0, top_k=None, top_p=1e-6)),
                       logits.argmax(-1, keepdim=True))


def test_min_p_keeps_the_tokens_at_least_that_share_of_the_likeliest():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    probs = probabilities(logits, Sampling(temperature=1.0, top_k=None, min_p=0.5))  # floor 0.25: 0.5 and 0.3 stay
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_penalties_change_the_logits_of_the_tokens_seen():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.0, 0.5]])
    frequency = penalize(logits, Penalties(presence=0.5, frequency=0.25), prompt=[4], generated=[0, 0, 2])
    assert torch.equal(frequency, torch.tensor([[1.0, -2.0, 0.25, 0.0, 0.5]]))  # 0: 0.5 + 2 x 0.25; 2: 0.75
    repetition = penalize(logits, Penalties(repetition=2.0), prompt=[4], generated=[1])
    assert torch.equal(repetition, torch.tensor([[2.0, -4.0, 1.0, 0.0, 0.25]]))  # positive halved, negative doubled
    bias = penalize(logits, Penalties(logit_bias=((3, 100.0),)), prompt=[], generated=[])
    assert torch.equal(bias, torch.tensor([[2.0, -2.0, 1.0, 100.0, 0.5]]))


def test_sampling_follows_the_softmax_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).log_softmax(-1)
    draws = torch.cat([sample(logits, Sampling(temperature=1.0, top_k=None)) for _ in range(20000)]).view(-1)
    frequencies = torch.bincount(draws, minlength=4) / draws.numel()
    assert torch.allclose(frequencies, logits.softmax(-1)[0], atol=0.015)


def test_same_seed_same_sample_and_another_seed_another(capsys, tiny_dir):
    # a high temperature flattens the tiny model's peaked distribution, so that samples really differ
    runs = [run_main(capsys, "--checkpoint_path", tiny_dir, "--seed", seed, "--temperature", 5, "--top_k", 100,
                     "--max_new_tokens", 12)[1] for seed in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


def test_profile_writes_a_chrome_trace(capsys, tiny_dir, tmp_path):
    import json

    status, _, err = run_main(capsys, "--checkpoint_path", tiny_dir, "--max_new_tokens", 4,
                              "--profile", tmp_path / "trace.json")
    assert status == 0 and "wrote a Chrome trace" in err
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    attention = {"aten::scaled_dot_product_attention", "brisk::attention"}  # PyTorch's, or brisk's CPU op
    assert any(event.get("name") in attention for event in events)


def test_an_int4_checkpoint_runs_with_fp32_activations_by_default(capsys, tiny_dir, tmp_path):
    int4 = quantized_copy(tiny_dir, tmp_path / "tiny", "--mode", "int4", "--groupsize", 32)
    status, _, err = run_main(capsys, "--checkpoint_path", int4, "--max_new_tokens", 3)
    assert status == 0 and "(torch.float32, cpu)" in err
    status, _, err = run_main(capsys, "--checkpoint_path", int4, "--max_new_tokens", 3, "--dtype", "bf16")
    assert status == 0 and "(torch.bfloat16, cpu)" in err
    status, _, err = run_main(capsys, "--checkpoint_path", tiny_dir, "--max_new_tokens", 3)
    assert status == 0 and "(torch.float32, cpu)" in err


def test_a_compiled_runs_warm_up_compiles_every_attended_length_the_run_reaches(tiny_dir):
    compiled_graphs = []

    def recording_backend(graph_module, example_inputs):  # called once for each graph Dynamo compiles
        compiled_graphs.append(graph_module)
        return graph_module.forward

    model = prepare(load_model(tiny_dir), "cpu", "compiled")
    prompt = list(range(5, 250))
    model.setup_caches(1, len(prompt) + 20)  # decoding crosses slot 256: attention over 256, then 265 slots
    torch._dynamo.reset()
    steps = generation.Steps(decode=torch.compile(generation.decode_one_token, backend=recording_backend,
                                                  fullgraph=True, dynamic=False))
    setup = runtime.Setup(model, load_tokenizer(tiny_dir), Sampling(temperature=0), steps, "cpu")
    runtime.warm_up(setup, [prompt], 20)
    warmed = len(compiled_graphs)
    generate(model, [prompt], 20, Sampling(temperature=0), steps=steps)
    assert warmed == 2 and len(compiled_graphs) == warmed


def test_an_int4_draft_picks_its_own_activations_beside_a_float_target(
        capsys, tiny_dir, tmp_path, monkeypatch):
    int4 = quantized_copy(tiny_dir, tmp_path / "tiny", "--mode", "int4", "--groupsize", 32)
    draft_dtypes = []

    def recorded_load_draft(path, tokenizer, device, dtype):
        draft_dtypes.append(dtype)
        return load_draft(path, tokenizer, device, dtype)

    monkeypatch.setattr(speculative, "load_draft", recorded_load_draft)
    status, _, err = run_main(capsys, "--checkpoint_path", tiny_dir, "--speculative", "draft",
                              "--draft_checkpoint_path", int4, "--prompt", "hello", "--max_new_tokens", 6)
    assert status == 0 and "(torch.float32, cpu)" in err and draft_dtypes == [torch.float32]
