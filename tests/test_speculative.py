"""Speculative decoding changes the speed, never the output: greedy token for token, sampling in distribution."""
import pytest
import torch

from checkpoint import load_model
from generate import main
from generation import generate
from model import Transformer
from model_args import ModelArgs
from prepare import prepare
from sampling import Sampling, probabilities
from speculative import (DraftModel, Lookahead, lookahead_generate, lookahead_logits, prompt_lookup_guesses,
                         speculative_generate, target_logits, verify)
from tokenizer import load_tokenizer

GREEDY = Sampling(temperature=0)


def random_model(seed: int, vocab_size: int = 320) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, vocab_size=vocab_size,
                     max_seq_length=128)
    model = Transformer(args).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.5 if parameter.dim() > 1 else 0.1).add_(1 if parameter.dim() == 1 else 0)
    model.setup_caches(1, 128)
    return model


def plain_greedy(model, prompt, n, stop_ids=()):
    [output], _ = generate(model, [prompt], n, GREEDY, stop_ids)
    return output


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model = prepare(load_model(smollm2_dir), "cpu")
    model.setup_caches(1, 256)
    return model, load_tokenizer(smollm2_dir)


def test_prompt_lookup_finds_what_followed_the_last_ngram():
    assert prompt_lookup_guesses([1, 2, 3, 4, 5, 9, 2, 3], k=3) == [4, 5, 9]
    assert prompt_lookup_guesses([7, 8, 9], k=3) == []


def test_greedy_prompt_lookup_equals_plain_greedy_on_smollm2(smollm2):
    model, tokenizer = smollm2
    text = "Repeat exactly: the quick brown fox jumps over the lazy dog by the river."
    prompt = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": text}]))
    expected = plain_greedy(model, prompt, 40, tokenizer.stop_ids)
    output, stats = speculative_generate(model, prompt, 40, GREEDY, 5, stop_ids=tokenizer.stop_ids)
    assert output == expected
    assert stats.accepted > 0 and stats.tokens_per_step > 1.5


def test_greedy_lookahead_equals_plain_greedy_on_smollm2(smollm2):
    model, tokenizer = smollm2
    text = "Repeat exactly: the quick brown fox jumps over the lazy dog by the river."
    prompt = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": text}]))
    expected = plain_greedy(model, prompt, 40, tokenizer.stop_ids)
    output, stats = lookahead_generate(model, prompt, 40, 3, 4, stop_ids=tokenizer.stop_ids)
    assert output == expected
    assert stats.accepted > 0


@pytest.mark.parametrize("n, window", [(1, 1), (2, 3), (4, 5)])
def test_greedy_lookahead_equals_plain_greedy_on_a_tiny_model(n, window):
    model = random_model(0)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    output, stats = lookahead_generate(model, prompt, 40, n, window)
    assert output == plain_greedy(model, prompt, 40)
    assert stats.verify_steps + stats.accepted == 39  # each pass: its accepted guesses and one own token


def test_lookahead_pools_each_column_and_verifies_the_pooled_ngram():
    model = random_model(0)
    prompt = [7, 8, 9, 10, 11]
    lookahead = Lookahead(model, n=2, window=3)
    lookahead.remember(prompt, 0)
    assert lookahead.pool == {7: [(8, 9)], 8: [(9, 10)], 9: [(10, 11)]}
    [next_token] = plain_greedy(model, prompt, 1)
    lookahead.pool[prompt[-1]] = [(next_token, 0)]  # its first token is the model's own choice
    model.setup_caches(1, 64)
    model(torch.tensor([prompt[:-1]]), torch.arange(4))
    levels = [[1, 2, 3], [4, 5, 6]]
    kept, checked, new_levels = lookahead.step(prompt, 4, levels)
    assert kept[0] == next_token and checked == 2
    assert new_levels[0] == [4, 5, 6] and len(new_levels[1]) == 3
    assert (4,) == lookahead.pool[1][0][:1]  # column 0's chain 1 -> 4 -> prediction became an n-gram


def test_lookahead_refuses_sampling(capsys, tiny_dir):
    status = main(["--checkpoint_path", str(tiny_dir), "--speculative", "lookahead", "--temperature", "0.8"])
    assert status == 2
    assert "--speculative lookahead decodes greedily: add --temperature 0" in capsys.readouterr().err


def test_greedy_with_a_quantized_draft_equals_plain_greedy_on_smollm2(smollm2, smollm2_int8):
    model, tokenizer = smollm2
    draft = prepare(load_model(smollm2_int8), "cpu")
    draft.setup_caches(1, 256)
    prompt = tokenizer.encode("The three primary colours are")
    output, stats = speculative_generate(model, prompt, 30, GREEDY, 4, DraftModel(draft))
    assert output == plain_greedy(model, prompt, 30)
    assert stats.acceptance_rate > 0.5


def test_a_draft_identical_to_the_target_has_every_guess_accepted():
    target, draft = random_model(0), random_model(0)
    output, stats = speculative_generate(target, [3, 1, 4, 1, 5], 25, GREEDY, 4, DraftModel(draft))
    assert output == plain_greedy(target, [3, 1, 4, 1, 5], 25)
    assert stats.accepted == stats.proposed > 0


def test_an_unrelated_draft_is_rejected_yet_the_output_is_unchanged():
    target, draft = random_model(0), random_model(1)
    output, stats = speculative_generate(target, [3, 1, 4, 1, 5], 25, GREEDY, 4, DraftModel(draft))
    assert output == plain_greedy(target, [3, 1, 4, 1, 5], 25)
    assert stats.acceptance_rate < 0.2


def test_every_guess_rejected_keeps_only_the_targets_own_token():
    target = random_model(0)
    tokens = [3, 1, 4, 1, 5]
    with torch.no_grad():
        logits = target(torch.tensor([tokens]), torch.arange(5))[0, -1]
    best = logits.argmax().item()
    wrong = [(best + 1) % 320, (best + 2) % 320, (best + 3) % 320]
    target(torch.tensor([tokens[:-1]]), torch.arange(4))  # the cache holds all but the last token
    assert verify(target, tokens, wrong, None, GREEDY) == [best]


def test_after_a_partial_acceptance_the_cache_equals_a_fresh_forward():
    target = random_model(0)
    tokens = [3, 1, 4, 1, 5]
    greedy = plain_greedy(target, tokens, 3)
    target(torch.tensor([tokens[:-1]]), torch.arange(4))
    kept = verify(target, tokens, [greedy[0], (greedy[1] + 7) % 320, 11], None, GREEDY)  # one right, one wrong
    assert kept == greedy[:2]
    accepted = tokens + kept
    with torch.no_grad():  # the next step: the last kept token at its position, over the rolled-back cache
        next_logits = target(torch.tensor([[kept[-1]]]), torch.tensor([len(accepted) - 1]))[0, -1]
        fresh = random_model(0)(torch.tensor([accepted]), torch.arange(len(accepted)))[0, -1]
    assert torch.allclose(next_logits, fresh, atol=1e-5)


@pytest.mark.parametrize("with_draft", [True, False])
def test_sampled_tokens_follow_the_targets_distribution(with_draft):
    """The first token verify keeps is distributed as the target's next-token distribution, for a draft
    whose distribution is far from it (and for deterministic prompt-lookup guesses). A rule that
    accepted every guess, or resampled from p instead of norm(max(p - q, 0)), fails this."""
    vocab = 8
    target, draft = random_model(2, vocab), random_model(5, vocab)
    sampling = Sampling(temperature=1.0, top_k=None)
    tokens = [1, 2, 3]
    with torch.no_grad():
        p = probabilities(target(torch.tensor([tokens]), torch.arange(3))[:, -1], sampling)[0]
        q = probabilities(draft(torch.tensor([tokens]), torch.arange(3))[:, -1], sampling)[0]
    assert (p - q).abs().sum() / 2 > 0.2  # the draft really is a poor guess
    torch.manual_seed(0)
    counts = torch.zeros(vocab)
    drafter = DraftModel(draft)
    trials = 3000
    for _ in range(trials):
        if with_draft:
            drafter.cached = 0
            guesses, distributions = drafter.guesses(tokens, 2, sampling)
        else:
            guesses, distributions = [4, 4], None
        counts[verify(target, tokens, guesses, distributions, sampling)[0]] += 1
    total_variation = (counts / trials - p).abs().sum().item() / 2
    assert total_variation < 0.04


def test_draft_with_another_vocabulary_is_refused(capsys, smollm2_dir, tiny_dir):
    status = main(["--checkpoint_path", str(smollm2_dir), "--prompt", "hi", "--speculative", "draft",
                   "--draft_checkpoint_path", str(tiny_dir)])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert "has a different vocabulary from the target" in err and err.strip().count("\n") == 1


def test_speculative_runs_one_prompt_at_a_time(capsys, tiny_dir):
    status = main(["--checkpoint_path", str(tiny_dir), "--prompt", "a", "--prompt", "b",
                   "--speculative", "prompt_lookup"])
    assert status == 2 and "one prompt at a time" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("with_draft", [True, False])
def test_compiled_verify_equals_plain_greedy(with_draft):
    target = random_model(0)
    drafter = DraftModel(random_model(0 if with_draft else 1)) if with_draft else None
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 3, 1, 4, 1]  # repeats, so prompt lookup finds guesses
    compiled = torch.compile(target_logits, fullgraph=True)
    output, stats = speculative_generate(target, prompt, 30, GREEDY, 4, drafter, compiled_forward=compiled)
    assert output == plain_greedy(target, prompt, 30)
    if with_draft:  # the draft is the target itself: every guess accepted, far fewer passes
        assert stats.accepted == stats.proposed and stats.verify_steps < 10


@pytest.mark.slow
def test_compiled_lookahead_equals_plain_greedy():
    model = random_model(0)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 3, 1, 4, 1]
    compiled = torch.compile(lookahead_logits, fullgraph=True)
    output, _ = lookahead_generate(model, prompt, 30, 3, 4, compiled_forward=compiled)
    assert output == plain_greedy(model, prompt, 30)
