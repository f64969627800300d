"""Sampling the next token from logits: greedy, temperature, top-k, top-p (nucleus) and min-p, drawn without a
host sync so that it fits inside a compiled decode step. speculative.py reads the same distribution. The
server's penalties, which depend on a request's own tokens, change the logits before (`penalize`)."""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Sampling:
    temperature: float = 0.8  # 0 means greedy
    top_k: Optional[int] = 200
    top_p: Optional[float] = None
    min_p: Optional[float] = None  # keep the tokens at least min_p times as likely as the likeliest


@dataclass(frozen=True)
class Penalties:
    """What a request's own tokens do to its next token's logits. presence (OpenAI's presence_penalty) is taken
    off every token generated at least once, frequency (frequency_penalty) once for each time it was; both
    over the generated tokens, as vLLM counts them. repetition (CTRL, Keskar et al. 2019) divides a positive
    logit of any token of the prompt or the generated text, and multiplies a negative one; 1 leaves them.
    logit_bias: (token id, added logit) pairs."""
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    logit_bias: tuple = ()


def penalize(logits: Tensor, penalties: Penalties, prompt: list, generated: list) -> Tensor:
    """(1, vocab) logits with the penalties of a request that has its prompt and has generated so far."""
    logits = logits.float().clone()
    if generated and (penalties.presence or penalties.frequency):
        ids, counts = torch.tensor(generated, device=logits.device).unique(return_counts=True)
        logits[:, ids] -= penalties.frequency * counts + penalties.presence
    if penalties.repetition != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(generated)), device=logits.device, dtype=torch.long)
        picked = logits[:, seen]
        logits[:, seen] = torch.where(picked > 0, picked / penalties.repetition, picked * penalties.repetition)
    for token, bias in penalties.logit_bias:
        logits[:, token] += bias
    return logits


def sample(logits: Tensor, sampling: Sampling, generator: Optional[torch.Generator] = None) -> Tensor:
    """Next token of each row from (batch, vocab) logits, without a host sync. generator: the random stream
    to draw from (a server gives each seeded request its own); None draws from torch's global one."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = probabilities(logits, sampling)
    # argmax of p / Exp(1) noise is a sample from p (the exponential race), with no host sync
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1, keepdim=True)


def probabilities(logits: Tensor, sampling: Sampling) -> Tensor:
    """The distribution sample() draws from: temperature, then top-k, then top-p, then min-p; greedy is
    one-hot."""
    if sampling.temperature == 0:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        kth_largest = torch.topk(logits, min(sampling.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, -float("inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    if sampling.top_p is not None:
        # nucleus sampling (Holtzman et al. 2019): keep the most likely tokens whose mass reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= sampling.top_p, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if sampling.min_p is not None:
        # min-p (Nguyen et al. 2024): a floor that follows the likeliest token's probability
        probs = probs.masked_fill(probs < sampling.min_p * probs.amax(dim=-1, keepdim=True), 0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
