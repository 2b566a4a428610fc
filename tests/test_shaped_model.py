"""tools/make_shaped_model.py: checkpoints with a real model's exact shape, random weights, the real tokenizer."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QWEN_TOKENIZER_DIR

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import make_shaped_model  # noqa: E402
import architectures  # noqa: E402


def test_qwen7b_shape_is_the_published_config():
    """The fields issue 8 names, as Qwen/Qwen2.5-7B-Instruct's config.json has them."""
    shape = make_shaped_model.SHAPES["qwen2.5-7b"]
    assert (shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"],
            shape["num_key_value_heads"], shape["intermediate_size"], shape["vocab_size"]) == \
        (3584, 28, 28, 4, 18944, 152064)
    assert shape["rope_theta"] == 1e6 and shape["tie_word_embeddings"] is False and shape["model_type"] == "qwen2"


def test_shaped_checkpoint_loads_with_the_real_tokenizer(tmp_path):
    """One block of Qwen2.5-0.5B's widths: transformers loads it (q/k/v biases, tied head), the Qwen tokenizer
    encodes, and our exporter reads its shapes."""
    if not (QWEN_TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"real Qwen tokenizer not fetched ({QWEN_TOKENIZER_DIR})")
    out = tmp_path / "q05"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_shaped_model.py"), "--shape", "qwen2.5-0.5b",
                    "--layers", "1", "--tokenizer", str(QWEN_TOKENIZER_DIR), "--output", str(out)],
                   check=True, capture_output=True, text=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 896
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) >= 151643 and tokenizer("Hello world")["input_ids"]
    sys.path.insert(0, str(ROOT))
    info = architectures.load_model_info(out)
    assert info.n_vocab == 151936 and info.tied
    assert json.loads((out / "shape.json").read_text())["random_weights"] is True
