"""Weight-only quantization: int8, int4 (group-wise), GPTQ int4 and NF4.

    python quantize.py --mode int8
    python quantize.py --mode int4 --groupsize 64
    python quantize.py --mode int4-gptq --groupsize 128 --calibration_file notes.txt
    python quantize.py --mode nf4 --groupsize 64

Decoding reads every weight once per token, so fewer bytes per weight is more tokens per second.
Activations stay in floating point; only the weights of the linear layers (and, with
--quantize_embedding, the embedding / output head) are stored as integers, in the formats of
quantized_layers.py:
- int8: symmetric, one scale per output channel: w = q * scale, q in [-128, 127].
- int4: asymmetric, one scale and zero per group of `groupsize` input columns, rounded to nearest.
- int4-gptq: the same format, with the rounding chosen by GPTQ (Frantar et al. 2022) to minimise each
  layer's output error on calibration text.
- nf4: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023), bitsandbytes' "load in 4 bit": w = NF4[q] * absmax,
  one absmax per group of `groupsize` columns, the absmaxes double-quantized to 8 bits (--no_double_quant:
  kept as floats).

The file (checkpoints/NAME/model_int8.safetensors, model_int4.g64.safetensors, model_nf4.g64.safetensors,
...) is portable: int4 values are packed two per byte (GGUF's Q4 layout); a device kernel's own layout is
built when the file is loaded, on whatever device that is.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from checkpoint import load_model, save_model
from cli import UsageError, fail, peak_memory_gb, read_text
from generation import generate
from model import Experts, MoEFeedForward, block_layers
from quantized_layers import (Int4Linear, Int8Linear, NF4Linear, QuantizedEmbedding, double_quantize,
                              int4_group_params, int4_values, pack_int4, quantize_int8, quantize_nf4)
from sampling import Sampling
from tokenizer import load_tokenizer

MODES = ("int8", "int4", "int4-gptq", "nf4")
GROUPSIZES = (32, 64, 128, 256)


def quantized_layer(linear: nn.Linear, mode: str, groupsize: int, double_quant: bool = True) -> nn.Module:
    """An empty (not yet filled) quantized layer of the same shape as linear."""
    if mode == "int8":
        return Int8Linear(linear.in_features, linear.out_features)
    if mode == "nf4":
        return NF4Linear(linear.in_features, linear.out_features, groupsize, double_quant)
    return Int4Linear(linear.in_features, linear.out_features, groupsize)


def with_bias(layer: nn.Module, linear: nn.Linear) -> nn.Module:
    """The quantized layer given linear's bias, if it has one, as it is: a few floats per output, not worth
    quantizing (Qwen2's q/k/v projections)."""
    if linear.bias is not None:
        layer.bias = linear.bias.detach().clone()
    return layer


def set_rtn(layer: nn.Module, weight: Tensor):
    """Fill a quantized layer by rounding weight to the nearest grid point (round-to-nearest, RTN)."""
    if isinstance(layer, Int8Linear):
        layer.weight, layer.scales = quantize_int8(weight, layer.groupsize)
    elif isinstance(layer, NF4Linear):
        set_nf4(layer, *quantize_nf4(layer.padded(weight), layer.groupsize))
    else:
        weight = layer.padded(weight)
        scales, zeros = int4_group_params(weight, layer.groupsize)
        set_int4(layer, int4_values(weight, scales, zeros, layer.groupsize), scales, zeros)


def set_int4(layer: Int4Linear, values: Tensor, scales: Tensor, zeros: Tensor):
    layer.weight, layer.scales, layer.zeros = pack_int4(values, layer.groupsize), scales, zeros


def set_nf4(layer: NF4Linear, codes: Tensor, absmax: Tensor):
    layer.weight = pack_int4(codes, layer.groupsize)
    if layer.double_quant:
        layer.absmax_codes, layer.absmax_scales, layer.absmax_offset = double_quantize(absmax)
    else:
        layer.absmax = absmax


def gptq_quantize(weight: Tensor, hessian: Tensor, groupsize: int, blocksize: int = 128, percdamp: float = 0.01):
    """GPTQ (Frantar et al. 2022, Algorithm 1) for one layer: quantize the columns left to right and
    push each column's rounding error onto the columns not yet quantized, weighted by the inverse
    Hessian H^-1 of the layer's inputs (H = 2 X^T X), so that the layer's output error ||W X - Q X||
    stays small. Returns int4 values (out, in) and the group scales and zeros."""
    W = weight.float().clone()
    H = hessian.float().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0])  # damping keeps H invertible
    # Upper Cholesky factor of H^-1: row i holds what column i's error contributes to the columns
    # after it, already conditioned on the columns before it (the paper's Cholesky reformulation, eq. 5).
    H_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    values = torch.zeros_like(W, dtype=torch.uint8)
    n_groups = W.shape[1] // groupsize
    scales, zeros = torch.zeros(W.shape[0], n_groups), torch.zeros(W.shape[0], n_groups)
    blocksize = max(blocksize // groupsize, 1) * groupsize  # a group never straddles two blocks

    for start in range(0, W.shape[1], blocksize):
        end = min(start + blocksize, W.shape[1])
        block = W[:, start:end].clone()
        block_errors = torch.zeros(W.shape[0], end - start)
        block_inv = H_inv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            group = column // groupsize
            if column % groupsize == 0:  # group parameters from the weights as updated so far
                scales[:, group:group + 1], zeros[:, group:group + 1] = int4_group_params(
                    block[:, i:i + groupsize], groupsize)
            q = int4_values(block[:, i:i + 1], scales[:, group:group + 1], zeros[:, group:group + 1], 1)
            values[:, column] = q[:, 0]
            dequantized = (q[:, 0].float() - 8) * scales[:, group] + zeros[:, group]
            error = (block[:, i] - dequantized) / block_inv[i, i]
            block[:, i:] -= error[:, None] * block_inv[i, i:][None, :]  # lazy batched update (section 3.3)
            block_errors[:, i] = error
        W[:, end:] -= block_errors @ H_inv[start:end, end:]
    return values, scales, zeros


def gptq_layer(weight: Tensor, hessian: Tensor, groupsize: int, blocksize: int = 128, percdamp: float = 0.01):
    """An Int4Linear filled by GPTQ. Padding columns (see Int4Linear) always meet zero inputs, so they
    enter the Hessian as dead columns."""
    layer = Int4Linear(weight.shape[1], weight.shape[0], groupsize)
    padding = layer.padded_in - layer.in_features
    hessian = F.pad(hessian, (0, padding, 0, padding))
    set_int4(layer, *gptq_quantize(layer.padded(weight), hessian, groupsize, blocksize, percdamp))
    return layer


class HessianAccumulator:
    """H = 2/n * sum of x x^T over every input row x a linear layer sees, kept as a running mean, so
    memory is (in_features)^2 however many calibration tokens pass through."""

    def __init__(self, in_features: int):
        self.hessian, self.rows = torch.zeros(in_features, in_features), 0

    def add(self, module, inputs, output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        total = self.rows + x.shape[0]
        self.hessian *= self.rows / total
        self.hessian += (2 / total) * x.T @ x
        self.rows = total


class ExpertHessians:
    """The Hessians of a mixture's experts, each from the tokens routed to it: its inputs (which w1 and w3
    share) and its hidden activations (w2's input). Collected by a forward hook on the Experts module,
    which hands its layers no input of their own."""

    def __init__(self, experts: Experts):
        self.inputs = [HessianAccumulator(experts.w1.in_features) for _ in range(experts.n_experts)]
        self.hidden = [HessianAccumulator(experts.w2.in_features) for _ in range(experts.n_experts)]

    def add(self, experts, inputs, output):
        tokens, chosen, _ = inputs
        for expert in chosen.unique().tolist():
            x = tokens[(chosen == expert).any(-1)]
            h = F.silu(experts.project("w1", x, expert)) * experts.project("w3", x, expert)
            self.inputs[expert].add(None, (x,), None)
            self.hidden[expert].add(None, (h,), None)

    def quantized(self, experts: Experts, name: str, groupsize: int, blocksize: int, percdamp: float) -> Int4Linear:
        """Projection `name` of every expert quantized by GPTQ with that expert's Hessian, the experts' rows
        one layer again; an expert that no calibration token chose is rounded to nearest."""
        linear, hessians = getattr(experts, name), self.hidden if name == "w2" else self.inputs
        parts = []
        for weight, accumulator in zip(linear.weight.unflatten(0, (experts.n_experts, -1)), hessians):
            if accumulator.rows:
                parts.append(gptq_layer(weight, accumulator.hessian, groupsize, blocksize, percdamp))
            else:
                parts.append(Int4Linear(weight.shape[1], weight.shape[0], groupsize))
                set_rtn(parts[-1], weight)
        layer = Int4Linear(linear.in_features, linear.out_features, groupsize)
        for tensor in ("weight", "scales", "zeros"):  # rows are packed, scaled and zeroed each on its own
            setattr(layer, tensor, torch.cat([getattr(part, tensor) for part in parts]))
        return layer


def block_linears(block: nn.Module) -> list:
    """(parent module, attribute name) of each linear layer of a transformer block: in a mixture of experts,
    the experts' but not the router's (rounding it would change which experts run; llama.cpp keeps it too)."""
    linears = [(parent, name) for parent, name in block_layers(block) if isinstance(getattr(parent, name), nn.Linear)]
    if isinstance(block.feed_forward, MoEFeedForward):
        experts = block.feed_forward.experts
        linears = [(parent, name) for parent, name in linears if parent is not block.feed_forward]
        linears += [(experts, name) for name in ("w1", "w3", "w2")]
    return linears


def quantized_linears(model: nn.Module, quantize_embedding: bool):
    """(parent module, attribute name) of every linear layer to quantize, in forward order."""
    for block in model.layers:
        yield from block_linears(block)
    if quantize_embedding:
        yield model, "output"


@torch.no_grad()
def quantize_rtn(model: nn.Module, mode: str, groupsize: int, quantize_embedding: bool, double_quant: bool = True):
    """Round every weight to the nearest grid point: fast, no data needed. double_quant: nf4's absmaxes in 8
    bits."""
    embedding = model.tok_embeddings.weight
    for parent, name in list(quantized_linears(model, quantize_embedding)):
        linear = getattr(parent, name)
        layer = quantized_layer(linear, mode, groupsize, double_quant)
        set_rtn(layer, linear.weight)
        setattr(parent, name, with_bias(layer, linear))
    if quantize_embedding:
        quantize_embedding_table(model, embedding, mode, groupsize, double_quant)
    return model


def quantize_embedding_table(model, embedding: Tensor, mode: str, groupsize: int, double_quant: bool = True):
    """The input embedding: the output head's table when tied, else a table of its own."""
    if model.args.tie_embeddings:
        model.tok_embeddings = QuantizedEmbedding(model.output)
        return
    table = quantized_layer(nn.Linear(embedding.shape[1], embedding.shape[0], device="meta"), mode, groupsize,
                            double_quant)
    set_rtn(table, embedding)
    model.tok_embeddings = QuantizedEmbedding(table)


@torch.no_grad()
def quantize_gptq(model: nn.Module, calibration: Tensor, groupsize: int, quantize_embedding: bool,
                  blocksize: int = 128, percdamp: float = 0.01, batch_size: int = 8):
    """GPTQ block by block, as in the paper: each block's Hessians come from the outputs of the blocks
    before it, already quantized, so later layers correct for earlier layers' error. The output head
    (with --quantize_embedding) is rounded to nearest: GPTQ's gain there is small and its Hessian large."""
    samples, length = calibration.shape
    model.setup_caches(batch_size, length)
    input_pos = torch.arange(length)
    rope, mask = model.rope_and_mask(input_pos)
    hidden = [model.tok_embeddings(batch) for batch in calibration.split(batch_size)]
    for block in tqdm(model.layers, desc="GPTQ", unit="layer"):
        experts = block.feed_forward.experts if isinstance(block.feed_forward, MoEFeedForward) else None
        targets = [(parent, name) for parent, name in block_linears(block) if parent is not experts]
        accumulators = [HessianAccumulator(getattr(parent, name).in_features) for parent, name in targets]
        hooks = [getattr(parent, name).register_forward_hook(accumulator.add)
                 for (parent, name), accumulator in zip(targets, accumulators)]
        if experts is not None:
            expert_hessians = ExpertHessians(experts)
            hooks.append(experts.register_forward_hook(expert_hessians.add))
        for x in hidden:
            block(x, rope, mask, input_pos)
        for hook in hooks:
            hook.remove()
        for (parent, name), accumulator in zip(targets, accumulators):
            linear = getattr(parent, name)
            layer = gptq_layer(linear.weight, accumulator.hessian, groupsize, blocksize, percdamp)
            setattr(parent, name, with_bias(layer, linear))
        for name in ("w1", "w3", "w2") if experts is not None else ():
            setattr(experts, name, expert_hessians.quantized(experts, name, groupsize, blocksize, percdamp))
        hidden = [block(x, rope, mask, input_pos) for x in hidden]
    if quantize_embedding:
        embedding = model.tok_embeddings.weight
        layer = Int4Linear(model.output.in_features, model.output.out_features, groupsize)
        set_rtn(layer, model.output.weight)
        model.output = layer
        quantize_embedding_table(model, embedding, "int4", groupsize)
    return model


NEUTRAL_PROMPTS = ["The", "In the beginning", "Once upon a time", "It is widely known that", "Chapter 1",
                   "The history of", "Today we will", "A recent study", "def main():", "Dear friend,"]


def calibration_tokens(model, tokenizer, text, samples: int, length: int, seed: int = 0) -> Tensor:
    """(samples, length) token ids: random windows of a text, or, with none, text the model itself writes
    from a few neutral prompts (so calibration needs no data set at all)."""
    generator = torch.Generator().manual_seed(seed)
    if text is not None:
        tokens = torch.tensor(tokenizer.encode(text))
        if len(tokens) < length:
            raise ValueError(f"the calibration text has {len(tokens)} tokens, fewer than --calibration_seq_length "
                             f"{length}: give a longer text or a shorter length")
        starts = torch.randint(0, len(tokens) - length + 1, (samples,), generator=generator)
        return torch.stack([tokens[start:start + length] for start in starts.tolist()])
    torch.manual_seed(seed)
    prompts = [tokenizer.encode(NEUTRAL_PROMPTS[i % len(NEUTRAL_PROMPTS)]) for i in range(samples)]
    model.setup_caches(samples, max(map(len, prompts)) + length)
    with tqdm(total=length, desc="writing calibration text", unit="token", leave=False) as progress:
        outputs, _ = generate(model, prompts, length, Sampling(temperature=1.0, top_k=None),
                              on_token=lambda row, token_id: progress.update(row == 0))
    return torch.tensor([(prompt + output)[:length] for prompt, output in zip(prompts, outputs)])


def output_path(checkpoint_dir: Path, mode: str, groupsize: int, double_quant: bool = True) -> Path:
    if mode == "int8":
        return checkpoint_dir / "model_int8.safetensors"
    name = mode.replace("-", "_") + ("" if double_quant or mode != "nf4" else "_float_absmax")
    return checkpoint_dir / f"model_{name}.g{groupsize}.safetensors"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct"),
                        help="a converted checkpoint directory (or its model.safetensors)")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--groupsize", type=int, default=64, choices=GROUPSIZES, help="int4 and nf4: columns per group")
    parser.add_argument("--quantize_embedding", action="store_true",
                        help="also quantize the embedding / output head (a large share of a small model's bytes)")
    parser.add_argument("--no_double_quant", dest="double_quant", action="store_false",
                        help="nf4: keep each group's absmax as a float instead of in 8 bits (0.37 bits more a weight)")
    parser.add_argument("--calibration_file", type=Path, help="int4-gptq: plain text to calibrate on "
                        "(default: text the model generates itself)")
    parser.add_argument("--calibration_samples", type=int, default=32)
    parser.add_argument("--calibration_seq_length", type=int, default=512)
    parser.add_argument("--blocksize", type=int, default=128, help="int4-gptq: columns updated together")
    parser.add_argument("--percdamp", type=float, default=0.01, help="int4-gptq: damping, a share of mean(diag(H))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="default: model_int8.safetensors, model_int4.g64.safetensors, "
                        "... beside the checkpoint")
    args = parser.parse_args(argv)

    try:
        return run(args)
    except UsageError as error:
        return fail(str(error))


def check_args(args):
    if args.calibration_samples < 1 or args.calibration_seq_length < 2:
        raise UsageError(f"--calibration_samples must be >= 1 and --calibration_seq_length >= 2, got "
                         f"{args.calibration_samples} and {args.calibration_seq_length}")
    if args.blocksize < 1:
        raise UsageError(f"--blocksize must be >= 1, got {args.blocksize}")
    if not 0 < args.percdamp < 1:
        raise UsageError(f"--percdamp must be in (0, 1), got {args.percdamp}")


def run(args) -> int:
    check_args(args)
    checkpoint_dir = args.checkpoint_path if args.checkpoint_path.is_dir() else args.checkpoint_path.parent
    text = read_text(args.calibration_file, "--calibration_file") if args.calibration_file else None
    output = args.output or output_path(checkpoint_dir, args.mode, args.groupsize, args.double_quant)
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: there is no directory {output.parent}")
    started = time.perf_counter()
    try:
        model = load_model(checkpoint_dir / "model.safetensors", "cpu", torch.float32)
        tokenizer = load_tokenizer(checkpoint_dir) if args.mode == "int4-gptq" else None
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    if args.mode == "int4-gptq":
        try:
            calibration = calibration_tokens(model, tokenizer, text, args.calibration_samples,
                                             args.calibration_seq_length, args.seed)
        except ValueError as error:
            raise UsageError(str(error)) from None
        source = f"from {args.calibration_file}" if args.calibration_file else "generated by the model"
        print(f"calibrating on {calibration.numel()} tokens ({source})", file=sys.stderr)
        quantize_gptq(model, calibration, args.groupsize, args.quantize_embedding, args.blocksize, args.percdamp)
    else:
        quantize_rtn(model, args.mode, args.groupsize, args.quantize_embedding, args.double_quant)

    metadata = {"quantization": args.mode, "groupsize": args.groupsize if args.mode != "int8" else 0,
                "quantize_embedding": args.quantize_embedding, "source": "model.safetensors"}
    if args.mode == "nf4":
        metadata.update(double_quant=args.double_quant)
    if args.mode == "int4-gptq":
        metadata.update(calibration=str(args.calibration_file or "self-generated"), percdamp=args.percdamp,
                        calibration_tokens=calibration.numel())
    save_model(model, output, metadata)
    print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s; "
          f"peak memory {peak_memory_gb():.2f} GB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
