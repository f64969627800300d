"""brisk's small ops around the products (cpu_kernels.cpp): RMSNorm, the rotary embedding and attention over
the KV cache, each one op where PyTorch runs several. They compute what model.py's plain forms compute, and
an eager decode step runs them; a compiled step keeps the plain forms, which Inductor fuses."""
import pytest
import torch
import torch.nn.functional as F

import cpu_kernels
from checkpoint import load_model
from conftest import AtenCalls
from cpu_kernels import FusedRMSNorm, FusedRotaryEmbedding, native_kernels
from generation import decode_one_token
from model import RMSNorm, RotaryEmbedding, apply_rope, rms_norm
from prepare import prepare
from sampling import Sampling
from test_cpu_kernels import traced_functions

pytestmark = pytest.mark.skipif(not native_kernels(), reason="brisk's CPU kernels are unavailable here")


@pytest.mark.parametrize("rows", [1, 7])
def test_the_norm_op_equals_the_plain_norm(rows):
    x, weight = torch.randn(rows, 581), torch.randn(581)  # 72 steps of 8 columns and 5 left
    out = torch.ops.brisk.rms_norm(x, weight, 1e-5)
    assert torch.allclose(out, rms_norm(x, weight, 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("table_rows", [1, 2])  # one table for the batch, or one a row (padded prompts)
def test_the_rope_op_equals_apply_rope(table_rows):
    x, table = torch.randn(2, 5, 9, 64), torch.randn(table_rows, 5, 1, 32, 2)
    assert torch.allclose(torch.ops.brisk.rope(x, table), apply_rope(x, table), rtol=1e-6, atol=1e-6)


def cache_and_mask(batch: int, seq: int, head_dim: int, slots: int):
    """k, v: the first `slots` slots of a cache of 50 (strided, as KVCache.update returns them), 3 K/V heads;
    mask: causal from slot 20 on, row 1 blind to its 4 padding slots."""
    k_cache, v_cache = torch.randn(batch, 3, 50, head_dim), torch.randn(batch, 3, 50, head_dim)
    position = 20 + torch.arange(seq)[:, None]  # (seq, 1)
    every = torch.arange(50)
    mask = (every <= position) & (every >= torch.tensor([0, 4])[:batch, None, None])  # (batch, seq, 50)
    return k_cache[:, :, :slots], v_cache[:, :, :slots], mask[:, None, :, :slots]


@pytest.mark.parametrize("head_dim", [64, 36])  # 8 slots a step; and head_dim not a multiple of 8
@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 3)])
def test_the_attention_op_equals_sdpa_over_the_caches_first_slots(head_dim, batch, seq):
    k, v, mask = cache_and_mask(batch, seq, head_dim, slots=27)  # 3 steps of 8 slots and 3 left
    q = torch.randn(batch, seq, 9, head_dim).transpose(1, 2)  # 9 query heads over 3 K/V heads
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(torch.ops.brisk.attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)


def test_the_attention_ops_output_is_laid_out_as_the_output_projection_reads_it():
    k, v, mask = cache_and_mask(1, 1, 64, slots=27)
    out = torch.ops.brisk.attention(torch.randn(1, 9, 1, 64), k, v, mask)  # (batch, heads, seq, head_dim)
    assert out.shape == (1, 9, 1, 64) and out.transpose(1, 2).is_contiguous()


def test_a_query_that_may_look_nowhere_gets_zeros():
    k, v, _ = cache_and_mask(1, 1, 64, slots=27)
    nowhere = torch.zeros(1, 1, 1, 27, dtype=torch.bool)
    assert torch.equal(torch.ops.brisk.attention(torch.randn(1, 9, 1, 64), k, v, nowhere), torch.zeros(1, 9, 1, 64))


def test_the_attention_op_refuses_a_float_mask_in_one_line():
    k, v, mask = cache_and_mask(1, 1, 64, slots=27)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.brisk.attention(torch.randn(1, 9, 1, 64), k, v, mask.float())


def test_an_eager_decode_step_runs_the_norm_rope_and_attention_ops(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    model.setup_caches(1, 32)
    with AtenCalls() as calls, torch.no_grad():
        decode_one_token(model, torch.tensor([[5]]), torch.tensor([3]), None, Sampling(0))
    assert {"brisk::rms_norm", "brisk::rope", "brisk::attention"} <= calls.qualified
    assert not calls.qualified & {"aten::mean", "aten::cat", "aten::_scaled_dot_product_flash_attention_for_cpu"}


def test_a_compiled_decode_step_keeps_the_plain_norm_rope_and_attention(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu", "compiled")
    model.setup_caches(1, 32)
    calls = traced_functions(decode_one_token, model, torch.tensor([[5]]), torch.tensor([3]), None, Sampling(0))
    assert {"cat", "softmax"} <= calls and not calls & {"rope", "attention"}


def test_norms_and_rotations_take_their_forms_and_stay_plain_without_the_kernels(tiny_dir, monkeypatch):
    block = prepare(load_model(tiny_dir), "cpu").layers[0]
    assert isinstance(block.attention_norm, FusedRMSNorm) and isinstance(block.attention.rotary, FusedRotaryEmbedding)
    monkeypatch.setattr(cpu_kernels, "native_kernels", lambda: False)
    block = prepare(load_model(tiny_dir), "cpu").layers[0]
    assert type(block.attention_norm) is RMSNorm and type(block.attention.rotary) is RotaryEmbedding


def test_a_bf16_models_norms_stay_plain(tiny_dir):
    model = prepare(load_model(tiny_dir, "cpu", torch.bfloat16), "cpu")
    assert type(model.norm) is RMSNorm and type(model.layers[0].ffn_norm) is RMSNorm
