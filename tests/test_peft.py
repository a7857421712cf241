"""Dendrites on the LoRA adapters of a stock peft model."""

from __future__ import annotations

import pytest
import torch

import torch_dendrites as td

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def lora_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    base = transformers.LlamaForCausalLM(cfg)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(base, lora)


def test_lora_plus_dendrites_trains_and_base_stays_frozen(tmp_path):
    model = lora_llama()
    ids = torch.randint(0, 100, (4, 9))
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    td.add_dendrites(model)  # zero-config on a peft model: the lora_B adapters
    wrapped = list(td.dendritic_layers(model))
    assert wrapped and all(n.endswith("lora_B.default") for n in wrapped)
    td.grow(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # td.summary counts LoRA as trainable (base) parameters, as peft's print_trainable_parameters does
    s = td.summary(model)
    peft_trainable, peft_total = model.get_nb_trainable_parameters()
    assert (s.trainable_parameters, s.total_parameters) == (peft_trainable, peft_total)
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".dendrites." not in n)
    assert s.trainable_base_parameters == lora > 0 and s.trainable_dendrite_parameters == s.dendrite_parameters
    assert any(".dendrites." in n for n in trainable)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n  # the frozen base: bitwise unchanged
    moved = [u.out_gain for layer in td.dendritic_layers(model).values() for u in layer.dendrites.units]
    assert all(g.abs().sum() > 0 for g in moved)

    # one save/load path for the whole thing: td.save, then td.load into a freshly built peft model
    model.eval()
    td.save(tmp_path / "lora_dendrites", model)
    fresh = lora_llama(seed=1)
    td.load(tmp_path / "lora_dendrites", fresh)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
