"""hf_io.py: Hugging Face folders in and out."""
import json

import pytest
import torch

from hf_io import from_pretrained
from hf_io import save_pretrained
from model import Llama, preset


def test_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1)
    model = Llama(preset("tiny")).eval()
    save_pretrained(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max() <= 1e-5
    again = from_pretrained(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_from_pretrained_refuses_broken_folders(tmp_path):
    from safetensors.torch import load_file, save_file
    save_pretrained(Llama(preset("tiny")), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        from_pretrained(tmp_path / "nowhere")
    broken = dict(state)
    del broken["model.layers.1.mlp.up_proj.weight"]
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks tensor 'model.layers.1.mlp.up_proj.weight'"):
        from_pretrained(tmp_path)
    broken = dict(state)
    broken["model.norm.weight"] = torch.ones(3)
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\)"):
        from_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96}))
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="has shape"):
        from_pretrained(tmp_path)


def test_padding_rows_are_zero_after_loading(tmp_path):
    save_pretrained(Llama(preset("tiny", vocab_size=500)), tmp_path)
    model = from_pretrained(tmp_path, pad_vocab_to=64)
    assert model.embed_tokens.weight.shape[0] == 512
    assert model.embed_tokens.weight[500:].abs().max() == 0
    assert model.embed_tokens.weight[:500].abs().max() > 0
