"""activation_rounding.py: the torch emulation of llama.cpp's activation rounding is ggml's, bit for bit, and
lands on the inputs of exactly the linear layers an assignment quantizes (a tied head included)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import activation_rounding
import quant_utils


def activations(rows: int = 48, n: int = 1536, seed: int = 0) -> np.ndarray:
    """Rows with per-channel scales spread over orders of magnitude (LLM activations have outlier channels),
    and the blocks ggml treats specially: all zeros, one huge outlier, a negative extreme, ties in magnitude."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, n)) * np.exp(1.5 * rng.standard_normal((1, n)))).astype(np.float32)
    x[0, :256] = 0.0
    x[1, 17] = 3000.0
    x[2, 300] = -50.0
    x[3, 512:768] = -2.5
    x[4, 768:800] = np.tile([1.0, -1.0], 16)
    x[5, :32] = 1e-30
    return x


@pytest.mark.parametrize("act_type", ["Q8_0", "Q8_1", "Q8_K", "F16", "BF16", "F32"])
def test_emulation_equals_ggml_cpu_quantizer_bit_for_bit(act_type):
    x = activations()
    ggml = quant_utils.ggml_round_activations(x, act_type)
    emulated = activation_rounding.round_activations(torch.from_numpy(x), act_type).numpy()
    np.testing.assert_array_equal(emulated, ggml)
    if act_type != "F32":
        assert not np.array_equal(ggml, x)            # the rounding is real


def test_activation_types_come_from_ggml():
    """The vec_dot types llama.cpp's CPU matmuls use: K- and IQ-quants take 256-blocks, the rest 32-blocks."""
    expected = {"Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K",
                "IQ4_XS": "Q8_K", "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0",
                "Q4_1": "Q8_1", "Q5_1": "Q8_1", "F16": "F16", "BF16": "BF16", "F32": "F32"}
    assert {t: quant_utils.activation_type(t) for t in expected} == expected


def test_q8_k_is_coarser_than_q8_0_on_outlier_activations():
    """One scale per 256 values loses more of an outlier-heavy row than one per 32: why the choice of weight
    type changes the activation error the model sees."""
    x = torch.from_numpy(activations())
    err = {t: float((activation_rounding.round_activations(x, t) - x).square().mean()) for t in ("Q8_0", "Q8_K")}
    assert err["Q8_K"] > 2 * err["Q8_0"] > 0


def test_bad_rows_and_types_are_refused():
    with pytest.raises(ValueError, match="blocks of 256"):
        activation_rounding.round_activations(torch.zeros(2, 96), "Q8_K")
    with pytest.raises(ValueError, match="unknown activation type"):
        activation_rounding.round_activations(torch.zeros(2, 64), "Q4_K")


def test_hooks_round_exactly_the_assigned_linears(tiny_llama):
    """q_proj in Q5_0 sees Q8_0 inputs, down_proj in Q4_K Q8_K inputs, the tied head (the embedding in Q5_1)
    Q8_1 inputs; an unassigned linear and everything after the context are untouched."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = torch.randn(3, 5, attn.q_proj.in_features) * 4
    h = torch.randn(3, 5, mlp.down_proj.in_features) * 4
    layers = {"model.layers.0.self_attn.q_proj.weight": (attn.q_proj, x, "Q5_0", "Q8_0"),
              "model.layers.0.mlp.down_proj.weight": (mlp.down_proj, h, "Q4_K", "Q8_K"),
              "model.embed_tokens.weight": (model.lm_head, x, "Q5_1", "Q8_1"),
              "model.layers.0.self_attn.k_proj.weight": (attn.k_proj, x, None, "F32")}
    before = {name: module(inp) for name, (module, inp, _, _) in layers.items()}
    assigned = {name: qtype for name, (_, _, qtype, _) in layers.items() if qtype is not None}
    with activation_rounding.rounded_linear_inputs(model, assigned):
        during = {name: module(inp) for name, (module, inp, _, _) in layers.items()}
    for name, (module, inp, _, act) in layers.items():
        expected = torch.nn.functional.linear(activation_rounding.round_activations(inp, act), module.weight,
                                              module.bias)
        torch.testing.assert_close(during[name], expected, rtol=0, atol=0)
        assert torch.equal(during[name], before[name]) == (act == "F32")
        assert torch.equal(module(inp), before[name])        # hooks removed
