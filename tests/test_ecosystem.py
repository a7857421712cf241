"""Zero-config conversion over stock PyTorch and Hugging Face models (tiny configs, random init, offline)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from models import CNNBN, Shared, Tied
from torch import nn

import torch_dendrites as td

transformers = pytest.importorskip("transformers")


def bert():
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg), {"input_ids": torch.randint(0, 100, (2, 7))}


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg), {"input_ids": torch.randint(0, 100, (2, 7))}


def llama():
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg), {"input_ids": torch.randint(0, 100, (2, 7))}


def vit():
    cfg = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=40, num_labels=5,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 16, 16)}


def torch_transformer():
    m = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=24,
                       dropout=0.0, batch_first=True)  # fmt: skip
    return m, {"src": torch.randn(2, 5, 16), "tgt": torch.randn(2, 4, 16)}


def torch_encoder():
    layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), {"src": torch.randn(2, 5, 16)}


ZOO = {
    "bert": bert,
    "gpt2": gpt2,
    "llama": llama,
    "vit": vit,
    "nn.Transformer": torch_transformer,
    "nn.TransformerEncoder": torch_encoder,
    "cnn_bn": lambda: (CNNBN(), {"x": torch.randn(2, 3, 8, 8)}),
    "tied": lambda: (Tied(), {"idx": torch.randint(0, 11, (2, 4))}),
    "shared": lambda: (Shared(), {"x": torch.randn(3, 5)}),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    model, inputs = ZOO[name]()
    return model.eval(), inputs


def out(model, inputs):
    y = model(**inputs)
    if isinstance(y, torch.Tensor):
        return y
    return y.logits if hasattr(y, "logits") else y[0]


def tie_counts(model, params=None):
    """For each parameter object: how many distinct modules hold it (2+ means tied)."""
    holders = {}
    for m in {id(m): m for m in model.modules()}.values():
        for p in m._parameters.values():
            if p is not None:
                holders.setdefault(id(p), set()).add(id(m))
    return {k: len(v) for k, v in holders.items() if params is None or k in params}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zero_config_conversion(name, tmp_path):
    model, inputs = build(name)
    with torch.no_grad():
        ref = out(model, inputs)
    ties_before = {k: v for k, v in tie_counts(model).items() if v > 1}
    td.add_dendrites(model)
    assert td.dendritic_layers(model), td.summary(model)
    for _ in range(2):
        td.grow(model)
        with torch.no_grad():
            assert (out(model, inputs) - ref).abs().max() <= 1e-5
    assert tie_counts(model, ties_before) == ties_before  # ties stay tied
    # one optimizer step moves dendrite parameters
    model.train()
    dend = [p for layer in td.dendritic_layers(model).values() for p in layer.dendrite_parameters()]
    before = [p.detach().clone() for p in dend]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    out(model, inputs).float().pow(2).mean().backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, dend))
    # save / load into a freshly built model
    model.eval()
    td.save(tmp_path / "m", model)
    fresh, _ = build(name, seed=1)
    td.load(tmp_path / "m", fresh)
    with torch.no_grad():
        assert torch.equal(out(fresh, inputs), out(model, inputs))
    assert sorted(v for v in tie_counts(fresh).values() if v > 1) == sorted(ties_before.values())


@pytest.mark.parametrize(
    "name,skipped",
    [("gpt2", ["lm_head"]), ("llama", ["lm_head"]), ("bert", ["classifier"]), ("vit", ["classifier"])],
)
def test_transformers_heads_are_left_alone_by_default(name, skipped):
    model, _ = build(name)
    td.add_dendrites(model)
    s = td.summary(model)
    reasons = {r["name"]: r["reason"] for r in s.skipped}
    for head in skipped:
        assert head in reasons and reasons[head].startswith("default:"), reasons
    wrapped = {r["name"] for r in s.wrapped}
    assert not any(w.split(".")[-1] in ("lm_head", "classifier") for w in wrapped)
    # asked for explicitly, the head is wrapped
    model2, _ = build(name)
    td.add_dendrites(model2, td.DendriteConfig(target_names=[skipped[0]]))
    assert list(td.dendritic_layers(model2)) == [skipped[0]]


def test_gpt2_conv1d_and_attention_projections_wrapped():
    model, _ = build("gpt2")
    td.add_dendrites(model)
    names = set(td.dendritic_layers(model))
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"} <= names


def test_import_does_not_import_optional_libraries():
    code = "import sys, torch_dendrites; print([m for m in ('transformers', 'lightning', 'peft') if m in sys.modules])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert res.stdout.strip() == "[]", res.stderr
