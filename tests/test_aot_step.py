"""The decode step compiled ahead of time (aot_step.py): the same tokens as eager decoding, a package built
once per shape and loaded from the cache directory afterwards, reading the model's own tensors in place."""
import pytest
import torch

import aot_step
import generate as generate_command
from aot_step import AheadOfTimeDecode, DecodePass, package_name
from checkpoint import load_model
from generation import Steps, generate
from prepare import prepare
from sampling import Sampling

GREEDY = Sampling(temperature=0)
PROMPT = [5, 17, 29, 41]


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("brisk-cache")


def aot_steps(cache_dir) -> Steps:
    return Steps(decode=AheadOfTimeDecode(cache_dir))


def refuse_builds(monkeypatch):
    def no_build(*args):
        raise AssertionError("a package was built where one was expected in the cache")
    monkeypatch.setattr(aot_step, "build_package", no_build)


@pytest.mark.slow
def test_an_ahead_of_time_step_decodes_the_tokens_eager_decoding_does(tiny_dir, package_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    model.setup_caches(1, 64)
    eager, _ = generate(model, [PROMPT], 16, GREEDY)
    ahead_of_time, _ = generate(model, [PROMPT], 16, GREEDY, steps=aot_steps(package_dir))
    assert ahead_of_time == eager
    assert len(list(package_dir.glob("decode_b1_s64_*.pt2"))) == 1


@pytest.mark.slow
def test_a_later_run_loads_the_package_from_the_cache_without_building(tiny_dir, package_dir, monkeypatch):
    model = prepare(load_model(tiny_dir), "cpu")
    model.setup_caches(1, 64)
    generate(model, [PROMPT], 2, GREEDY, steps=aot_steps(package_dir))  # built here, or by the test above
    eager, _ = generate(model, [PROMPT], 16, GREEDY)
    reloaded_model = prepare(load_model(tiny_dir), "cpu")
    reloaded_model.setup_caches(1, 64)
    refuse_builds(monkeypatch)
    ahead_of_time, _ = generate(reloaded_model, [PROMPT], 16, GREEDY, steps=aot_steps(package_dir))
    assert ahead_of_time == eager


@pytest.mark.slow
def test_the_package_reads_the_models_weights_and_kv_cache_in_place(tiny_dir, package_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    model.setup_caches(1, 64)
    steps = aot_steps(package_dir)
    generate(model, [PROMPT], 3, GREEDY, steps=steps)
    written = model.layers[0].attention.kv_cache.k_cache[0, :, len(PROMPT)]  # the first decode step's key
    assert written.abs().sum() > 0
    with torch.no_grad():
        model.norm.weight.zero_()  # all logits 0: greedy picks token 0
    tokens, _ = generate(model, [PROMPT], 3, GREEDY, steps=steps)
    assert tokens == [[0, 0, 0]]


@pytest.mark.slow
def test_a_padded_batch_decodes_as_eager_decoding_does(tiny_dir, package_dir):
    prompts = [[5], [6, 17], [7, 17, 29]]
    model = prepare(load_model(tiny_dir), "cpu")
    model.setup_caches(len(prompts), 64)
    eager, _ = generate(model, prompts, 8, GREEDY)
    ahead_of_time, _ = generate(model, prompts, 8, GREEDY, steps=aot_steps(package_dir))
    assert ahead_of_time == eager
    assert len(list(package_dir.glob("decode_b3_s64_padded_*.pt2"))) == 1


@pytest.mark.slow
def test_a_cache_allocated_again_is_the_one_the_package_reads(tiny_dir, package_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    steps = aot_steps(package_dir)
    for cache_length in (64, 128, 64):  # the second 64-slot cache is new tensors of the first one's shape
        model.setup_caches(1, cache_length)
        eager, _ = generate(model, [PROMPT], 8, GREEDY)
        ahead_of_time, _ = generate(model, [PROMPT], 8, GREEDY, steps=steps)
        assert ahead_of_time == eager


def test_the_package_name_follows_the_shapes_and_dtypes_not_the_weights(tiny_dir):
    model, same_shapes = prepare(load_model(tiny_dir), "cpu"), prepare(load_model(tiny_dir), "cpu")
    for each in (model, same_shapes):
        each.setup_caches(2, 64)
    with torch.no_grad():
        same_shapes.norm.weight.mul_(2)
    name = package_name(DecodePass(model, 64), 1, False)
    assert package_name(DecodePass(same_shapes, 64), 1, False) == name
    assert package_name(DecodePass(model, 64), 2, False) != name
    assert package_name(DecodePass(model, 64), 1, True) != name
    bf16 = prepare(load_model(tiny_dir, dtype=torch.bfloat16), "cpu")
    bf16.setup_caches(2, 64)
    assert package_name(DecodePass(bf16, 64), 1, False) != name
    model.setup_caches(2, 128)
    assert package_name(DecodePass(model, 64), 1, False) != name


def test_the_cache_directory_is_brisk_cache_dir_else_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("BRISK_CACHE_DIR", str(tmp_path / "packages"))
    assert aot_step.default_cache_dir() == tmp_path / "packages"
    monkeypatch.delenv("BRISK_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert aot_step.default_cache_dir() == tmp_path / "xdg" / "brisk"


@pytest.mark.slow
def test_generate_aot_prints_what_eager_decoding_prints_and_builds_once(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BRISK_CACHE_DIR", str(tmp_path))
    flags = ["--checkpoint_path", str(tiny_dir), "--temperature", "0", "--max_new_tokens", "12"]
    assert generate_command.main(flags + ["--prompt", "hello"]) == 0
    eager = capsys.readouterr().out
    assert generate_command.main(flags + ["--prompt", "hello", "--aot"]) == 0
    first = capsys.readouterr()
    refuse_builds(monkeypatch)
    # another prompt length: its KV cache is rounded up to the same 256 slots, so the same package serves it
    assert generate_command.main(flags + ["--prompt", "a longer prompt", "--aot"]) == 0
    second = capsys.readouterr()
    assert first.out == eager and "building the decode step ahead of time" in first.err
    assert "building" not in second.err and "decode step ready" in second.err


def test_a_step_without_a_package_decodes_eagerly_where_building_is_off(tiny_dir, tmp_path, monkeypatch):
    model = prepare(load_model(tiny_dir), "cpu")
    model.setup_caches(1, 64)
    eager, _ = generate(model, [PROMPT], 8, GREEDY)
    refuse_builds(monkeypatch)
    cached_only = AheadOfTimeDecode(tmp_path, build=False)
    tokens, _ = generate(model, [PROMPT], 8, GREEDY, steps=Steps(decode=cached_only))
    assert tokens == eager and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_generate_decodes_through_a_package_aot_built_without_being_asked(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BRISK_CACHE_DIR", str(tmp_path))
    flags = ["--checkpoint_path", str(tiny_dir), "--temperature", "0", "--max_new_tokens", "12", "--prompt", "hello"]
    assert generate_command.main(flags) == 0
    before = capsys.readouterr()
    assert generate_command.main(flags + ["--aot"]) == 0
    capsys.readouterr()
    refuse_builds(monkeypatch)
    assert generate_command.main(flags) == 0
    after = capsys.readouterr()
    assert generate_command.main(flags + ["--eager"]) == 0
    eager = capsys.readouterr()
    assert "decode step:" not in before.err and "decode step:" not in eager.err
    assert f"decode step: 1 of the 1 packages this run needs are built ahead of time in {tmp_path}" in after.err
    assert after.out == before.out == eager.out


@pytest.mark.parametrize("flags, message", [
    (["--aot", "--eager"], "--aot decodes through a compiled package, --eager without one: pick one"),
    (["--aot", "--compile"], "--aot compiles the plain decode step of one process: drop --compile"),
    (["--aot", "--speculative", "prompt_lookup"], "--aot compiles the plain decode step of one process"),
    (["--aot", "--offload", "disk"], "--offload streams blocks eagerly in one process: drop --compile / --aot"),
])
def test_aot_refuses_what_it_cannot_compile(capsys, tiny_dir, flags, message):
    assert generate_command.main(["--checkpoint_path", str(tiny_dir), *flags]) == 2
    assert message in capsys.readouterr().err
