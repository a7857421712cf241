"""td.save / td.load: exact round trips into freshly built models; clear errors that change nothing."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from ckpt_tools import edit_recipe, resign
from models import CASES

import torch_dendrites as td


def grown(name, sets=2, seed=0):
    factory, make_x, cfg = CASES[name]
    torch.manual_seed(seed)
    model = td.add_dendrites(factory().eval(), cfg)
    for _ in range(sets):
        td.grow(model)
    with torch.no_grad():  # as if trained: every parameter non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, make_x()


def fresh(name, seed=123):
    torch.manual_seed(seed)  # other random weights: the load must overwrite all of them
    return CASES[name][0]().eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_is_bitwise(tmp_path, name):
    model, x = grown(name)
    td.save(tmp_path / "m", model)
    loaded = td.load(tmp_path / "m", fresh(name))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert td.summary(model).wrapped == td.summary(loaded).wrapped
    assert td.summary(model).dendrite_parameters == td.summary(loaded).dendrite_parameters


def test_tied_weights_stay_tied_after_load(tmp_path):
    model, _ = grown("tied")
    td.save(tmp_path / "m", model)
    loaded = td.load(tmp_path / "m", fresh("tied"))
    assert loaded.proj.base.weight is loaded.emb.weight


def test_wrong_base_model_is_refused_and_untouched(tmp_path):
    model, _ = grown("mlp")
    td.save(tmp_path / "m", model)
    other = fresh("cnn_bn")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    classes = {n: type(m) for n, m in other.named_modules()}
    with pytest.raises(td.CheckpointError, match="does not exist"):
        td.load(tmp_path / "m", other)
    assert {n: type(m) for n, m in other.named_modules()} == classes
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


def test_shape_mismatch_is_refused_and_untouched(tmp_path):
    model, _ = grown("mlp")
    td.save(tmp_path / "m", model)
    narrow = fresh("mlp")
    narrow.fc2 = torch.nn.Linear(16, 16)  # same names ...
    narrow.fc3 = torch.nn.Linear(16, 5)  # ... but another shape
    before = {k: v.clone() for k, v in narrow.state_dict().items()}
    with pytest.raises(td.CheckpointError, match="shape"):
        td.load(tmp_path / "m", narrow)
    assert not td.dendritic_layers(narrow)
    assert all(torch.equal(narrow.state_dict()[k], v) for k, v in before.items())


def test_pickle_payload_is_never_executed(tmp_path):
    model, _ = grown("mlp")
    folder = td.save(tmp_path / "m", model)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("model.safetensors", "recipe.json"):
        target = tmp_path / f"copy_{name}"
        import shutil

        shutil.copytree(folder, target)
        (target / name).write_bytes(pickle.dumps(Payload()))
        with pytest.raises(td.CheckpointError):
            td.load(target, fresh("mlp"))
        assert not marker.exists()


def test_truncated_weights_and_edited_recipe(tmp_path):
    model, _ = grown("mlp")
    folder = td.save(tmp_path / "m", model)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(td.CheckpointError, match="truncated"):
        td.load(folder, fresh("mlp"))
    folder = td.save(tmp_path / "n", model)
    recipe = json.loads((folder / "recipe.json").read_text())
    recipe["layers"][0]["num_dendrites"] = "two"
    (folder / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(td.CheckpointError, match="checksum"):  # an edit without re-signing
        td.load(folder, fresh("mlp"))
    resign(folder)  # an edit by someone who knows the format: the structural checks catch it
    with pytest.raises(td.CheckpointError, match="num_dendrites"):
        td.load(folder, fresh("mlp"))
    edit_recipe(folder, lambda r: r["layers"][0].update(num_dendrites=3))  # one more than the weights hold
    m = fresh("mlp")
    with pytest.raises(td.CheckpointError, match="num_dendrites=3 in the recipe but 2 in the weights"):
        td.load(folder, m)
    assert not td.dendritic_layers(m)
    edit_recipe(folder, lambda r: r.update(format_version=99))
    with pytest.raises(td.CheckpointError, match="newer"):
        td.load(folder, fresh("mlp"))


def test_ddp_and_compile_prefixes_accepted(tmp_path):
    model, x = grown("mlp")
    holder = torch.nn.Module()
    holder.module = torch.nn.Module()
    holder.module._orig_mod = model
    from safetensors.torch import save_file

    folder = td.save(tmp_path / "m", model)
    state = {f"module._orig_mod.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_id = json.loads((folder / "recipe.json").read_text())["save_id"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "torch-dendrites", "save_id": save_id})
    resign(folder)
    loaded = td.load(folder, fresh("mlp"))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_controller_round_trip(tmp_path):
    model, x = grown("mlp", sets=0)
    ctl = td.GrowthController(model, td.GrowthConfig(patience=1, seed=3))
    for s in (0.1, 0.2, 0.2, 0.3):
        ctl.step(s, test=s / 2)
    td.save(tmp_path / "m", model, ctl)
    m2 = fresh("mlp")
    c2 = td.GrowthController(td.add_dendrites(fresh("mlp")), td.GrowthConfig(patience=1, seed=3))
    td.remove_dendrites(c2.model)
    td.load(tmp_path / "m", m2, c2)
    assert c2.history == ctl.history and c2.epoch == ctl.epoch and c2.best_score == ctl.best_score
    assert all(torch.equal(c2.best_state[k], v) for k, v in ctl.best_state.items())


def test_summary_identical_after_load(tmp_path):
    factory, make_x, _ = CASES["transformer"]
    torch.manual_seed(0)
    model = td.add_dendrites(factory().eval(), td.DendriteConfig(exclude=["1"]))
    td.grow(model)
    td.save(tmp_path / "m", model)
    loaded = td.load(tmp_path / "m", fresh("transformer"))
    assert str(td.summary(loaded)) == str(td.summary(model))


@pytest.mark.parametrize("bad_path", ["../../etc/passwd", "fc1/../../x", "fc1; rm -rf", "", "a..b"])
def test_path_traversal_and_odd_layer_names_are_refused(tmp_path, bad_path):
    model, _ = grown("mlp")
    folder = td.save(tmp_path / "m", model)
    edit_recipe(folder, lambda r: r["layers"][0].update(path=bad_path))
    m = fresh("mlp")
    with pytest.raises(td.CheckpointError, match="module path"):
        td.load(folder, m)
    assert not td.dendritic_layers(m)


def test_optimizer_scheduler_rng_round_trip(tmp_path):
    import random

    import numpy as np

    model, x = grown("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        sched.step()
    gen = torch.Generator().manual_seed(5)
    gen.manual_seed(9)
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    td.save(tmp_path / "m", model, optimizer=opt, scheduler=sched, rng=True, generators={"g": gen}, extra={"k": 1})
    expect = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=gen))
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    gen2 = torch.Generator()
    m2 = td.load(tmp_path / "m", fresh("mlp"))
    opt2 = torch.optim.Adam(m2.parameters(), lr=0.5)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=7, gamma=0.1)
    extra = td.persistence.load_training_state(
        tmp_path / "m", optimizer=opt2, scheduler=sched2, rng=True, generators={"g": gen2}
    )
    assert extra == {"k": 1}
    got = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=gen2))
    assert torch.equal(got[0], expect[0]) and got[1] == expect[1] and got[2] == expect[2]
    assert torch.equal(got[3], expect[3])
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), m2.parameters()):
        s, t = opt.state[p], opt2.state[q]
        assert all(torch.equal(s[k], t[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    # one more identical step from both
    for o, m in ((opt, model), (opt2, m2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), m2.parameters()))


def test_stale_optimizer_is_refused_by_save_latest(tmp_path):
    model, _ = grown("mlp", sets=1)
    cfg = td.GrowthConfig(patience=1, trial_warmup=1, max_dendrites=3)
    ctl = td.GrowthController(model, cfg, out_dir=tmp_path)
    ctl.step(0.5)
    assert ctl.step(0.5).event == "grow"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # rebuilt after growth, as it should be
    ctl.save_latest(opt)
    ctl.step(0.4)
    assert ctl.step(0.4).event == "retry"  # the failed set is removed: `opt` now holds stale parameters
    with pytest.raises(td.StateError, match="rebuild"):
        ctl.save_latest(opt)


def test_load_leaves_the_global_random_state_alone(tmp_path):
    net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 3)))
    td.grow(net)
    td.grow(net)
    td.save(tmp_path / "ckpt", net)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3))
    state = torch.get_rng_state()
    td.load(tmp_path / "ckpt", fresh)
    assert torch.equal(torch.get_rng_state(), state) and fresh[0].num_dendrites == 2


class _Gain(torch.nn.Module):
    def __init__(self, gain):
        super().__init__()
        self.out_gain = torch.nn.Parameter(gain)


class _DataInitDendrites(td.dendrites.base.DendriteStack):
    """A user dendrite type whose init reads the layer's weights (data-dependent: no meta-device build)."""

    type_name = "test_data_init"

    def grow(self, generator=None):
        like = self._like()
        scale = float(like.detach().abs().mean())  # fails on the meta device: there are no values there
        unit = _Gain(torch.full((self.num_neurons,), scale, dtype=like.dtype, device=like.device))
        self.units.append(unit)
        return self.num_neurons

    def forward(self, y, neuron_axis, *args, **kwargs):
        p = self._check_axis(y, neuron_axis)
        for u in self.units:
            y = y * (1 + 0.1 * u.out_gain.view(-1, *(1,) * (y.dim() - p - 1)))
        return y


def test_custom_dendrite_type_that_cannot_be_built_on_the_meta_device_loads(tmp_path):
    td.register_dendrite_type("test_data_init", _DataInitDendrites)
    model, x = grown("mlp", sets=0)
    model = td.add_dendrites(td.remove_dendrites(model), td.DendriteConfig(dendrite_type="test_data_init"))
    td.grow(model)
    td.grow(model)
    td.save(tmp_path / "m", model)
    base = fresh("mlp")
    state = torch.get_rng_state()
    loaded = td.load(tmp_path / "m", base)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_resolve_tells_nothing_there_from_unreadable(tmp_path):
    """A resume may start afresh only when nothing is there: anything else that fails must not be
    mistaken for "no checkpoint" (the next save would replace the unreadable one)."""
    from torch_dendrites.persistence.io import NoCheckpoint

    with pytest.raises(NoCheckpoint):
        td.persistence._resolve(tmp_path / "latest")
    (tmp_path / "file").write_text("x")
    with pytest.raises(td.CheckpointError) as info:
        td.persistence._resolve(tmp_path / "file")
    assert not isinstance(info.value, NoCheckpoint)


def test_weights_are_written_as_standard_safetensors_without_a_copy_of_the_data(tmp_path):
    """td.save streams each tensor's own memory into the file (TensorFile); the file is plain safetensors that
    the safetensors library reads back exactly, for every dtype and for empty and 0-d tensors."""
    from safetensors.torch import load_file
    from safetensors.torch import save as st_save

    from torch_dendrites.persistence.codec import TensorFile

    tensors = {
        "w": torch.randn(3, 5), "i": torch.arange(7), "flag": torch.tensor(True), "h": torch.randn(4).half(),
        "b": torch.randn(9).bfloat16(), "empty": torch.empty(0, 2), "mask": torch.tensor([True, False, True]),
        "u": torch.arange(3, dtype=torch.uint8),
    }  # fmt: skip
    f = TensorFile(tensors, {"format": "3"})
    chunks = list(f.chunks())
    # the tensors' own memory, not copies of it
    addresses = {c.obj.ctypes.data for c in chunks[1:]}
    assert {tensors[k].data_ptr() for k in ("w", "i", "h", "b")} <= addresses
    assert len(f) == sum(c.nbytes for c in chunks) == len(st_save(tensors, metadata={"format": "3"}))
    (tmp_path / "x.safetensors").write_bytes(bytes(f))
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    with pytest.raises(td.CheckpointError, match="contiguous CPU"):
        TensorFile({"t": torch.randn(4, 4).t()}, {})
    net = td.add_dendrites(torch.nn.Sequential(torch.nn.Linear(4, 3)))
    td.grow(net, torch.Generator().manual_seed(0))
    td.save(tmp_path / "ck", net)
    saved = load_file(tmp_path / "ck" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("journal", ["memory", "spilled"])
@pytest.mark.parametrize("already_grown", [False, True])
def test_weights_file_changed_between_check_and_apply_leaves_the_model_as_it_was(
    tmp_path, monkeypatch, already_grown, journal
):
    """The weights are hashed while checking and read again into the model at the end; if that second read
    differs (the file edited in place in between), the load fails and every tensor it had overwritten gets
    its value back: those of a fresh base model, and those of a model that already held the structure, from
    the load's journal in memory or spilled to a temporary file (large models)."""
    from torch_dendrites.persistence import checkpoint

    if journal == "spilled":
        monkeypatch.setattr(checkpoint, "_JOURNAL_MEMORY_BYTES", 0)

    model, x = grown("mlp")
    ctl = td.GrowthController(model, td.GrowthConfig())
    folder = td.save(tmp_path / "m", model, ctl)
    target = fresh("mlp")
    if already_grown:
        target = td.load(folder, target)
        with torch.no_grad():
            for p in target.parameters():
                p.mul_(0.5)
    before, structure = _state(target), td.summary(target).wrapped
    other = td.GrowthController(td.add_dendrites(fresh("mlp")), td.GrowthConfig(patience=9))
    td.remove_dendrites(other.model)
    other_before = {k: v for k, v in vars(other).items() if k != "model"}
    real = checkpoint._load_weights

    def edit_then_load(model_, r, tx, existing):
        with open(folder / "model.safetensors", "r+b") as f:  # the same file (inode): what the open descriptor sees
            f.seek(-3, 2)
            last = f.read(1)
            f.seek(-3, 2)
            f.write(bytes([last[0] ^ 0x40]))
        return real(model_, r, tx, existing)

    monkeypatch.setattr(checkpoint, "_load_weights", edit_then_load)
    monkeypatch.setattr(checkpoint, "_BATCH_BYTES", 64)  # many batches: some already loaded when it fails
    with pytest.raises(td.CheckpointError, match="does not match the hash"):
        td.load(folder, target, other)
    assert td.summary(target).wrapped == structure
    after = target.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert {k: v for k, v in vars(other).items() if k != "model"} == other_before


def test_a_large_load_keeps_the_values_it_overwrites_on_disk_not_in_memory(tmp_path, monkeypatch):
    """Beyond _JOURNAL_MEMORY_BYTES of overwritten values the load's journal holds no tensor in memory (so a load
    never holds a second copy of the weights), every overwritten tensor is journalled once (tied weights once),
    and the temporary file is closed at the end."""
    from torch_dendrites.persistence import checkpoint

    model, x = grown("mlp", sets=2)
    folder = td.save(tmp_path / "m", model)
    target = td.load(folder, fresh("mlp"))
    with torch.no_grad():
        for p in target.parameters():
            p.mul_(0.5)
    seen = []
    real_close = checkpoint._Journal.close

    def close(self):
        seen.append((dict(self.memory), list(self.records), self.file))
        real_close(self)
        assert self.file is None

    monkeypatch.setattr(checkpoint, "_JOURNAL_MEMORY_BYTES", 0)
    monkeypatch.setattr(checkpoint._Journal, "close", close)
    td.load(folder, target)
    with torch.no_grad():
        assert torch.equal(target(x), model(x))
    ((memory, records, file),) = seen
    assert memory == {} and file is not None and file.closed
    assert sorted(r[0] for r in records) == sorted(k for k, v in target.state_dict().items() if v.numel())


@pytest.mark.parametrize("adapter", [False, True])
def test_load_holds_one_batch_of_the_file_at_a_time(tmp_path, monkeypatch, adapter):
    """The weights file is never held whole: each tensor read is freed once its batch is in the model (so a
    load's peak is the model, the values it may have to put back, and one batch)."""
    import weakref

    from torch_dendrites.persistence import checkpoint

    model, x = grown("mlp", sets=3)
    if adapter:
        for name, p in model.named_parameters():
            p.requires_grad_(".dendrites." in name)
    folder = td.save(tmp_path / "m", model, base_weights=not adapter)
    real, alive, most = checkpoint.iter_data, [], [0]

    def watched(*args):
        for key, t in real(*args):
            most[0] = max(most[0], sum(r() is not None for r in alive))
            alive.append(weakref.ref(t))
            yield key, t

    monkeypatch.setattr(checkpoint, "iter_data", watched)
    monkeypatch.setattr(checkpoint, "_BATCH_BYTES", 1)  # a batch per tensor
    target = fresh("mlp")
    if adapter:  # the pretrained base the adapter-sized folder was trained on
        target.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items()
                                if ".dendrites." not in k})  # fmt: skip
    loaded = td.load(folder, target)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert len(alive) >= 10 and most[0] <= 1  # only the tensor the loop variable still refers to
