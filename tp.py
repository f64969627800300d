"""Tensor parallelism: every transformer block split across processes (Megatron-LM, Shoeybi et al. 2019).

    torchrun --nproc_per_node=3 generate.py --prompt "Once upon a time"     # 3 processes, one machine
    torchrun --nproc_per_node=3 scripts/check_tp.py                         # check: sharded == whole model

Each of the N ranks holds 1/N of every block's weights and computes 1/N of its heads and of its
feed-forward width:

    attention     wq, wk, wv split by output features (column-wise): rank r owns query heads
                  r*H/N ... (r+1)*H/N - 1 and the matching share of KV heads, and caches only those;
                  wo split by input features (row-wise): each rank's partial output sums to the whole.
    feed-forward  w1 (gate) and w3 (up) column-wise, w2 (down) row-wise; in a mixture of experts,
                  every expert so, and the router whole on every rank (each routes alike).

A column-wise layer needs no communication (heads, and feed-forward units, are independent); a
row-wise layer leaves a partial sum on each rank, so each block does two all-reduces, after attention
and after the feed-forward, and every rank then holds the same residual stream. The embedding, the
norms and the output head are replicated, so every rank computes the same logits and, from the same
seed, samples the same tokens: generation runs unchanged on every rank, and rank 0 prints.

The transport is torch.distributed as set up by torchrun: gloo on CPU, NCCL on CUDA. The all-reduces
are functional collectives, which torch.compile traces into the compiled decode step.
"""
import ctypes
import functools
import mmap
import os
import sys
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch import Tensor

from model import MoEFeedForward
from model_args import ModelArgs
from quantized_layers import NF4Linear

COLUMN_WISE = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW_WISE = ("attention.wo", "feed_forward.w2", "experts.w2")
# a mixture's experts.w1 / w3 hold n experts' rows one after another: each expert's rows are split
EXPERTS_COLUMN_WISE = ("experts.w1", "experts.w3")


def world_size() -> int:
    """Processes launched together by torchrun (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def init(device: str, timeout: Optional[timedelta] = None):
    """Join the process group torchrun describes in the environment; a no-op for a single process. timeout:
    how long a collective may wait for the other ranks (torch's default when None: 30 minutes on gloo)."""
    if world_size() == 1 or dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timeout)


def finish():
    """Leave the process group together: a rank that tore down while another was still sending made gloo
    abort that one (seen under load)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave(status: int):
    """End a command line's process with status. A rank skips the interpreter's teardown (os._exit): the
    functional collectives keep gloo's process group, and its worker thread, alive past
    destroy_process_group, and when that thread frees the last collective's tensors during teardown it
    needs the GIL, which teardown has taken: the rank aborts ("terminate called without an active
    exception"; pytorch/pytorch#179291)."""
    if world_size() == 1:
        sys.exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def check_world_size(args: ModelArgs, ranks: int):
    """Refuse, before any weight is read, a world size that does not split the model into equal shares."""
    for count, what in ((args.n_heads, "attention heads"), (args.n_kv_heads, "KV heads"),
                        (args.intermediate_size, "feed-forward units")):
        if count % ranks:
            divisors = [d for d in range(1, args.n_kv_heads + 1)
                        if args.n_heads % d == 0 == args.n_kv_heads % d == args.intermediate_size % d]
            raise ValueError(f"world size {ranks} does not divide the model's {count} {what} "
                             f"({args.n_heads} heads, {args.n_kv_heads} KV heads, {args.intermediate_size} "
                             f"feed-forward units): use --nproc_per_node in {divisors}")


def resized(layer: nn.Module, in_features: int, out_features: int) -> nn.Module:
    """An empty layer (on the meta device: no memory, no random init) of layer's kind, float, int8, int4 or
    NF4 with the same groupsize, in a new shape. NF4 absmaxes in 8 bits are refused: their blocks of 256 run
    across rows and groups, so no share of rows or columns holds whole blocks in general."""
    bias = layer.bias is not None
    with torch.device("meta"):
        if isinstance(layer, nn.Linear):
            return nn.Linear(in_features, out_features, bias=bias)
        if isinstance(layer, NF4Linear):
            if layer.double_quant:
                raise ValueError("NF4 weights with double-quantized absmaxes cannot be split across ranks: "
                                 "quantize with --mode nf4 --no_double_quant for tensor parallelism")
            return NF4Linear(in_features, out_features, layer.groupsize, double_quant=False, bias=bias)
        return type(layer)(in_features, out_features, layer.groupsize, bias=bias)


def shard(model: nn.Module, tensors: dict, rank: int, ranks: int) -> dict:
    """load_model's hook: shrink the (meta-device) model to this rank's share, and slice each tensor of
    the file to match. One rule covers float, int8 and int4 layers alike: a column-wise layer's tensors
    (weight, scales, zeros, and Qwen2's q/k/v biases) are split along dim 0 (a mixture's experts' layers
    expert by expert); a row-wise layer's 2-D tensors along dim 1 (weight columns, packed int4
    half-groups, per-group scales), and per-channel scales stay whole."""
    check_world_size(model.args, ranks)
    for block in model.layers:
        attention, feed_forward = block.attention, block.feed_forward
        attention.n_heads //= ranks
        attention.n_kv_heads //= ranks
        for name in ("wq", "wk", "wv"):
            layer = getattr(attention, name)
            setattr(attention, name, resized(layer, layer.in_features, layer.out_features // ranks))
        attention.wo = resized(attention.wo, attention.wo.in_features // ranks, attention.wo.out_features)
        # a mixture's experts are split as the dense feed-forward is, each expert's hidden width
        projections = feed_forward.experts if isinstance(feed_forward, MoEFeedForward) else feed_forward
        for name in ("w1", "w3"):
            layer = getattr(projections, name)
            setattr(projections, name, resized(layer, layer.in_features, layer.out_features // ranks))
        projections.w2 = resized(projections.w2, projections.w2.in_features // ranks, projections.w2.out_features)
        attention.register_forward_hook(all_reduce)
        feed_forward.register_forward_hook(all_reduce)

    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    sharded = {}
    for name, tensor in tensors.items():
        layer_name = name.rpartition(".")[0]
        if layer_name.endswith(EXPERTS_COLUMN_WISE):  # each expert's share of rows, expert after expert
            tensor = tensor.unflatten(0, (model.args.n_experts, -1)).chunk(ranks, dim=1)[rank].flatten(0, 1)
        elif layer_name.endswith(COLUMN_WISE):
            tensor = tensor.chunk(ranks, dim=0)[rank]
        elif layer_name.endswith(ROW_WISE) and tensor.dim() == 2:
            tensor = tensor.chunk(ranks, dim=1)[rank]
        if tensor.shape != expected[name]:
            layer = model.get_submodule(layer_name)
            raise ValueError(f"{layer_name} cannot be split into {ranks} shares of whole quantization groups "
                             f"(groupsize {layer.groupsize}, {layer.in_features} input features per rank): "
                             "quantize with a groupsize dividing it, or use another world size")
        # a private copy of the share; the file's pages this read mapped are then let go, so that the
        # rank's resident memory grows by its share only, not by the whole file
        sharded[name] = tensor.clone(memory_format=torch.contiguous_format)
        release_pages(tensors[name])
    return sharded


def release_pages(tensor: Tensor):
    """Drop a memory-mapped tensor's pages from this process (madvise MADV_DONTNEED). They stay in the
    kernel's page cache, shared and reclaimable, and would be mapped again if the tensor were read."""
    if not hasattr(mmap, "MADV_DONTNEED"):  # not a POSIX system: the pages stay until the file is closed
        return
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def all_reduce(module: nn.Module, inputs, output: Tensor) -> Tensor:
    """Forward hook after a row-wise layer: sum the ranks' partial outputs. The sum is taken in fp32, so
    that a bf16 model's partial outputs are not rounded again at every addition."""
    return funcol.all_reduce(output.float(), "sum", dist.group.WORLD).to(output.dtype)


def sharded_loader():
    """load_model's shard argument for this process, or None when it runs alone."""
    return functools.partial(shard, rank=rank(), ranks=world_size()) if world_size() > 1 else None


def common_seed(seed):
    """The seed every rank uses: the given one, or rank 0's random pick, so that all ranks sample alike."""
    if world_size() == 1:
        return seed
    chosen = [seed if seed is not None else int(torch.randint(2**62, ()).item())]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def quiet_other_ranks():
    """Under torchrun every rank runs the same command line; rank 0 speaks for all (an error every rank meets is
    printed once), the others' stdout and stderr go nowhere."""
    if rank() > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")


def on_rank_0(read):
    """read() on rank 0 (a line typed in a chat, say), the same value on every rank."""
    if world_size() == 1:
        return read()
    value = [read() if rank() == 0 else None]
    dist.broadcast_object_list(value, src=0)
    return value[0]


def gathered(value) -> list:
    """value from every rank, in rank order (a one-item list when run alone)."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values
