"""Speculative decoding: guess several tokens cheaply, then let the target model check them all in one
forward pass. Decoding reads every weight once per forward pass, so each accepted guess is a token
that cost no extra pass over the target's weights.

Three ways to guess:
- draft: a smaller model with the same tokenizer (or the target's own int8 / int4 file) proposes k tokens;
- prompt_lookup: the k tokens that followed the last earlier occurrence of the sequence's final n-gram
  (no second model at all; it shines when the output repeats the input, as in summaries and edits);
- lookahead: the model's own Jacobi iterations and the n-grams they produce (Lookahead, below; greedy).

Either way the output is distributed exactly as the target's own samples (greedy: token for token the
same), by the rejection rule of Leviathan et al. 2023 and Chen et al. 2023: a guess d drawn from q is
accepted with probability min(1, p(d) / q(d)); the first rejected one is replaced by a sample from
norm(max(p - q, 0)); if every guess is accepted, the target's next distribution gives one more token.

run_speculative runs one prompt either way for the command line (generate.py --speculative).
"""
import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import quantized_kv_cache
from checkpoint import load_model, stored_weights
from cli import UsageError
from generation import compile_step
from model import ForwardOptions, Transformer
from prepare import activation_dtype, prepare
from runtime import Setup, compile_announced, streaming
from sampling import Sampling, probabilities
from tokenizer import Tokenizer, load_tokenizer


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


def lookahead_rows(n: int, window: int) -> int:
    """Tokens in every lookahead pass: n + 1 pending, n levels of `window` guesses, `window` n-grams."""
    return (n + 1) + n * window + window * n


def lookahead_logits(model: Transformer, inputs: Tensor, slots: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
    return model(inputs, slots, ForwardOptions(positions=positions, mask=mask))


class Lookahead:
    """Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM Inference Using
    Lookahead Decoding"), greedy. No draft model: one forward pass of the model itself does three jobs.

    - Pending: the tokens accepted last step, written at their true cache slots (the causal part).
    - Lookahead branch: a window of `window` columns, each a chain of `n` guessed tokens at consecutive
      positions (Jacobi iteration: every pass re-predicts each guess from the guesses before it). The
      model's prediction after each chain closes an (n + 1)-gram, which goes into a pool; the chains
      then shift by one level, the predictions becoming their newest level.
    - Verification branch: up to `window` pooled n-grams that begin with the last token. The longest
      one the model's own greedy predictions confirm is accepted, plus the model's next token, so the
      output is token for token plain greedy decoding.

    Branch tokens are written to scratch cache slots past the sequence and see, through an explicit
    mask, only the sequence and their own branch; the next pass overwrites those slots. Every pass has
    one shape (pending tokens padded to n + 1), so it compiles once. The pool also starts with the
    prompt's n-grams and learns the output's, which is prompt lookup for free."""

    def __init__(self, model: Transformer, n: int, window: int):
        self.model, self.n, self.window = model, n, window
        self.candidates = window  # verified n-grams per pass
        self.pending_rows = n + 1  # at most the n accepted guesses and the bonus token
        self.lookahead_rows = n * window
        self.rows = lookahead_rows(n, window)
        self.pool = {}  # first token -> up to `candidates` n-token continuations, most recent first
        self.template = self.branch_template()

    def branch_template(self):
        """Slot offsets (past the sequence) and relative positions of the branch rows, and which
        branch rows each one sees: (offsets, positions, mask over the branch rows)."""
        n, window = self.n, self.window
        lookahead = [(level, column) for level in range(n) for column in range(window)]
        candidates = [(g, i) for g in range(self.candidates) for i in range(n)]
        size = len(lookahead) + len(candidates)
        mask = torch.zeros(size, size, dtype=torch.bool)
        positions = torch.zeros(size, dtype=torch.long)
        for row, (level, column) in enumerate(lookahead):
            positions[row] = 1 + column + level
            for earlier in range(column):  # the guessed text before this column
                mask[row, earlier] = True
            for below in range(level + 1):  # this column's chain, itself included
                mask[row, below * window + column] = True
        for row, (g, i) in enumerate(candidates, start=len(lookahead)):
            positions[row] = 1 + i
            mask[row, row - i:row + 1] = True  # the candidate's own tokens so far
        return positions, mask

    def remember(self, tokens: list, start: int):
        """Pool the n-grams of tokens that end at index start or later."""
        for end in range(max(start, self.n), len(tokens)):
            self.add(tokens[end - self.n], tuple(tokens[end - self.n + 1:end + 1]))

    def add(self, first: int, continuation: tuple):
        known = self.pool.setdefault(first, [])
        if continuation in known:
            known.remove(continuation)
        known.insert(0, continuation)
        del known[self.candidates:]

    def step(self, tokens: list, cached: int, levels: list, forward=lookahead_logits):
        """One pass over the pending tokens tokens[cached:] and both branches. Returns the tokens kept,
        how many guessed tokens were checked, and the lookahead window's next levels."""
        device, n, window = self.model.rope.device, self.n, self.window
        pending, base, last = tokens[cached:], len(tokens), tokens[-1]
        candidates = self.pool.get(last, [])
        padding = self.pending_rows - len(pending)
        branch = [t for level in levels for t in level] + [t for c in candidates for t in c]
        branch += [last] * (self.rows - self.pending_rows - len(branch))  # unused candidate rows
        scratch = base + len(branch)  # where the padding rows write: past the branch rows
        slots = [*range(cached, base), *range(scratch, scratch + padding), *range(base, scratch)]
        branch_positions, branch_mask = self.template
        positions = torch.tensor(slots[:self.pending_rows] + (branch_positions + base - 1).tolist())
        mask = torch.zeros(self.rows, self.model.max_seq_length, dtype=torch.bool)
        for i in range(len(pending)):
            mask[i, :cached + i + 1] = True  # causal over the sequence
        for i in range(len(pending), self.pending_rows):
            mask[i, slots[i]] = True  # padding sees itself only
        mask[self.pending_rows:, :base] = True  # every branch sees the whole sequence
        mask[self.pending_rows:, base:scratch] = branch_mask
        inputs = torch.tensor([pending + [last] * padding + branch], device=device)
        logits = forward(self.model, inputs, torch.tensor(slots, device=device), positions.to(device),
                         mask.to(device))
        predictions = logits[0].argmax(-1).tolist()

        kept = [predictions[len(pending) - 1]]  # the model's own next token, if no candidate holds
        first_candidate_row = self.pending_rows + self.lookahead_rows
        for g, candidate in enumerate(candidates):
            accepted, expected = [], predictions[len(pending) - 1]
            for i, token in enumerate(candidate):
                if token != expected:
                    break
                accepted.append(token)
                expected = predictions[first_candidate_row + g * n + i]
            if len(accepted) + 1 > len(kept):
                kept = accepted + [expected]

        newest = predictions[self.pending_rows + (n - 1) * window:self.pending_rows + n * window]
        for column in range(window):  # each column's chain and the prediction after it: an (n + 1)-gram
            self.add(levels[0][column], tuple(level[column] for level in levels[1:]) + (newest[column],))
        return kept, n if candidates else 0, levels[1:] + [newest]


@torch.no_grad()
def lookahead_generate(model: Transformer, prompt: list, max_new_tokens: int, n: int, window: int, stop_ids=(),
                       on_token=None, compiled_forward=None):
    """Greedy decoding of one prompt by lookahead: n-grams of n + 1 tokens, a window of `window` columns.
    compiled_forward: a torch.compile'd lookahead_logits. Returns (new token ids, SpeculationStats)."""
    lookahead = Lookahead(model, n, window)
    needed = len(prompt) + max_new_tokens + lookahead.rows  # the scratch slots of the last pass included
    if model.max_seq_length < needed:
        model.setup_caches(1, needed)
    device = model.rope.device
    logits = model(torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device))
    new = [logits[0, -1].argmax().item()]
    if on_token:
        on_token(0, new[0])
    lookahead.remember(prompt, 0)
    guesses = random.Random(0)  # the first window: tokens of the prompt, which Jacobi steps then refine
    levels = [[guesses.choice(prompt) for _ in range(window)] for _ in range(n)]
    stats, cached = SpeculationStats(), len(prompt)
    while len(new) < max_new_tokens and new[-1] not in stop_ids:
        tokens = prompt + new
        kept, checked, levels = lookahead.step(tokens, cached, levels, compiled_forward or lookahead_logits)
        cached = len(tokens)
        stats.verify_steps += 1
        stats.proposed += checked
        stats.accepted += len(kept) - 1
        for token in kept[:max_new_tokens - len(new)]:
            new.append(token)
            if on_token:
                on_token(0, token)
            if token in stop_ids:
                break
        lookahead.remember(prompt + new, len(tokens))
    return new, stats


def draft_model(checkpoint_path, setup: Setup, dtype_name: str, kv_cache: str) -> DraftModel:
    """--speculative draft's model for the target of setup, in its own activations (--dtype auto picks them by
    what its file stores), its KV cache of the kind kv_cache; one line for a draft that cannot be used."""
    try:
        dtype = activation_dtype(dtype_name, setup.device, weights=stored_weights(checkpoint_path))
        draft = load_draft(checkpoint_path, setup.tokenizer, setup.device, dtype)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"--draft_checkpoint_path: {error}") from None
    quantized_kv_cache.use(draft.model, kv_cache)
    return draft


def load_draft(checkpoint_path, tokenizer: Tokenizer, device: str, dtype: torch.dtype) -> DraftModel:
    """A draft model for a target that uses tokenizer, refused (ValueError) unless its tokenizer is the same."""
    draft_tokenizer = load_tokenizer(checkpoint_path)
    probe = "Speculative drafts must tokenize 1,234 words the same way: naïve café 東京!"
    if (draft_tokenizer.vocab_size, draft_tokenizer.special_tokens, draft_tokenizer.encode(probe)) != (
            tokenizer.vocab_size, tokenizer.special_tokens, tokenizer.encode(probe)):
        raise ValueError(f"the draft at {checkpoint_path} has a different vocabulary from the target: "
                         "use a draft with the same tokenizer")
    return DraftModel(prepare(load_model(checkpoint_path, device, dtype), device))


def compiled_verify_forward(kind: str, device: str) -> Callable:
    """The target's verify pass, compiled (one static shape): what --compile compiles instead of the decode
    step."""
    return compile_step(lookahead_logits if kind == "lookahead" else target_logits, device, cuda_graphs=False)


def run_speculative(setup: Setup, kind: str, prompt: list, max_new_tokens: int, k: int, window: int,
                    draft: Optional[DraftModel], verify_forward: Optional[Callable] = None):
    """One prompt by speculative decoding (kind: draft, prompt_lookup or lookahead), its text streamed to stdout,
    its statistics to stderr. The target's cache is set up for the prompt and max_new_tokens."""
    model = setup.model
    if kind == "lookahead":  # room for the scratch slots of its last pass, before compiling
        model.setup_caches(1, len(prompt) + max_new_tokens + lookahead_rows(k, window))
    if draft is not None:
        draft.model.setup_caches(1, model.max_seq_length)

    def speculate(new_tokens, stop_ids=(), on_token=None):
        if kind == "lookahead":
            return lookahead_generate(model, prompt, new_tokens, k, window, stop_ids, on_token, verify_forward)
        return speculative_generate(model, prompt, new_tokens, setup.sampling, k, draft, stop_ids, on_token,
                                    verify_forward)

    if verify_forward is not None:  # compile outside the timings, as runtime.warm_up does for plain decoding
        compile_announced(lambda: speculate(2 * k + 2))
    on_token, finish = streaming(setup.tokenizer)
    started = time.perf_counter()
    output, stats = speculate(max_new_tokens, setup.tokenizer.stop_ids, on_token)
    seconds = time.perf_counter() - started
    finish()
    print(f"speculative ({kind}, k={k}): {len(output)} tokens in {seconds:.2f} s, {len(output) / seconds:.1f} "
          f"tokens/s including prefill; acceptance rate {stats.acceptance_rate:.0%} ({stats.accepted}/"
          f"{stats.proposed}); {stats.tokens_per_step:.2f} tokens per target forward pass", file=sys.stderr)


def speculative_flags(parser: argparse.ArgumentParser):
    """generate.py's flags for speculative decoding."""
    parser.add_argument("--speculative", choices=["draft", "prompt_lookup", "lookahead"],
                        help="speculative decoding (one prompt): guesses from a draft model, from the prompt, or "
                             "from the model's own Jacobi iterations (lookahead; greedy)")
    parser.add_argument("--draft_checkpoint_path", type=Path, help="--speculative draft: a smaller model with "
                        "the same tokenizer, or a quantized file of the target")
    parser.add_argument("--speculate_k", type=int, default=5, help="guesses the target checks per forward pass "
                        "(lookahead: the n-gram length less one)")
    parser.add_argument("--lookahead_window", type=int, default=5, help="--speculative lookahead: Jacobi columns "
                        "and n-grams verified per pass")


def check_speculative_flags(args: argparse.Namespace):
    """Those flags against the rest of generate.py's: one line for what does not go together."""
    if args.speculative == "draft" and args.draft_checkpoint_path is None:
        raise UsageError("--speculative draft needs --draft_checkpoint_path")
    if args.speculative == "lookahead" and (args.temperature != 0 or args.lookahead_window < 1):
        raise UsageError("--speculative lookahead decodes greedily: add --temperature 0 (and --lookahead_window >= 1)")
    if args.speculative and (args.interactive or args.random_weights or args.speculate_k < 1):
        raise UsageError("--speculative needs --speculate_k >= 1 and a prompt (not --interactive / --random_weights)")
