"""Sampling the next token from logits: greedy, temperature, top-k and top-p (nucleus), drawn without a
host sync so that it fits inside a compiled decode step. speculative.py reads the same distribution."""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Sampling:
    temperature: float = 0.8  # 0 means greedy
    top_k: Optional[int] = 200
    top_p: Optional[float] = None


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
    """The distribution sample() draws from: temperature, then top-k, then top-p; greedy is one-hot."""
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
    return probs
