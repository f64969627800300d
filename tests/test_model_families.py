"""Every family beyond Llama (Qwen2's biased q/k/v, Mixtral's experts), as a tiny random model saved by
transformers and converted, computes what transformers computes through the paths a Llama takes."""
import json
import subprocess
import sys

import pytest
import torch

from checkpoint import load_model
from conftest import IDS, ROOT, forward_logits
from generation import generate
from prepare import prepare
from sampling import Sampling

# family -> (its converted checkpoint, transformers' model of the same directory): fixture names
FAMILIES = {"qwen2": ("tiny_qwen2_dir", "qwen2_reference"), "mixtral": ("tiny_mixtral_dir", "mixtral_reference")}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    checkpoint, reference = FAMILIES[request.param]
    return request.getfixturevalue(checkpoint), request.getfixturevalue(reference)


def test_logits_equal_transformers(family):
    checkpoint, reference = family
    with torch.no_grad():
        expected = reference(torch.tensor([IDS])).logits[0]
    assert (forward_logits(prepare(load_model(checkpoint), "cpu"), IDS) - expected).abs().max().item() <= 1e-4


def test_greedy_tokens_equal_transformers_generate(family):
    checkpoint, reference = family
    model = prepare(load_model(checkpoint), "cpu")
    model.setup_caches(1, 64)
    [ours], _ = generate(model, [IDS[:10]], 24, Sampling(temperature=0))
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([IDS[:10]]), max_new_tokens=24, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0, 10:].tolist()


def test_cached_decoding_equals_the_full_forward(family):
    model = prepare(load_model(family[0]), "cpu")
    expected = forward_logits(model, IDS)
    with torch.no_grad():
        prefill = model(torch.tensor([IDS[:40]]), torch.arange(40))[0]
        steps = [model(torch.tensor([[IDS[i]]]), torch.tensor([i]))[0, 0] for i in range(40, len(IDS))]
    assert torch.allclose(torch.cat([prefill, torch.stack(steps)]), expected, atol=1e-4)  # fp32 sums differ in order


def test_a_batch_of_different_lengths_equals_each_alone(family):
    model = prepare(load_model(family[0]), "cpu")
    prompts = [IDS[:7], IDS[:19], IDS[:3]]
    alone = []
    for prompt in prompts:
        model.setup_caches(1, 64)
        alone += generate(model, [prompt], 12, Sampling(temperature=0))[0]
    model.setup_caches(3, 64)
    batched, _ = generate(model, prompts, 12, Sampling(temperature=0))
    assert batched == alone


@pytest.mark.slow
def test_two_ranks_equal_one_process(family):
    """Qwen2's biases split with their heads, Mixtral's experts each split as the dense feed-forward is."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "scripts/check_tp.py", "--checkpoint_path", str(family[0]), "--json"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["max_abs_logit_diff"] <= 1e-4 and result["tokens"] == result["expected_tokens"]
