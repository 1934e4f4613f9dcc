"""model.py against transformers' LlamaForCausalLM, and the converted offline SmolLM2-135M."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ENGLISH, KOREAN, PARAGRAPH

from hf_io import config_to_hf, from_pretrained, hf_state_shapes, save_pretrained
from loss import IGNORE_INDEX, cross_entropy_sum
from model import Llama, preset


def hf_twin(model: Llama):
    """A transformers LlamaForCausalLM holding exactly our model's weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(model.cfg), attn_implementation="sdpa"))
    state = {k: p.detach()[:shape[0]] for k, (p, shape) in hf_state_shapes(model).items()}
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True)
    return hf.float()


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_random_matches_transformers(tied):
    torch.manual_seed(0)
    model = Llama(preset("tiny", tie_embeddings=tied))
    for p in model.parameters():  # norms away from 1 so that their weights are tested too
        torch.nn.init.normal_(p, mean=1.0 if p.ndim == 1 else 0.0, std=0.2)
    hf = hf_twin(model)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 40))
    targets = idx.roll(-1, dims=1)
    targets[0, -5:] = IGNORE_INDEX
    ours, ref = model(idx), hf(idx).logits
    assert (ours - ref).abs().max() <= 1e-5

    loss = model(idx, targets)
    ref_loss = F.cross_entropy(ref.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    loss.backward()
    ref_loss.backward()
    ref_grads = dict(hf.named_parameters())
    for key, (p, shape) in hf_state_shapes(model).items():
        g, rg = p.grad[:shape[0]], ref_grads[key].grad
        assert (g - rg).abs().max() <= 1e-5 * rg.abs().max(), key


def test_real_model_matches_transformers(base_model, hf_base, base_tok):
    for text in ENGLISH + KOREAN:
        idx = torch.tensor([base_tok.encode(text).ids])
        with torch.no_grad():
            diff = (base_model(idx) - hf_base(idx).logits).abs().max().item()
        assert diff <= 1e-3, (text, diff)


def test_real_model_english_perplexity_and_paris(base_model, base_tok):
    # A missing Q/K un-permutation still says Paris, but perplexity goes from 7.2 to 43.5.
    idx = torch.tensor([base_tok.encode(PARAGRAPH).ids])
    with torch.no_grad():
        ppl = math.exp(base_model(idx[:, :-1], idx[:, 1:]).item())
    assert ppl < 15, ppl
    prompt = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
              "<|im_start|>assistant\n")
    idx = torch.tensor([base_tok.encode(prompt).ids])
    out = base_model.generate(idx, 16, temperature=0, eos_ids=[2])
    assert "Paris" in base_tok.decode(out[0, idx.shape[1]:].tolist())


def test_converted_tokenizer(base_tok, base_dir):
    from gguf import GGUFReader

    from gguf_io import bundled_gguf
    assert base_tok.get_vocab_size() == 49152
    assert [base_tok.id_to_token(i) for i in range(3)] == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = GGUFReader(str(bundled_gguf())).fields["tokenizer.ggml.tokens"].contents()
    assert all(base_tok.id_to_token(i) == t for i, t in enumerate(tokens))
    samples = ENGLISH + KOREAN + ["emoji 🙂🚀 and digits 0123456789", "  spaces\ttabs\n\nnewlines"]
    for text in samples:
        assert base_tok.decode(base_tok.encode(text).ids) == text
    # Digits are split one by one, as SmolLM2's pre-tokenizer does.
    assert base_tok.encode("2024").tokens == ["2", "0", "2", "4"]
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(base_dir)
    for text in samples:
        assert hf_tok(text)["input_ids"] == base_tok.encode(text).ids


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


def test_kv_cache_generation_equals_full_recompute(base_model, base_tok):
    idx = torch.tensor([base_tok.encode("Once upon a time, in a small village,").ids] * 2)
    out = base_model.generate(idx, 12, temperature=0)
    recomputed = idx
    for _ in range(12):
        with torch.no_grad():
            nxt = base_model(recomputed)[:, -1].argmax(-1, keepdim=True)
        recomputed = torch.cat([recomputed, nxt], dim=1)
    assert torch.equal(out, recomputed)


def test_chunked_loss_under_fp16_autocast_does_not_overflow():
    """dW = g.T @ h reaches 65,604 here, past fp16's 65,504: an unscaled fp16 matmul gives inf.
    The loss scales g by a power of two first, so it matches fp32 to fp16's rounding."""
    torch.manual_seed(0)
    N, C, V = 4096, 64, 3000
    h = (20 + torch.randn(N, C)).requires_grad_()
    w = (torch.randn(V, C) * 0.01).requires_grad_()
    t = torch.zeros(N, dtype=torch.long)  # most rows want token 0: its row of dW piles up
    t[::5] = torch.randint(0, V, (len(t[::5]),))
    with torch.autocast("cpu", dtype=torch.float16):
        ours = cross_entropy_sum(h, w, t, V)
        g = torch.softmax((h @ w.T).float(), -1) - F.one_hot(t, V)
        assert not torch.isfinite(g.half().T @ h.half()).all()  # the naive fp16 product
    ours.backward()
    h16, w16 = (x.detach().half().float().requires_grad_() for x in (h, w))
    ref = F.cross_entropy(h16 @ w16.T, t, reduction="sum")  # fp32 on the fp16-rounded inputs
    ref.backward()
    assert w16.grad.abs().max() > 65504
    assert abs(ours.item() - ref.item()) <= 1e-5 * ref.item()
    assert (h.grad - h16.grad).abs().max() <= 2e-3 * h16.grad.abs().max()
    assert (w.grad - w16.grad).abs().max() <= 2e-3 * w16.grad.abs().max()


@pytest.mark.parametrize("chunk_rows", [0, 64])
def test_chunked_loss_matches_naive_cross_entropy(chunk_rows):
    torch.manual_seed(0)
    V, padded = 1000, 1024  # padding rows must not enter the softmax
    h = torch.randn(300, 32, requires_grad=True)
    w = torch.randn(padded, 32, requires_grad=True)
    t = torch.randint(0, V, (300,))
    t[::7] = IGNORE_INDEX
    ours = cross_entropy_sum(h, w, t, V, chunk_rows) / (t != IGNORE_INDEX).sum()
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy((h @ w.T)[:, :V], t, ignore_index=IGNORE_INDEX)
    ref.backward()
    assert abs(ours.item() - ref.item()) <= 1e-5 * ref.item()
    assert (gh - h.grad).abs().max() <= 1e-5 * h.grad.abs().max()
    assert (gw - w.grad).abs().max() <= 1e-5 * w.grad.abs().max()
    assert w.grad[V:].abs().max() == 0
