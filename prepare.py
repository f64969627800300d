"""The one step between loading a model and running it, the same for every command line and benchmark. Loading
(checkpoint.py) gives the plain layers of model.py and quantized_layers.py; what the device and the step that
will run the model change is decided here, and only here:

- the activations' dtype (`activation_dtype`, one table; loading casts the floating-point tensors to it), and
- the layers' forms (`prepare`): the device's own (cpu_kernels.py, cuda_kernels.py), and for a compiled step a
  mixture's experts in a form whose shapes do not depend on which experts the tokens chose.

A step is how the decode step runs: "eager" (each module called from Python), "compiled" (torch.compile, on CUDA
captured as a CUDA graph) or "aot" (an AOTInductor package, aot_step.py, built or loaded on a CPU)."""
import torch
import torch.nn as nn
from torch import Tensor

import cpu_kernels
import cuda_kernels
from cli import DTYPES, UsageError
from model import Experts, Transformer, run_expert, swap_layers

STEPS = ("eager", "compiled", "aot")
EXPERTS_FORMS = (Experts, cpu_kernels.CPUExperts)  # a mixture's experts, plain or in a device's form


def activation_dtype(name: str, device: str, step: str = "eager", weights: str = "float") -> torch.dtype:
    """--dtype: a name of DTYPES (checked to run on the device), or "auto", which is

        device  weights        eager  compiled  aot
        cuda    any            bf16   bf16      -
        mps     any            fp16   fp16      -
        cpu     float          fp32   bf16      fp32
        cpu     int8 / int4    fp32   fp32      fp32

    On a CPU a compiled step reads bf16 float weights, half the bytes of fp32 ones, faster; an AOT package of a
    bf16 model runs no faster than eager, so it keeps fp32 (docs/cpu_kernels.md, docs/experiments.md). Quantized
    weights take fp32 activations: brisk's kernels round them to int8 themselves (cpu_kernels.py).
    weights: "float", "int8" or "int4", what the checkpoint stores (checkpoint.stored_weights)."""
    if name == "auto":
        cpu_bf16 = weights == "float" and step == "compiled"
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device, torch.bfloat16 if cpu_bf16 else torch.float32)
    dtype = DTYPES[name]
    try:
        probe = torch.ones(2, 2, dtype=dtype, device=device)
        (probe @ probe).sum().item()
    except (RuntimeError, TypeError):
        raise UsageError(f"--dtype {name} is not supported on {device}: try --dtype fp32") from None
    return dtype


class CompiledExperts(nn.Module):
    """A mixture's experts in a compiled step, through the projections of the form it wraps (model.Experts, or
    a device's form of it). torch.compile traces one graph of fixed shapes, and which experts the tokens chose
    is known only when the step runs, so the eager way (model.run_experts: each chosen expert over the tokens
    that chose it) cannot be traced. Here a few tokens (decoding) run each of their own k experts, the expert a
    0-d tensor that indexes its rows inside the graph: a step still reads only the chosen experts' weights.
    More tokens (a prompt) run every expert over every token, each output weighted by how much that token
    chose the expert (zero if not at all)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts
        self.n_experts = experts.n_experts

    def forward(self, tokens: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        # tokens (T, dim); chosen, weights (T, k)
        if chosen.numel() <= self.n_experts:
            return torch.cat([sum(run_expert(self.experts, tokens[t:t + 1], chosen[t][j]) * weights[t, j]
                                  for j in range(chosen.shape[1])) for t in range(chosen.shape[0])])
        out = torch.zeros_like(tokens)
        for expert in range(self.n_experts):
            share = (weights * (chosen == expert)).sum(-1, keepdim=True)  # (T, 1)
            out += run_expert(self.experts, tokens, expert) * share
        return out


def prepare(model: Transformer, device: str, step: str = "eager") -> Transformer:
    """The loaded model (in activation_dtype's dtype) with the forms of its layers for device and step, changed
    in place. A model streamed from disk or host memory (offload.py) keeps its plain layers: its blocks' tensors
    are read into them as it runs."""
    if step not in STEPS:
        raise ValueError(f"step {step!r} is not one of {STEPS}")
    if hasattr(model, "streamer"):
        return model
    kind = torch.device(device).type
    if kind == "cpu":
        cpu_kernels.swap_in(model, compiled_decode=step != "eager")
    elif kind == "cuda":
        cuda_kernels.swap_in(model)
    if step != "eager":
        swap_layers(model, lambda layer: CompiledExperts(layer) if isinstance(layer, EXPERTS_FORMS) else layer)
    return model
