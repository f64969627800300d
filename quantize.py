"""Weight-only quantization: int8, int4 (group-wise) and GPTQ int4.

    python quantize.py --mode int8
    python quantize.py --mode int4 --groupsize 64
    python quantize.py --mode int4-gptq --groupsize 128 --calibration_file notes.txt

Decoding reads every weight once per token, so fewer bytes per weight is more tokens per second.
Activations stay in floating point; only the weights of the linear layers (and, with
--quantize_embedding, the embedding / output head) are stored as integers:
- int8: symmetric, one scale per output channel: w = q * scale, q in [-128, 127].
- int4: asymmetric, one scale and zero per group of `groupsize` input columns:
  w = (q - 8) * scale + zero, q in [0, 15] (the convention of PyTorch's int4 kernels).
- int4-gptq: the same format, with the rounding chosen by GPTQ (Frantar et al. 2022) to minimise each
  layer's output error on calibration text.

The file (checkpoints/NAME/model_int8.safetensors, model_int4.g64.safetensors, ...) is portable:
int4 values are packed two per byte, each group of columns holding its first half in the low nibbles and
its second half in the high nibbles (GGUF's Q4 layout); the device kernel's own layout is built when the
file is loaded, on whatever device that is.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import Linear, fused_cpu_decode, matvec

MODES = ("int8", "int4", "int4-gptq")
GROUPSIZES = (32, 64, 128, 256)


def quantize_int8(weight: Tensor, groupsize: int = 0):
    """(out, in) float -> int8 values and float32 scales: one per output channel (groupsize 0), or
    one per group of `groupsize` columns (the layout of GGUF's Q8_0 blocks, with groupsize 32)."""
    groups = weight.float().reshape(weight.shape[0], -1, groupsize or weight.shape[1])
    scales = groups.abs().amax(dim=-1).clamp(min=1e-10) / 127
    values = torch.round(groups / scales[..., None]).clamp(-128, 127).to(torch.int8).reshape(weight.shape)
    return values, (scales if groupsize else scales[:, 0])


def int4_group_params(weight: Tensor, groupsize: int):
    """Scale and zero of each group of `groupsize` columns, mapping [min, max] onto q in [0, 15]."""
    groups = weight.float().reshape(weight.shape[0], -1, groupsize)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = (high - low).clamp(min=1e-6) / 15
    return scales, low + 8 * scales  # zero: the value that q = 8 stands for


def int4_values(weight: Tensor, scales: Tensor, zeros: Tensor, groupsize: int) -> Tensor:
    """Round weight to the int4 grid of the given group parameters: q in [0, 15], as uint8."""
    groups = weight.float().reshape(weight.shape[0], -1, groupsize)
    q = torch.round((groups - zeros[..., None]) / scales[..., None]) + 8
    return q.clamp(0, 15).to(torch.uint8).reshape(weight.shape)


def dequantize_int4(values: Tensor, scales: Tensor, zeros: Tensor, groupsize: int) -> Tensor:
    groups = values.float().reshape(values.shape[0], -1, groupsize)
    return ((groups - 8) * scales[..., None] + zeros[..., None]).reshape(values.shape)


# Byte j of a group holds its columns j (low nibble) and j + groupsize / 2 (high nibble): each nibble plane
# is a run of columns, unpacked in place by vector shifts and masks (Int4Linear.matvec). Others are refused.
INT4_PACKING = "group-halves"


def pack_int4(values: Tensor, groupsize: int) -> Tensor:
    halves = values.reshape(values.shape[0], -1, 2, groupsize // 2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(values.shape[0], -1)


def unpack_int4(packed: Tensor, groupsize: int) -> Tensor:
    planes = packed.reshape(packed.shape[0], -1, 1, groupsize // 2)
    return torch.cat([planes & 0xF, planes >> 4], dim=2).reshape(packed.shape[0], -1)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights, scaled per output channel (groupsize 0) or per group of
    columns. Its rows can also be looked up, so one table serves as a quantized embedding (and, tied,
    as both embedding and output head)."""

    def __init__(self, in_features: int, out_features: int, groupsize: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, in_features // groupsize) if groupsize
                             else torch.empty(out_features))
        # PyTorch's CPU int8 kernel (_weight_int8pack_mm), torch 2.13, 2 Xeon cores, 1536 x 576 weight: 0.62 ms
        # for one row against 0.20 ms converting the weight for the float matmul, 488 ms against 8 ms for 512
        # rows. So the plain form is the default (compiled, on CUDA, it is the form Inductor fuses).
        self.use_kernel = False

    def forward(self, x: Tensor) -> Tensor:
        if fused_cpu_decode(x):
            out = matvec(x, self.dequantized()) if self.groupsize else matvec(x, self.weight) * self.scales
            return out.to(x.dtype)
        if self.groupsize:
            return F.linear(x, self.dequantized().to(x.dtype))
        if self.use_kernel and x.device.type == "cpu":
            return torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight,
                                                      self.scales).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales

    def dequantized(self, ids=slice(None)) -> Tensor:
        """The weight (or the rows ids of it) as floats."""
        values, scales = self.weight[ids], self.scales[ids]
        if not self.groupsize:
            return values.to(scales.dtype) * scales.unsqueeze(-1)
        groups = values.reshape(*values.shape[:-1], -1, self.groupsize).to(scales.dtype) * scales.unsqueeze(-1)
        return groups.reshape(values.shape)

    def rows(self, ids: Tensor) -> Tensor:
        return self.dequantized(ids)


class Int4Linear(nn.Module):
    """A linear layer with group-wise int4 weights: packed uint8 (out, padded_in / 2) plus scales and
    zeros (out, padded_in / groupsize) in the file; prepare() adds the device kernel's layout after loading.
    When groupsize does not divide in_features (SmolLM2's 576 and groups of 128), the weight gets zero
    columns up to a whole number of groups and the input zero padding to match: the padding multiplies
    zeros, and every group, kernels included, stays full."""

    def __init__(self, in_features: int, out_features: int, groupsize: int):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.padded_in = -(-in_features // groupsize) * groupsize
        self.register_buffer("weight", torch.empty(out_features, self.padded_in // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, self.padded_in // groupsize))
        self.register_buffer("zeros", torch.empty(out_features, self.padded_in // groupsize))
        self.kernel_weight = self.scales_and_zeros = None
        # The int4 kernels beat unpacking the weight for decoding (1.2 ms against 7.0 ms for one row of a
        # 1536 x 576 weight on 2 Xeon cores, torch 2.13), but on CPU are far slower for many rows (614 ms
        # against 10 ms for 512): prefill unpacks and calls the float matmul instead.
        self.kernel_max_rows = 16

    def padded(self, weight: Tensor) -> Tensor:
        return F.pad(weight, (0, self.padded_in - self.in_features))

    def prepare(self):
        """Repack for PyTorch's int4 matmul (tinygemm on CUDA, its CPU twin elsewhere), when there is one."""
        values = unpack_int4(self.weight, self.groupsize).to(torch.int32)
        device = self.weight.device.type
        if device == "cuda" and self.padded_in % 128 == 0:
            # the CUDA kernel takes its weights two values per byte, high nibble first
            packed = (values[:, 0::2] << 4 | values[:, 1::2]).to(torch.uint8)
            self.kernel_weight = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        elif device == "cpu" and self.padded_in % 64 == 0:
            self.kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 2)
        else:
            return
        self.scales_and_zeros = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        flat = self.padded(x.reshape(-1, self.in_features))
        if fused_cpu_decode(x):
            return self.matvec(flat).reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        if self.kernel_weight is None or (x.device.type == "cpu" and flat.shape[0] > self.kernel_max_rows):
            out = F.linear(flat, self.dequantized().to(x.dtype))
        elif x.device.type == "cuda":
            out = torch.ops.aten._weight_int4pack_mm(flat, self.kernel_weight, self.groupsize, self.scales_and_zeros)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.kernel_weight, self.groupsize,
                                                              self.scales_and_zeros)
        return out.reshape(*x.shape[:-1], self.out_features)

    def matvec(self, flat: Tensor) -> Tensor:
        """flat (rows, padded_in) times the weight, transposed, unpacked group by group inside the sum (see
        model.fused_cpu_decode): w = (q - 8) * scale + zero = q * scale + offset, for the low and high nibbles."""
        groups, half = self.padded_in // self.groupsize, self.groupsize // 2
        x = flat.float().reshape(-1, 1, groups, 2, half)
        scales = self.scales.float().unsqueeze(-1)
        offsets = (self.zeros.float() - 8 * self.scales.float()).unsqueeze(-1)
        planes = self.weight.reshape(self.out_features, groups, half)
        low, high = (planes & 0xF) * scales + offsets, (planes >> 4) * scales + offsets
        return (x[:, :, :, 0] * low + x[:, :, :, 1] * high).sum((-1, -2))

    def dequantized(self) -> Tensor:
        """The weight as floats, padding columns included: (out, padded_in)."""
        values = unpack_int4(self.weight, self.groupsize)
        return dequantize_int4(values, self.scales, self.zeros, self.groupsize).to(self.scales.dtype)

    def rows(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        values = unpack_int4(self.weight[flat], self.groupsize)
        rows = dequantize_int4(values, self.scales[flat], self.zeros[flat], self.groupsize).to(self.scales.dtype)
        return rows[:, :self.in_features].reshape(*ids.shape, self.in_features)


class QuantizedEmbedding(nn.Module):
    """Token embedding read from a quantized table (the output head's, when the two are tied)."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table

    def forward(self, ids: Tensor) -> Tensor:
        return self.table.rows(ids)


def quantized_layer(linear: nn.Linear, mode: str, groupsize: int) -> nn.Module:
    """An empty (not yet filled) quantized layer of the same shape as linear."""
    if mode == "int8":
        return Int8Linear(linear.in_features, linear.out_features)
    return Int4Linear(linear.in_features, linear.out_features, groupsize)


def layer_for(tensors: dict, prefix: str, in_features: int, out_features: int) -> nn.Module:
    """The empty layer that holds a file's tensors prefix.weight (and .scales, .zeros): float weights
    make an nn.Linear, int8 an Int8Linear, packed uint8 an Int4Linear; groupsizes follow from the
    scales' shape. A file may mix them (a converted GGUF: int4 blocks, an int8 output head)."""
    weight, scales = tensors[prefix + "weight"], tensors.get(prefix + "scales")
    if weight.dtype == torch.int8:
        return Int8Linear(in_features, out_features, in_features // scales.shape[1] if scales.dim() == 2 else 0)
    if weight.dtype == torch.uint8:
        return Int4Linear(in_features, out_features, 2 * weight.shape[1] // scales.shape[1])
    return Linear(in_features, out_features)


def match_checkpoint(model: nn.Module, tensors: dict, metadata: dict, weights_file):
    """Give the (meta-device) model the layer types of a quantized file, ready to be assigned its tensors."""
    if metadata.get("int4_packing") != INT4_PACKING and any(t.dtype == torch.uint8 for t in tensors.values()):
        raise ValueError(f"{weights_file} packs its int4 weights in an older layout: quantize (or convert) "
                         "the checkpoint again")
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name + ".weight" in tensors:
            parent_name, _, attribute = name.rpartition(".")
            layer = layer_for(tensors, name + ".", module.in_features, module.out_features)
            setattr(model.get_submodule(parent_name), attribute, layer)
    if "tok_embeddings.table.weight" in tensors:
        vocab_size, dim = model.tok_embeddings.weight.shape
        table = layer_for(tensors, "tok_embeddings.table.", dim, vocab_size)
        model.tok_embeddings = QuantizedEmbedding(table)
        if model.args.tie_embeddings:
            model.output = table
    return model


def set_rtn(layer: nn.Module, weight: Tensor):
    """Fill a quantized layer by rounding weight to the nearest grid point (round-to-nearest, RTN)."""
    if isinstance(layer, Int8Linear):
        layer.weight, layer.scales = quantize_int8(weight, layer.groupsize)
    else:
        weight = layer.padded(weight)
        scales, zeros = int4_group_params(weight, layer.groupsize)
        set_int4(layer, int4_values(weight, scales, zeros, layer.groupsize), scales, zeros)


def set_int4(layer: Int4Linear, values: Tensor, scales: Tensor, zeros: Tensor):
    layer.weight, layer.scales, layer.zeros = pack_int4(values, layer.groupsize), scales, zeros


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


def prepare_kernels(model: nn.Module):
    """After loading: build each int4 layer's device kernel layout."""
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.prepare()


def block_linears(block: nn.Module) -> list:
    """(parent module, attribute name) of each linear layer of a transformer block."""
    return [(parent, name) for parent in (block.attention, block.feed_forward)
            for name, child in parent.named_children() if isinstance(child, nn.Linear)]


def quantized_linears(model: nn.Module, quantize_embedding: bool):
    """(parent module, attribute name) of every linear layer to quantize, in forward order."""
    for block in model.layers:
        yield from block_linears(block)
    if quantize_embedding:
        yield model, "output"


@torch.no_grad()
def quantize_rtn(model: nn.Module, mode: str, groupsize: int, quantize_embedding: bool):
    """Round every weight to the nearest grid point: fast, no data needed."""
    embedding = model.tok_embeddings.weight
    for parent, name in list(quantized_linears(model, quantize_embedding)):
        linear = getattr(parent, name)
        layer = quantized_layer(linear, mode, groupsize)
        set_rtn(layer, linear.weight)
        setattr(parent, name, layer)
    if quantize_embedding:
        quantize_embedding_table(model, embedding, mode, groupsize)
    return model


def quantize_embedding_table(model, embedding: Tensor, mode: str, groupsize: int):
    """The input embedding: the output head's table when tied, else a table of its own."""
    if model.args.tie_embeddings:
        model.tok_embeddings = QuantizedEmbedding(model.output)
        return
    table = quantized_layer(nn.Linear(embedding.shape[1], embedding.shape[0], device="meta"), mode, groupsize)
    set_rtn(table, embedding)
    model.tok_embeddings = QuantizedEmbedding(table)


@torch.no_grad()
def quantize_gptq(model: nn.Module, calibration: Tensor, groupsize: int, quantize_embedding: bool,
                  blocksize: int = 128, percdamp: float = 0.01, batch_size: int = 8):
    """GPTQ block by block, as in the paper: each block's Hessians come from the outputs of the blocks
    before it, already quantized, so later layers correct for earlier layers' error. The output head
    (with --quantize_embedding) is rounded to nearest: GPTQ's gain there is small and its Hessian large."""
    from tqdm import tqdm

    samples, length = calibration.shape
    model.setup_caches(batch_size, length)
    input_pos = torch.arange(length)
    rope, mask = model.rope_and_mask(input_pos)
    hidden = [model.tok_embeddings(batch) for batch in calibration.split(batch_size)]
    for block in tqdm(model.layers, desc="GPTQ", unit="layer"):
        targets = block_linears(block)
        accumulators = [HessianAccumulator(getattr(parent, name).in_features) for parent, name in targets]
        hooks = [getattr(parent, name).register_forward_hook(accumulator.add)
                 for (parent, name), accumulator in zip(targets, accumulators)]
        for x in hidden:
            block(x, rope, mask, input_pos)
        for hook in hooks:
            hook.remove()
        for (parent, name), accumulator in zip(targets, accumulators):
            setattr(parent, name, gptq_layer(getattr(parent, name).weight, accumulator.hessian, groupsize,
                                             blocksize, percdamp))
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


def calibration_tokens(model, tokenizer, text_file, samples: int, length: int, seed: int = 0) -> Tensor:
    """(samples, length) token ids: random windows of a text file, or, with no file, text the model
    itself writes from a few neutral prompts (so calibration needs no data set at all)."""
    generator = torch.Generator().manual_seed(seed)
    if text_file is not None:
        tokens = torch.tensor(tokenizer.encode(Path(text_file).read_text(encoding="utf-8")))
        if len(tokens) < length:
            raise ValueError(f"{text_file} has {len(tokens)} tokens, fewer than --calibration_seq_length {length}")
        starts = torch.randint(0, len(tokens) - length + 1, (samples,), generator=generator)
        return torch.stack([tokens[start:start + length] for start in starts.tolist()])
    from generate import Sampling, generate

    torch.manual_seed(seed)
    prompts = [tokenizer.encode(NEUTRAL_PROMPTS[i % len(NEUTRAL_PROMPTS)]) for i in range(samples)]
    model.setup_caches(samples, max(map(len, prompts)) + length)
    outputs, _ = generate(model, prompts, length, Sampling(temperature=1.0, top_k=None))
    return torch.tensor([(prompt + output)[:length] for prompt, output in zip(prompts, outputs)])


def output_path(checkpoint_dir: Path, mode: str, groupsize: int) -> Path:
    return checkpoint_dir / ("model_int8.safetensors" if mode == "int8" else
                             f"model_{mode.replace('-', '_')}.g{groupsize}.safetensors")


def save_quantized(model: nn.Module, path: Path, metadata: dict):
    from model import save_safetensors, unique_state_dict

    tensors = {name: tensor.detach().cpu() for name, tensor in unique_state_dict(model).items()}
    shapes = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}
    save_safetensors(path, shapes, tensors.items(), {"format": "pt", "int4_packing": INT4_PACKING, **metadata})


def main(argv=None):
    from generate import peak_memory_gb
    from model import load_model
    from tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct"),
                        help="a converted checkpoint directory (or its model.safetensors)")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--groupsize", type=int, default=64, choices=GROUPSIZES, help="int4 modes: columns per group")
    parser.add_argument("--quantize_embedding", action="store_true",
                        help="also quantize the embedding / output head (a large share of a small model's bytes)")
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

    checkpoint_dir = args.checkpoint_path if args.checkpoint_path.is_dir() else args.checkpoint_path.parent
    if args.calibration_file is not None and not args.calibration_file.is_file():
        return fail(f"--calibration_file {args.calibration_file}: no such file")
    if not 0 < args.percdamp < 1:
        return fail(f"--percdamp must be in (0, 1), got {args.percdamp}")
    started = time.perf_counter()
    try:
        model = load_model(checkpoint_dir / "model.safetensors", "cpu", torch.float32)
    except (FileNotFoundError, ValueError) as error:
        return fail(str(error))
    if args.mode == "int4-gptq":
        try:
            calibration = calibration_tokens(model, load_tokenizer(checkpoint_dir), args.calibration_file,
                                             args.calibration_samples, args.calibration_seq_length, args.seed)
        except ValueError as error:
            return fail(str(error))
        source = f"from {args.calibration_file}" if args.calibration_file else "generated by the model"
        print(f"calibrating on {calibration.numel()} tokens ({source})", file=sys.stderr)
        quantize_gptq(model, calibration, args.groupsize, args.quantize_embedding, args.blocksize, args.percdamp)
    else:
        quantize_rtn(model, args.mode, args.groupsize, args.quantize_embedding)

    output = args.output or output_path(checkpoint_dir, args.mode, args.groupsize)
    metadata = {"quantization": args.mode, "groupsize": args.groupsize if args.mode != "int8" else 0,
                "quantize_embedding": args.quantize_embedding, "source": "model.safetensors"}
    if args.mode == "int4-gptq":
        metadata.update(calibration=str(args.calibration_file or "self-generated"), percdamp=args.percdamp,
                        calibration_tokens=calibration.numel())
    save_quantized(model, output, metadata)
    print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s; "
          f"peak memory {peak_memory_gb():.2f} GB", file=sys.stderr)
    return 0


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
