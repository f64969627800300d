"""Perplexity is what the logits say, whatever the windows' batching."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import eval as evaluate
import quantize
from checkpoint import load_model
from conftest import shared_text
from prepare import prepare
from tokenizer import load_tokenizer


@pytest.mark.parametrize("n_tokens, max_seq_length, stride", [(10, 4, 4), (10, 4, 2), (10, 4, 1), (1000, 128, 96),
                                                               (7, 20, 5), (513, 512, 512)])
def test_windows_score_every_token_after_the_first_at_most_once(n_tokens, max_seq_length, stride):
    scored = []
    for begin, end, first_scored in evaluate.windows(n_tokens, max_seq_length, stride):
        assert end - begin <= max_seq_length and begin < first_scored <= end
        scored += range(first_scored, end)
    assert len(scored) == len(set(scored)) and 0 not in scored
    unscored = set(range(1, n_tokens)) - set(scored)
    # only window starts can go unscored, and only when windows do not overlap
    assert unscored == (set(range(stride, n_tokens, stride)) if stride == max_seq_length else set())


def text_tokens(checkpoint, n):
    tokenizer = load_tokenizer(checkpoint)
    return tokenizer.encode(shared_text("wikitext-2-raw-test.txt")[:20000])[:n]


def test_perplexity_equals_the_logits_by_hand(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    tokens = text_tokens(tiny_dir, 200)
    model.setup_caches(1, 256)
    with torch.no_grad():
        logits = model(torch.tensor([tokens]), torch.arange(len(tokens)))[0]
    by_hand = F.cross_entropy(logits[:-1], torch.tensor(tokens[1:]), reduction="mean").item()
    result = evaluate.perplexity(model, tokens, max_seq_length=256, stride=128)
    assert result["tokens_scored"] == 199
    assert result["mean_nll"] == pytest.approx(by_hand, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(by_hand), rel=1e-6)


def test_one_token_at_a_time_scores_what_one_pass_scores_a_pass_per_position(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    tokens = [(7 * i + 10) % model.args.vocab_size for i in range(96)]  # windows 0-64 and 32-96
    one_pass = evaluate.perplexity(model, tokens, max_seq_length=64, stride=32)
    passes = []
    model.register_forward_pre_hook(lambda module, inputs: passes.append(inputs[0].shape[1]))
    stepwise = evaluate.perplexity(model, tokens, max_seq_length=64, stride=32, one_token_at_a_time=True)
    assert passes == [1] * (63 + 63)  # each window's positions but its last, one token per pass
    assert stepwise["tokens_scored"] == one_pass["tokens_scored"] == 95
    assert stepwise["mean_nll"] == pytest.approx(one_pass["mean_nll"], rel=1e-5)


def test_same_numbers_whatever_the_batch_size(smollm2_dir):
    model = prepare(load_model(smollm2_dir), "cpu")
    tokens = text_tokens(smollm2_dir, 700)
    one, three = (evaluate.perplexity(model, tokens, 128, 64, batch_size) for batch_size in (1, 3))
    assert one["tokens_scored"] == three["tokens_scored"] == 699
    assert one["perplexity"] == pytest.approx(three["perplexity"], rel=1e-5)
    assert 5 < one["perplexity"] < 60  # SmolLM2 on Wikipedia text


def test_quantized_checkpoint_is_evaluated_through_its_metadata(tiny_dir, tmp_path, capsys):
    directory = tmp_path / "tiny"
    shutil.copytree(tiny_dir, directory)
    quantize.main(["--checkpoint_path", str(directory), "--mode", "int4", "--groupsize", "32"])
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    capsys.readouterr()
    assert evaluate.main(["--checkpoint_path", str(directory / "model_int4.g32.safetensors"),
                          "--text_file", str(text), "--max_seq_length", "64", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["perplexity"] > 1  # stdout holds the JSON alone; the progress bar went to stderr
    assert "scoring" in err and "perplexity" in err


def test_continuation_scores_sum_the_continuation_log_probs(tiny_dir):
    model, tokenizer = prepare(load_model(tiny_dir), "cpu"), load_tokenizer(tiny_dir)
    context, continuation = "the quick brown", " fox jumps"
    [(log_prob, is_greedy)] = evaluate.continuation_scores(model, tokenizer, [(context, continuation)])
    ids = tokenizer.encode(context) + tokenizer.encode(continuation)
    n = len(tokenizer.encode(continuation))
    model.setup_caches(1, 64)
    with torch.no_grad():
        log_probs = model(torch.tensor([ids]), torch.arange(len(ids)))[0, :-1].log_softmax(-1)
    expected = sum(log_probs[len(ids) - n - 1 + i, ids[len(ids) - n + i]].item() for i in range(n))
    assert log_prob == pytest.approx(expected, rel=1e-5)
    greedy = [log_probs[len(ids) - n - 1 + i].argmax().item() for i in range(n)]
    assert is_greedy == (greedy == ids[-n:])


@pytest.mark.parametrize("argv, message", [
    (["--max_seq_length", "1"], "--max_seq_length must be >= 2"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--limit_tokens", "1"], "--limit_tokens must be >= 2"),
])
def test_bad_arguments_are_one_line_and_status_2(tiny_dir, tmp_path, capsys, argv, message):
    (tmp_path / "text.txt").write_text("the quick brown fox")
    status = evaluate.main(["--checkpoint_path", str(tiny_dir), "--text_file", str(tmp_path / "text.txt"), *argv])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_text_file_that_is_not_utf8_is_one_line(tiny_dir, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("na\xefve".encode("latin-1"))
    status = evaluate.main(["--checkpoint_path", str(tiny_dir), "--text_file", str(tmp_path / "latin1.txt")])
    err = capsys.readouterr().err
    assert status == 2 and "is not UTF-8 text" in err and err.count("\n") == 1


def test_default_window_is_the_context_of_a_model_shorter_than_1024(tiny_dir, tmp_path, capsys):
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 30)
    assert evaluate.main(["--checkpoint_path", str(tiny_dir), "--text_file", str(tmp_path / "text.txt")]) == 0
    assert "windows of 256 (stride 128)" in capsys.readouterr().err


def test_text_of_one_token_has_no_perplexity(tiny_dir, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("t")  # one byte: one token
    status = evaluate.main(["--checkpoint_path", str(tiny_dir), "--text_file", str(tmp_path / "short.txt")])
    assert status == 2 and "holds 1 token(s): perplexity needs at least 2" in capsys.readouterr().err


def test_no_text_file_and_no_tasks_is_one_clear_line(capsys):
    assert evaluate.main([]) == 2
    assert capsys.readouterr().err.startswith("error: nothing to evaluate: pass --text_file")


def test_tasks_without_lm_eval_say_how_to_install_it(tiny_dir, capsys):
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm_eval is installed")
    assert evaluate.main(["--checkpoint_path", str(tiny_dir), "--tasks", "hellaswag"]) == 2
    assert capsys.readouterr().err == "error: --tasks needs lm-evaluation-harness: pip install lm_eval\n"


def test_lm_evaluation_harness_runs_local_tasks_of_each_request_type(smollm2_dir, tmp_path, monkeypatch):
    """Multiple choice (loglikelihood), rolling log-likelihood and generation, on tasks written here."""
    pytest.importorskip("lm_eval")
    import json

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = {"capitals": [{"question": "The capital of France is", "choices": [" Paris", " Berlin"], "answer": 0},
                         {"question": "The capital of Italy is", "choices": [" Oslo", " Rome"], "answer": 1}],
            "texts": [{"text": "Paris is the capital and most populous city of France."}],
            "qa": [{"q": "The capital of France is", "a": " Paris"}]}
    kinds = {"capitals": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                         'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n',
             "texts": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                      'metric_list:\n  - metric: word_perplexity\n',
             "qa": 'output_type: generate_until\ndoc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
                   'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 4\nmetric_list:\n  - metric: exact_match\n'}
    for name, examples in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in examples))
        (tmp_path / f"{name}.yaml").write_text(
            f"task: brisk_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / name}.jsonl\n"
            f"test_split: test\n{kinds[name]}")
    model, tokenizer = prepare(load_model(smollm2_dir), "cpu"), load_tokenizer(smollm2_dir)
    results = evaluate.run_tasks(model, tokenizer, ["brisk_capitals", "brisk_texts", "brisk_qa"], 256,
                                 include_path=tmp_path)
    assert results["brisk_capitals"]["acc,none"] == 1.0
    assert 1 < results["brisk_texts"]["word_perplexity,none"] < 1000
    assert results["brisk_qa"]["exact_match,none"] == 1.0  # greedy: " Paris" then "."
