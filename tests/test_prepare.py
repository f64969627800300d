"""prepare.py: the activations' dtype for a device, weights and step, and the forms a loaded model's layers take
for them."""
import pytest
import torch

from checkpoint import load_model
from cli import UsageError
from cpu_kernels import CPUExperts, QuantizedCPULinear, native_kernels
from conftest import quantized_copy
from model import Experts
from offload import load_offloaded
from prepare import CompiledExperts, activation_dtype, prepare
from quantized_layers import Int4Linear


def test_auto_dtype_on_cpu_is_fp32_except_float_weights_in_a_compiled_step():
    assert activation_dtype("auto", "cpu") == torch.float32
    assert activation_dtype("auto", "cpu", "compiled") == torch.bfloat16
    assert activation_dtype("auto", "cpu", "aot") == torch.float32
    assert activation_dtype("fp32", "cpu", "compiled") == torch.float32


def test_auto_dtype_on_cpu_for_quantized_weights_is_fp32_which_the_kernels_round_themselves():
    for weights in ("int4", "int8"):
        for step in ("eager", "compiled", "aot"):
            assert activation_dtype("auto", "cpu", step, weights) == torch.float32
    assert activation_dtype("bf16", "cpu", weights="int4") == torch.bfloat16


def test_auto_dtype_on_cuda_is_bf16_and_on_mps_fp16():
    assert activation_dtype("auto", "cuda", "compiled", "int4") == torch.bfloat16
    assert activation_dtype("auto", "mps") == torch.float16


def test_a_dtype_the_device_cannot_run_is_one_line(monkeypatch):
    monkeypatch.setattr(torch, "ones", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("no fp16")))
    with pytest.raises(UsageError, match="--dtype fp16 is not supported on cpu: try --dtype fp32"):
        activation_dtype("fp16", "cpu")


@pytest.mark.skipif(not native_kernels(), reason="brisk's CPU kernels are unavailable here")
def test_loading_gives_the_plain_layers_and_prepare_the_cpus_forms(tiny_dir, tmp_path):
    path = quantized_copy(tiny_dir, tmp_path / "q", "--mode", "int4", "--groupsize", "32")
    model = load_model(path)
    assert type(model.layers[0].attention.wq) is Int4Linear
    assert type(prepare(model, "cpu").layers[0].attention.wq) is QuantizedCPULinear


def test_a_compiled_step_runs_a_mixtures_experts_in_their_compiled_form(tiny_mixtral_dir):
    eager = prepare(load_model(tiny_mixtral_dir), "cpu").layers[0].feed_forward.experts
    compiled = prepare(load_model(tiny_mixtral_dir), "cpu", "compiled").layers[0].feed_forward.experts
    aot = prepare(load_model(tiny_mixtral_dir), "cpu", "aot").layers[0].feed_forward.experts
    assert type(eager) is Experts  # float experts eagerly: the plain ones
    assert type(compiled) is type(aot) is CompiledExperts and type(compiled.experts) is CPUExperts


def test_an_offloaded_model_keeps_its_plain_layers(tiny_dir):
    """Its blocks' tensors are streamed into the plain layers as it runs: no form may replace them."""
    model = load_offloaded(tiny_dir, "cpu", torch.float32, "disk")
    layers = [type(module) for module in model.modules()]
    assert [type(module) for module in prepare(model, "cpu", "compiled").modules()] == layers


def test_an_unknown_step_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="step 'fast' is not one of"):
        prepare(load_model(tiny_dir), "cpu", "fast")
