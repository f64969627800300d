"""The generation loop: one forward pass over the prompts (prefill) fills the static KV cache, then each new
token is one forward pass over a single position per row (a decode step), which reads every weight once, so
decoding is bound by memory bandwidth. `compile_steps` turns the decode step into one compiled graph (on
CUDA, a CUDA graph replayed without Python)."""
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from checkpoint import unique_state_dict
from model import ForwardOptions, Transformer
from sampling import Sampling, sample


def prefill(model: Transformer, tokens: Tensor, input_pos: Tensor, left_pad: Optional[Tensor], sampling: Sampling,
            attended_slots: Optional[int] = None):
    """Run the prompts (batch, seq) through the model, filling the cache; sample each row's next token."""
    logits = model(tokens, input_pos, ForwardOptions(left_pad=left_pad, attended_slots=attended_slots, logits_from=-1))
    return sample(logits[:, -1], sampling)


def decode_one_token(model: Transformer, token: Tensor, input_pos: Tensor, left_pad: Optional[Tensor],
                     sampling: Sampling, attended_slots: Optional[int] = None):
    """One decode step: the same pass as prefill over one token per row. A function of its own so that
    torch.compile keeps its compiled code (static shapes) apart from prefill's (every prompt length)."""
    logits = model(token, input_pos, ForwardOptions(left_pad=left_pad, attended_slots=attended_slots))
    return sample(logits[:, -1], sampling)


# Attention reads the KV cache up to the next power of two past the sequence, from this many slots: a step's
# cost follows the conversation, not the cache's size, and a compiled step compiles once per length (256,
# 512, ..., the cache's size: 6 lengths for an 8192-slot cache).
FEWEST_ATTENDED_SLOTS = 256


def slots_to_attend(length: int, cache_length: int) -> int:
    """The cache slots a pass attends over when its sequence, up to and including its last token, is
    length tokens long."""
    return min(cache_length, max(FEWEST_ATTENDED_SLOTS, 1 << (length - 1).bit_length()))


def attended_lengths(model: Transformer, longest: int, max_new_tokens: int) -> list:
    """The attended lengths (slots_to_attend) of the decode steps that continue prompts of up to
    longest tokens by max_new_tokens, in order."""
    lengths = [slots_to_attend(longest + 1, model.max_seq_length)]
    while lengths[-1] < slots_to_attend(longest + max_new_tokens, model.max_seq_length):
        lengths.append(slots_to_attend(lengths[-1] + 1, model.max_seq_length))
    return lengths


@dataclass(frozen=True)
class Steps:
    """The two kinds of forward pass generate() runs, each eager or compiled."""
    prefill: Callable = prefill
    decode: Callable = decode_one_token


@dataclass
class Timing:
    prefill_s: float = 0.0  # time to first token
    decode_s: float = 0.0  # every token after the first
    decode_steps: int = 0  # forward passes after prefill, each reading every weight once
    decoded_tokens: int = 0  # tokens those steps produced, all unfinished rows counted
    attended_slots: int = 0  # KV cache slots those steps' attention read, summed over the steps


@torch.no_grad()
def generate(model: Transformer, prompts: list, max_new_tokens: int, sampling: Sampling, stop_ids=(),
             start_pos: int = 0, on_token=None, steps: Steps = Steps()):
    """Continue each prompt (a non-empty list of token ids) by up to max_new_tokens tokens, stopping a row
    at its first stop id (which is kept). Prompts of different lengths are left-padded into one batch; the
    model masks the padding, so each row gets what it would get alone. start_pos > 0 continues a single
    sequence whose first start_pos tokens are already in the KV cache.
    on_token(row, token_id) is called as each token is produced. Returns (new ids per row, Timing)."""
    device = model.rope.device
    longest = max(len(prompt) for prompt in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(prompt)
    padding = [longest - len(prompt) for prompt in prompts]
    left_pad = torch.tensor(padding, device=device) if any(padding) else None
    timing = Timing()

    started = time.perf_counter()
    input_pos = torch.arange(start_pos, start_pos + longest, device=device)
    next_token = steps.prefill(model, tokens.to(device), input_pos, left_pad, sampling,
                               slots_to_attend(start_pos + longest, model.max_seq_length)).clone()
    outputs, finished = [[] for _ in prompts], [False] * len(prompts)
    for step in range(max_new_tokens):
        for row, token_id in enumerate(next_token.view(-1).tolist()):  # the one host sync per step
            if not finished[row]:
                outputs[row].append(token_id)
                finished[row] = token_id in stop_ids
                if on_token:
                    on_token(row, token_id)
        now = time.perf_counter()
        if step == 0:
            timing.prefill_s, decode_started = now - started, now
        if all(finished) or step == max_new_tokens - 1:
            break
        position = start_pos + longest + step
        attended = slots_to_attend(position + 1, model.max_seq_length)
        next_token = steps.decode(model, next_token, torch.tensor([position], device=device), left_pad, sampling,
                                  attended).clone()
        timing.decode_steps += 1
        timing.attended_slots += attended
        timing.decoded_tokens += sum(not done for done in finished)
    timing.decode_s = time.perf_counter() - decode_started
    return outputs, timing


# Inductor's wrapper checks each input's size and stride again before a CPU step's kernels run, after
# Dynamo's guards have (40 checks a block); skipping the repeat is measurably faster (docs/experiments.md).
CPU_COMPILE_OPTIONS = {"size_asserts": False}


def compile_step(step, device: str, cuda_graphs: bool = True):
    """torch.compile a step as one graph, no graph breaks (fullgraph); on CUDA captured as a CUDA graph
    (reduce-overhead) so that a step costs a single launch. Shapes stay static: a new batch size compiles
    afresh (torch 2.13 fails inside Dynamo when it would reuse the compiled block with a symbolic batch)."""
    if device == "cuda":
        return torch.compile(step, mode="reduce-overhead" if cuda_graphs else None, fullgraph=True, dynamic=False)
    return torch.compile(step, fullgraph=True, dynamic=False, options=CPU_COMPILE_OPTIONS)


def compile_steps(device: str, decode: bool = True, prefill_too: bool = False) -> Steps:
    """Steps with the decode step compiled (static shapes) and, with prefill_too, prefill (dynamic shapes:
    one graph for every prompt length)."""
    return Steps(prefill=torch.compile(prefill, fullgraph=True, dynamic=True) if prefill_too else prefill,
                 decode=compile_step(decode_one_token, device) if decode else decode_one_token)


def weights_bytes(model: Transformer) -> int:
    """Bytes of weights one decode step of one sequence reads: every weight once, as the step reads it (int8
    and int4 weights with their scales; where a CPU form keeps a weight in its kernel's order, that copy),
    except that an input embedding the output head does not share is only looked up (one row per token),
    and of a mixture's experts only the experts_per_token of n_experts that the token chose."""
    args, total = model.args, 0
    head = {id(tensor) for tensor in model.output.state_dict(keep_vars=True).values()}
    for name, tensor in unique_state_dict(model).items():
        share = args.experts_per_token / args.n_experts if ".experts." in name else 1
        if not name.startswith("tok_embeddings.") or id(tensor) in head:
            total += tensor.numel() * tensor.element_size() * share
    return round(total)


def cache_bytes_per_slot(model: Transformer) -> int:
    """Bytes one slot of one row of the model's KV cache type takes: keys and values of every layer, a
    quantized cache's scales included (measured on a one-slot cache of each layer's shape)."""
    dtype = model.norm.weight.dtype
    caches = [model.kv_cache_type(1, 1, layer.attention.n_kv_heads, model.args.head_dim, dtype)
              for layer in model.layers]
    return sum(buffer.numel() * buffer.element_size() for cache in caches for buffer in cache.buffers())


def cache_rows_within(model: Transformer, budget: int, slots: int) -> int:
    """How many rows of `slots` slots of the model's KV cache type fit in `budget` bytes (FlexGen's point:
    a smaller cache buys a bigger batch)."""
    return budget // (cache_bytes_per_slot(model) * slots)


def kv_cache_bytes(model: Transformer, batch: int, slots: float) -> int:
    """Bytes of KV cache a decode step reads when its attention runs over `slots` slots of each row in use
    (slots_to_attend: the sequence so far, rounded up; masked slots are read too), as stored."""
    return round(cache_bytes_per_slot(model) * slots * batch)
