"""Speculative decoding: guess several tokens cheaply, then let the target model check them all in one
forward pass. Decoding reads every weight once per forward pass, so each accepted guess is a token
that cost no extra pass over the target's weights.

Two ways to guess:
- draft: a smaller model with the same tokenizer (or the target's own int8 / int4 file) proposes k tokens;
- prompt_lookup: the k tokens that followed the last earlier occurrence of the sequence's final n-gram
  (no second model at all; it shines when the output repeats the input, as in summaries and edits).

Either way the output is distributed exactly as the target's own samples (greedy: token for token the
same), by the rejection rule of Leviathan et al. 2023 and Chen et al. 2023: a guess d drawn from q is
accepted with probability min(1, p(d) / q(d)); the first rejected one is replaced by a sample from
norm(max(p - q, 0)); if every guess is accepted, the target's next distribution gives one more token.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from generate import Sampling, probabilities
from model import Transformer


@dataclass
class SpeculationStats:
    proposed: int = 0  # guesses checked by the target
    accepted: int = 0  # guesses the target kept
    verify_steps: int = 0  # target forward passes after the prompt

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)

    @property
    def tokens_per_step(self) -> float:
        return (self.accepted + self.verify_steps) / max(self.verify_steps, 1)  # each step adds one own token


def prompt_lookup_guesses(tokens: list, k: int, max_ngram: int = 3) -> list:
    """The k tokens that followed the most recent earlier occurrence of the longest final n-gram."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


class DraftModel:
    """Guesses from a smaller model, which keeps its own KV cache in step with the target's."""

    def __init__(self, model: Transformer):
        self.model = model
        self.cached = 0  # tokens of the sequence whose keys and values the draft's cache holds

    @torch.no_grad()
    def guesses(self, tokens: list, k: int, sampling: Sampling):
        """k guesses, and the draft distribution each was drawn from: (k, vocab)."""
        device = self.model.rope.device
        pending = torch.tensor([tokens[self.cached:]], device=device)
        input_pos = torch.arange(self.cached, len(tokens), device=device)
        guesses, distributions = [], []
        for _ in range(k):
            q = probabilities(self.model(pending, input_pos)[:, -1], sampling)
            guess = torch.multinomial(q, 1)
            guesses.append(guess.item())
            distributions.append(q[0])
            pending, input_pos = guess, input_pos[-1:] + 1
        # the cache now holds everything but the last guess; a rejection rolls `cached` back (verify)
        self.cached = len(tokens) + k - 1
        return guesses, torch.stack(distributions)


def target_logits(target: Transformer, inputs: Tensor, input_pos: Tensor) -> Tensor:
    return target(inputs, input_pos)


@torch.no_grad()
def verify(target: Transformer, tokens: list, guesses: list, draft_distributions, sampling: Sampling,
           forward=target_logits, pad_to: int = 0):
    """Run the target once over the last token and the guesses; return the tokens it keeps: the accepted
    guesses and one token of its own. `tokens[-1]` is sampled but not yet in the target's cache.
    draft_distributions: (len(guesses), vocab), or None for a deterministic guess (prompt lookup).
    pad_to: pad the guesses to this many, so that every pass has one shape (for a compiled forward);
    the padding's cache slots are overwritten by the next pass before anything attends to them."""
    device = target.rope.device
    start = len(tokens) - 1
    padded = guesses + [tokens[-1]] * (pad_to - len(guesses))
    inputs = torch.tensor([[tokens[-1], *padded]], device=device)
    logits = forward(target, inputs, torch.arange(start, start + len(padded) + 1, device=device))
    p = probabilities(logits[0, :len(guesses) + 1], sampling)
    kept = []
    for i, guess in enumerate(guesses):
        if draft_distributions is not None:
            q = draft_distributions[i]
        else:  # a deterministic guess: all of q's mass on it
            q = torch.zeros_like(p[i])
            q[guess] = 1.0
        if torch.rand(()) < torch.clamp(p[i, guess] / q[guess], max=1):
            kept.append(guess)
            continue
        residual = torch.clamp(p[i] - q, min=0)  # where the target wants more than the draft offered
        kept.append(torch.multinomial(residual / residual.sum(), 1).item())
        return kept
    kept.append(torch.multinomial(p[-1], 1).item())  # every guess accepted: one more from the target
    return kept


@torch.no_grad()
def speculative_generate(target: Transformer, prompt: list, max_new_tokens: int, sampling: Sampling, k: int,
                         draft: DraftModel = None, stop_ids=(), on_token=None, compiled_forward=None):
    """Like generate.generate for one prompt, with up to k guesses per target pass, from draft if given,
    else from prompt lookup. compiled_forward: a torch.compile'd target_logits, then run on k + 1
    tokens every pass. Returns (new token ids, SpeculationStats)."""
    device = target.rope.device
    logits = target(torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device))
    new = [torch.multinomial(probabilities(logits[:, -1], sampling), 1).item()]
    if on_token:
        on_token(0, new[0])
    if draft is not None:
        draft.cached = 0
    stats = SpeculationStats()
    while len(new) < max_new_tokens and new[-1] not in stop_ids:
        tokens = prompt + new
        room = min(k, max_new_tokens - len(new) - 1, target.max_seq_length - len(tokens) - 1)
        if draft is not None and room > 0:
            guesses, distributions = draft.guesses(tokens, room, sampling)
        else:
            guesses, distributions = prompt_lookup_guesses(tokens, room), None
        if compiled_forward is not None and len(tokens) + k < target.max_seq_length:
            kept = verify(target, tokens, guesses, distributions, sampling, compiled_forward, pad_to=k)
        else:
            kept = verify(target, tokens, guesses, distributions, sampling)
        stats.verify_steps += 1
        stats.proposed += len(guesses)
        stats.accepted += len(kept) - 1
        if draft is not None:
            draft.cached = min(draft.cached, len(tokens) + len(kept) - 1)  # forget the rejected guesses
        for token in kept:
            new.append(token)
            if on_token:
                on_token(0, token)
            if token in stop_ids:
                break
    return new, stats
