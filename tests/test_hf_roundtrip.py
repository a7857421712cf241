"""Hugging Face save/load of dendritic models: our loader round-trips bitwise, the stock one refuses loudly."""

from __future__ import annotations

import pytest
import torch
from test_ecosystem import ZOO, build, out

import torch_dendrites as td

transformers = pytest.importorskip("transformers")
from torch_dendrites.integrations.transformers import from_pretrained, save_pretrained  # noqa: E402

CLASSES = {
    "bert": transformers.BertForSequenceClassification,
    "gpt2": transformers.AutoModelForCausalLM,
    "llama": transformers.LlamaForCausalLM,
}


def grown(name):
    model, inputs = build(name)
    td.add_dendrites(model)
    td.grow(model)
    td.grow(model)
    with torch.no_grad():
        for layer in td.dendritic_layers(model).values():
            for u in layer.dendrites.units:
                u.out_gain.normal_()
    return model, inputs


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("how", ["helper", "method"])
def test_save_pretrained_round_trips_bitwise(name, how, tmp_path):
    model, inputs = grown(name)
    if how == "helper":
        save_pretrained(model, tmp_path / "m")
    else:  # the model's own method, as Trainer.save_model and push_to_hub call it
        model.save_pretrained(tmp_path / "m")
    loaded = from_pretrained(CLASSES[name], tmp_path / "m")
    assert not loaded.training
    assert {n: la.num_dendrites for n, la in td.dendritic_layers(loaded).items()} == {
        n: la.num_dendrites for n, la in td.dendritic_layers(model).items()
    }
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(out(loaded, inputs), out(model, inputs))
    # and it saves again the same way
    loaded.save_pretrained(tmp_path / "again")
    assert td.dendritic_layers(from_pretrained(CLASSES[name], tmp_path / "again"))


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_stock_from_pretrained_refuses_instead_of_reinitialising(name, tmp_path, caplog):
    model, _ = grown(name)
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        CLASSES[name].from_pretrained(tmp_path / "m")
    auto = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    with pytest.raises(RuntimeError):
        auto.from_pretrained(tmp_path / "m")


def test_from_pretrained_of_a_plain_folder_says_so(tmp_path):
    model, _ = build("bert")
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(td.CheckpointError, match="no dendrite structure"):
        from_pretrained(transformers.BertForSequenceClassification, tmp_path / "plain")


def test_remove_dendrites_restores_the_stock_save_pretrained(tmp_path):
    model, inputs = build("bert")
    td.add_dendrites(model)
    assert "save_pretrained" in model.__dict__
    td.remove_dendrites(model)
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path / "m")
    back = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(out(back, inputs), out(model, inputs))


def test_peft_save_pretrained_round_trip_and_stock_refusal(tmp_path):
    peft = pytest.importorskip("peft")
    from test_peft import grown_lora, lora_llama

    from torch_dendrites.integrations.peft import from_pretrained as peft_from_pretrained

    model = grown_lora()
    ids = torch.randint(0, 100, (2, 7))
    model.save_pretrained(tmp_path / "adapter")
    # torch_dendrites.safetensors is adapter-sized: the LoRA adapters and dendrites, not the frozen base
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "torch_dendrites.safetensors"), "pt") as f:
        entry = f.get_tensor("torch_dendrites/model.safetensors")
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert entry.numel() < trainable + 16 * 1024
    config = lora_llama(seed=5).base_model.model.config
    torch.manual_seed(0)  # the pretrained base the adapters were trained on (lora_llama(0)'s)
    loaded = peft_from_pretrained(transformers.LlamaForCausalLM(config), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert len(td.dendritic_layers(loaded)) == 4
    torch.manual_seed(5)  # another base is refused by its fingerprint
    with pytest.raises(td.CheckpointError, match="base tensors differ in value"):
        peft_from_pretrained(transformers.LlamaForCausalLM(config), tmp_path / "adapter")
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM(config), tmp_path / "adapter")


def test_zoo_is_covered():
    assert set(CLASSES) <= set(ZOO)


def test_a_deep_copy_loads_into_itself(tmp_path):
    import copy

    from safetensors.torch import load_file

    model, _ = grown("llama")
    model.save_pretrained(tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    plain, _ = build("llama")
    td.add_dendrites(plain)
    twin = copy.deepcopy(plain)
    twin.load_state_dict(state, strict=False)  # the hook re-grows the copy, not the original
    assert all(la.num_dendrites == 2 for la in td.dendritic_layers(twin).values())
    assert all(la.num_dendrites == 0 for la in td.dendritic_layers(plain).values())
    assert torch.equal(
        twin.model.layers[0].self_attn.q_proj.base.weight, model.model.layers[0].self_attn.q_proj.base.weight
    )
