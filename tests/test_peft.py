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


def grown_lora(seed=0):
    model = lora_llama(seed)
    td.add_dendrites(model)
    td.grow(model)
    td.grow(model)
    torch.manual_seed(seed + 10)
    with torch.no_grad():  # as after training: LoRA B, gains and cascade weights off zero
        for layer in td.dendritic_layers(model).values():
            layer.base.weight.normal_(0, 0.1)
            for u in layer.dendrites.units:
                u.out_gain.normal_()
                if u.cascade_gain is not None:
                    u.cascade_gain.normal_()
    return model.eval()


def test_peft_merge_and_unload_and_unload_refuse_while_adapters_have_dendrites():
    model = grown_lora()
    ids = torch.randint(0, 100, (2, 7))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(td.StateError, match="integrations.peft.merge_and_unload"):
        model.merge_and_unload()
    with pytest.raises(td.StateError, match=r"unload\(\)"):
        model.unload()
    with pytest.raises(td.StateError, match="merge"):
        model.merge_adapter()
    assert model.state_dict().keys() == state.keys()  # nothing was merged, nothing was dropped
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert len(td.dendritic_layers(model)) == 4
    # without dendrites, peft's own verbs work again
    td.remove_dendrites(model)
    base = model.merge_and_unload()
    assert not any("lora" in n for n, _ in base.named_modules())
    base(input_ids=ids)


def test_merge_and_unload_keeps_the_dendrites_and_the_function(tmp_path):
    from torch_dendrites.integrations.peft import merge_and_unload

    model = grown_lora()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    merged = merge_and_unload(model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(type(m).__module__.startswith("peft.") for m in merged.modules())
    layers = td.dendritic_layers(merged)
    assert sorted(layers) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")]
    assert all(layer.num_dendrites == 2 and layer.base.weight.shape[1] == 32 for layer in layers.values())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-4)
    # the merged model saves and loads like any dendritic model
    td.save(tmp_path / "merged", merged)
    torch.manual_seed(3)
    fresh = transformers.LlamaForCausalLM(merged.config)
    td.load(tmp_path / "merged", fresh)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_merge_and_unload_refuses_what_it_cannot_merge():
    from torch_dendrites.integrations.peft import merge_and_unload

    model = lora_llama()
    td.add_dendrites(model, td.DendriteConfig(dendrite_type="lowrank", dendrite_options={"rank": 2}))
    td.grow(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(td.StateError, match="lowrank"):
        merge_and_unload(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(td.StateError, match="peft model"):
        merge_and_unload(torch.nn.Sequential(torch.nn.Linear(2, 2)))
