"""Placement of a model that does not fit one GPU (placement.place_model, plan_device_map).

The split itself runs only with CUDA (the H100 run in README: the 7B shape under --max_memory 0=20GiB gives
the same KLDs as the whole model on the GPU); here the plan, the memory options and the working-memory
estimate are checked, and the CPU path is checked to leave the model whole.
"""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import make_shaped_model  # noqa: E402
import model_blocks  # noqa: E402
import placement  # noqa: E402

GiB = 2**30
BLOCKS = [(f"model.layers.{i}", 1 * GiB) for i in range(10)]
RESIDENT = {"": 2 * GiB}


def blocks_on(mapping, device):
    return [n for n, d in mapping.items() if d == device and n.startswith("model.layers.")]


def test_a_model_that_fits_stays_whole_on_the_device():
    mapping = placement.plan_device_map(RESIDENT, BLOCKS, "cuda:0", {"cuda:0": 20 * GiB}, 8 * GiB)
    assert set(mapping.values()) == {"cuda:0"} and len(mapping) == 11
    assert placement.describe_device_map(mapping) == "cuda:0 (all)"


def test_blocks_fill_the_gpus_in_order_whole_and_the_rest_is_streamed_from_cpu():
    capacity = {"cuda:0": 15 * GiB, "cuda:1": 11 * GiB}
    mapping = placement.plan_device_map(RESIDENT, BLOCKS, "cuda:0", capacity, 8 * GiB, 6 * GiB)
    assert mapping[""] == "cuda:0"                                  # embedding, head: where the compute is
    assert blocks_on(mapping, "cuda:0") == [f"model.layers.{i}" for i in range(5)]      # 15 - 8 - 2
    assert blocks_on(mapping, "cuda:1") == [f"model.layers.{i}" for i in range(5, 10)]  # 11 - 6
    assert placement.describe_device_map(mapping) == "cuda:0: embeddings, head and 5 blocks; cuda:1: 5 blocks"

    mapping = placement.plan_device_map(RESIDENT, BLOCKS, "cuda:0", {"cuda:0": 13.5 * GiB}, 8 * GiB)
    assert len(blocks_on(mapping, "cuda:0")) == 3 and len(blocks_on(mapping, "cpu")) == 7   # no half blocks
    assert blocks_on(mapping, "cpu") == [f"model.layers.{i}" for i in range(3, 10)]
    assert placement.describe_device_map(mapping) == \
        "cuda:0: embeddings, head and 3 blocks; cpu (streamed to the GPU): 7 blocks"


def test_memory_that_cannot_hold_the_model_is_a_clear_error():
    with pytest.raises(ValueError, match="working memory need.*--measure_samples"):
        placement.plan_device_map(RESIDENT, BLOCKS, "cuda:0", {"cuda:0": 9 * GiB}, 8 * GiB)
    with pytest.raises(ValueError, match="no size for cuda:0"):
        placement.plan_device_map(RESIDENT, BLOCKS, "cuda:0", {"cuda:1": 40 * GiB}, 8 * GiB)
    with pytest.raises(ValueError, match="raise --max_memory"):
        placement.plan_device_map(RESIDENT, BLOCKS, "cuda:0", {"cuda:0": 12 * GiB, "cpu": 4 * GiB}, 8 * GiB)


def test_max_memory_reads_accelerates_form():
    assert placement.parse_max_memory("0=20GiB, 1=1.5GB,cpu=64GiB") == \
        {"cuda:0": 20 * GiB, "cuda:1": 1_500_000_000, "cpu": 64 * GiB}
    with pytest.raises(ValueError, match="DEVICE=SIZE"):
        placement.parse_max_memory("20GiB")
    with pytest.raises(ValueError, match="not a size"):
        placement.parse_max_memory("0=lots")


def test_working_memory_estimate_covers_the_measured_7b_runs():
    """The H100 runs of the 7B shape with defaults (4096 held-out tokens for the GA, 8 x 4 x 128 stacked in
    the sensitivity), peak GPU memory by nvidia-smi: 28439 MiB with the 14526 MiB of weights on the GPU, and
    17079 MiB with only the embeddings and head (2079 MiB) there and every block streamed."""
    shape = dict(make_shaped_model.SHAPES["qwen2.5-7b"])
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    measured = max(28439 - 14526, 17079 - 2079) * 2**20
    estimate = placement.working_bytes(model, 4096, 4096)
    assert measured <= estimate <= 1.15 * measured
    assert placement.working_bytes(model, 4096, 4096, with_logits=False) < estimate - 4e9


def test_on_the_cpu_the_model_stays_whole(tiny_qwen2):
    from transformers import AutoModelForCausalLM
    tiny_model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    mapping = placement.place_model(tiny_model, torch.device("cpu"), {"cpu": 1})
    assert mapping == {"": "cpu"}
    assert {p.device.type for p in tiny_model.parameters()} == {"cpu"}
    assert all(model_blocks.execution_device(b) == torch.device("cpu") for b in model_blocks.decoder_blocks(tiny_model))


def test_a_streamed_block_is_held_in_one_buffer(tiny_qwen2):
    """pin_in_one_buffer's layout (pinning itself needs a GPU): every tensor of the block keeps its values,
    dtype and shape, as an aligned view into one allocation."""
    from transformers import AutoModelForCausalLM
    block = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.bfloat16).model.layers[0]
    before = {n: t.clone() for n, t in block.state_dict().items()}
    placement.pin_in_one_buffer(block, pin_memory=False)
    after = block.state_dict()
    assert all(torch.equal(before[n], after[n]) and before[n].dtype == after[n].dtype for n in before)
    bases = {t.untyped_storage().data_ptr() for t in after.values()}
    assert len(bases) == 1 and all(t.data_ptr() % 64 == 0 for t in after.values())
    assert block(torch.randn(1, 4, 256, dtype=torch.bfloat16),
                 position_embeddings=(torch.ones(1, 4, 64, dtype=torch.bfloat16),
                                      torch.zeros(1, 4, 64, dtype=torch.bfloat16)),
                 attention_mask=None)[0].shape[-1] == 256
