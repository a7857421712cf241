"""Hostile checkpoints: generated bad folders must give the library's own error, change nothing (model,
controller, optimizer, scheduler, random states, generators, files), allocate no more than a small bound
and never hang.

Every risky load runs in a forked child under an address-space limit (``RLIMIT_AS``: its size now plus
512 MiB) and a timeout. Edits are re-signed (``ckpt_tools.resign``) so that the structural checks, not
only the hashes, must catch them; byte flips are not re-signed. The default suite runs a few examples of
each strategy; ``-m slow`` runs hundreds. The generated cases run on two victims: a full folder and an
adapter-sized one (``base_weights=False``, a frozen first layer left out and fingerprinted).
"""

from __future__ import annotations

import collections
import copy
import json
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_tools import (
    edit_recipe,
    in_child,
    read_recipe,
    read_safetensors_header,
    resign,
    resign_base,
    snapshot_files,
    write_safetensors_raw,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import MLP

import torch_dendrites as td

LIMIT = 512 << 20  # the extra address space a load may take
FAST = settings(max_examples=6, deadline=None, database=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
CFG = td.GrowthConfig(mode="fixed", switch_every=1, max_dendrites=3, max_tries=3, seed=0)
X = torch.linspace(-1, 1, 24).reshape(4, 6)
TALLY: collections.Counter = collections.Counter()  # (case class, load, outcome) -> count, printed at the end


@pytest.fixture(scope="module", autouse=True)
def _print_tally():
    yield
    if TALLY:
        print("\nhostile cases (class, load, outcome): count")
        for key in sorted(TALLY):
            print(f"  {key}: {TALLY[key]}")


# ---------------------------------------------------------------------- the victim
def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            if p.requires_grad:  # frozen base weights stay as "pretrained"
                p.add_(noise)


def _pretrained():
    """The adapter victim's base model: the same weights at every call (as from_pretrained), fc1 frozen."""
    torch.manual_seed(0)
    model = MLP()
    model.fc1.requires_grad_(False)
    return model


def _victim_run(adapter=False):
    """A model with 2 dendrites per layer whose controller's best weights are at 1 dendrite, an Adam
    with state, a StepLR, a generator: everything a checkpoint holds. ``adapter``: fc1's base is frozen."""
    torch.manual_seed(0)
    model = td.add_dendrites(_pretrained() if adapter else MLP())
    ctl = td.GrowthController(model, CFG)
    for i, score in enumerate((0.5, 0.6, 0.55)):
        _perturb(model, i)
        ctl.step(score, test=score / 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(X).pow(2).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    opt.step()
    sched.step()
    gen = torch.Generator().manual_seed(9)
    return model, ctl, opt, sched, gen


def _golden(adapter):
    root = Path(tempfile.mkdtemp(prefix="td-hostile-"))
    model, ctl, opt, sched, gen = _victim_run(adapter)
    assert ctl.best_counts == {"fc1": 1, "fc2": 1, "fc3": 1} and model.fc1.num_dendrites == 2
    folder = td.save(
        root / "golden",
        model,
        ctl,
        base_weights=not adapter,
        optimizer=opt,
        scheduler=sched,
        generators={"g": gen},
        rng=True,
    )
    assert (read_recipe(folder)["base"] is not None) == adapter
    with torch.no_grad():
        out = model(X)
    base = _pretrained if adapter else MLP
    td.load(folder, base())  # the meta-device kernels load once here, not in every child
    return {"folder": folder, "out": out, "epoch": ctl.epoch, "opt": opt.state_dict(), "root": root, "adapter": adapter}


@pytest.fixture(scope="module")
def golden():
    """The victim checkpoint, and what a correct load reproduces."""
    g = _golden(adapter=False)
    yield g
    shutil.rmtree(g["root"], ignore_errors=True)


@pytest.fixture(scope="module")
def adapter_golden():
    """The adapter-sized victim: fc1's frozen base left out, its fingerprint in the recipe."""
    g = _golden(adapter=True)
    yield g
    shutil.rmtree(g["root"], ignore_errors=True)


@pytest.fixture(params=["full", "adapter"])
def any_golden(request):
    return request.getfixturevalue("adapter_golden" if request.param == "adapter" else "golden")


def _base_model(adapter):
    """The freshly built base model a load starts from (for the adapter victim: holding its pretrained fc1)."""
    return _pretrained() if adapter else MLP()


def _targets(adapter=False):
    """What a resumed run loads into: the saved structure with other weights, fresh training objects (the
    adapter victim's frozen fc1 base holds its pretrained weights, as a resumed run's would)."""
    torch.manual_seed(1)
    model = td.add_dendrites(_pretrained() if adapter else MLP())
    td.grow(model)
    td.grow(model)
    if adapter:
        _perturb(model, 99)  # the trainable weights differ from the saved ones
    ctl = td.GrowthController(model, CFG)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    gen = torch.Generator().manual_seed(3)
    return model, ctl, opt, sched, gen


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return type(a) is type(b) and a == b


def _state(model, ctl=None, opt=None, sched=None, gen=None):
    """Everything a load may change, deep-copied."""
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "grad": [p.requires_grad for p in model.parameters()],
        "ctl": None if ctl is None else copy.deepcopy(ctl.state_dict()),
        "opt": None if opt is None else copy.deepcopy(opt.state_dict()),
        "sched": None if sched is None else copy.deepcopy(sched.state_dict()),
        "gen": None if gen is None else gen.get_state(),
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()),
    }


def _attempt(folder, out, adapter=False):
    """Load ``folder`` twice (into a resumed run with all training state, and into a fresh base model);
    report per load "refused" (a CheckpointError that changed nothing) or "correct" (the saved function)."""
    report = {}
    model, ctl, opt, sched, gen = _targets(adapter)
    before = _state(model, ctl, opt, sched, gen)
    try:
        td.load(folder, model, ctl, optimizer=opt, scheduler=sched, rng=True, generators={"g": gen})
    except td.CheckpointError:
        report["resume"] = "refused" if _same(_state(model, ctl, opt, sched, gen), before) else "CHANGED"
    else:
        with torch.no_grad():
            report["resume"] = "correct" if torch.equal(model(X), out) else "WRONG OUTPUT"
    base = _base_model(adapter)
    before = _state(base)
    try:
        td.load(folder, base)
    except td.CheckpointError:
        report["fresh"] = "refused" if _same(_state(base), before) else "CHANGED"
    else:
        with torch.no_grad():
            report["fresh"] = "correct" if torch.equal(base(X), out) else "WRONG OUTPUT"
    return report


def _check_hostile(golden, mutate, *, refuse=(), kind="named", isolate=True):
    """Copy the golden folder, ``mutate(folder)`` it, load it in a limited child, check the outcome: each
    load is refused without changing anything, or loads the saved function; those named in ``refuse``
    ("resume", "fresh") must be refused. ``isolate=False`` (cases that cannot ask for memory) loads in
    this process: quicker."""
    work = Path(tempfile.mkdtemp(dir=golden["root"]))
    try:
        folder = work / "ck"
        shutil.copytree(golden["folder"], folder)
        mutate(folder)
        files = snapshot_files(work)
        adapter = golden.get("adapter", False)
        if isolate:
            res = in_child(lambda: _attempt(folder, golden["out"], adapter), extra_address_space=LIMIT, timeout=120)
        else:
            res = {"ok": True, "result": _attempt(folder, golden["out"], adapter)}
        assert res.get("ok"), res  # no raw error, no hang, no memory exhaustion
        for load, outcome in res["result"].items():
            TALLY[(f"{kind} (adapter-sized)" if adapter else kind, load, outcome)] += 1
            assert outcome in (("refused",) if load in refuse else ("refused", "correct")), res["result"]
        assert snapshot_files(work) == files  # a load never writes
        return res["result"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------- strategies
_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([-1, 0, 1, 2, 3, 10_000, 10_001, 2**31, 2**63, 10**30, -(10**30)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, 0.5]),
    st.text(max_size=12),
    st.sampled_from(["cascade", "lowrank", "gated", "tanh", "sigmoid", "candidate", "neuron", "Linear", "fc1"]),
)
json_values = st.recursive(
    _json_leaf, lambda ch: st.lists(ch, max_size=3) | st.dictionaries(st.text(max_size=6), ch, max_size=3), max_leaves=6
)
_RECIPE_TOP = [
    "format",
    "format_version",
    "library_version",
    "save_id",
    "files",
    "dendrite_config",
    "layers",
    "skipped",
    "aliases",
    "base",
    "peft",
    "checksum",
    "surprise",
]
_LAYER_FIELDS = [
    "path",
    "type",
    "dendrite_type",
    "num_dendrites",
    "neuron_axis",
    "activation",
    "init_scale",
    "correlation_units",
    "candidates",
    "surprise",
]
_CFG_FIELDS = ["dendrite_type", "dendrite_options", "activation", "init_scale", "neuron_axis", "target_names"]
_OPTIONS = st.dictionaries(
    st.sampled_from(["rank", "segments", "context_dim", "branch_inputs", "receptive", "bogus"]), json_values, max_size=2
)


_BASE_OPS = ["dtype", "shape", "sha256", "drop", "add_stored", "add_dendrite", "add_absent", "rename", "null", "value"]


@st.composite
def base_edits(draw):
    """A function editing the recipe's ``base`` fingerprint (made up where the folder is a full one); the table's
    own hash is recomputed or not."""
    op = draw(st.sampled_from(_BASE_OPS))
    rehash = draw(st.booleans())
    value = draw(json_values)
    pick = draw(st.integers(0, 10**6))
    dtype = draw(st.sampled_from(["F16", "F64", "I64", "BOOL", "X9", 7]))

    def edit(r):
        base = r.get("base")
        if not isinstance(base, dict):
            base = {"tensors": {"fc1.base.bias": {"dtype": "F32", "shape": [16], "sha256": "0" * 64}}, "sha256": ""}
        table = base["tensors"]
        k = sorted(table)[pick % len(table)]
        if op == "dtype":
            table[k]["dtype"] = dtype
        elif op == "shape":
            table[k]["shape"] = value if isinstance(value, list) else [value]
        elif op == "sha256":
            table[k]["sha256"] = f"{pick:064x}"
        elif op == "drop":
            table.pop(k)
        elif op == "add_stored":  # a tensor the weights file holds
            table["fc2.base.weight"] = {"dtype": "F32", "shape": [16, 16], "sha256": "1" * 64}
        elif op == "add_dendrite":
            table["fc1.dendrites.units.0.out_gain"] = {"dtype": "F32", "shape": [16], "sha256": "2" * 64}
        elif op == "add_absent":
            table["fc9.weight"] = dict(table[k])
        elif op == "rename":
            table[k + "x"] = table.pop(k)
        elif op == "value":
            table[k] = value
        r["base"] = None if op == "null" else base
        if rehash and op != "null":
            resign_base(r)

    return edit


@st.composite
def recipe_edits(draw):
    """A function editing a recipe: one field replaced or deleted, at the top, in the config, a layer or the
    base fingerprint."""
    where = draw(st.sampled_from(["top", "config", "layer", "layers", "base"]))
    if where == "base":
        return draw(base_edits())
    value = draw(json_values)
    delete = draw(st.booleans()) and where != "layers"
    if where == "top":
        key = draw(st.sampled_from(_RECIPE_TOP))
        return lambda r: r.pop(key, None) if delete else r.__setitem__(key, value)
    if where == "config":
        key = draw(st.sampled_from(_CFG_FIELDS))
        if key == "dendrite_options" and draw(st.booleans()):
            value = draw(_OPTIONS)
        return lambda r: r["dendrite_config"].pop(key, None) if delete else r["dendrite_config"].__setitem__(key, value)
    if where == "layer":
        i, key = draw(st.integers(0, 2)), draw(st.sampled_from(_LAYER_FIELDS))
        return lambda r: r["layers"][i].pop(key, None) if delete else r["layers"][i].__setitem__(key, value)
    op = draw(st.sampled_from(["drop", "duplicate", "swap_paths", "reverse"]))
    ops = {
        "drop": lambda r: r["layers"].pop(),
        "duplicate": lambda r: r["layers"].append(dict(r["layers"][0])),
        "swap_paths": lambda r: (r["layers"][0].__setitem__("path", "fc2"), r["layers"][1].__setitem__("path", "fc1")),
        "reverse": lambda r: r["layers"].reverse(),
    }
    return ops[op]


_CTL_FIELDS = [
    "epoch",
    "smoothed",
    "best_score",
    "best_epoch",
    "best_extras",
    "best_counts",
    "since_best",
    "phase_start",
    "phase_grown",
    "phase_improved",
    "tries",
    "growths",
    "done",
    "history",
    "phase",
    "last_phase_len",
    "cand_start",
    "cand_since",
    "cand_best",
    "trainable_before",
    "norm_momenta",
    "architectures",
    "config",
    "version",
    "best_state",
    "surprise",
]


@st.composite
def controller_edits(draw):
    key = draw(st.sampled_from(_CTL_FIELDS))
    kind = draw(st.sampled_from(["value", "delete", "best_counts", "best_state"]))
    value = draw(json_values)
    if kind == "best_counts":
        value = draw(st.dictionaries(st.sampled_from(["fc1", "fc2", "fc3", "nope", ""]), json_values, max_size=3))
        key = "best_counts"
    if kind == "best_state":
        op = draw(st.sampled_from(["drop", "rename", "repoint", "null", "add"]))

        def edit_best(state):
            best = state["best_state"]
            keys = sorted(best)
            k = keys[len(keys) // 2]
            if op == "drop":
                best.pop(k)
            elif op == "rename":
                best["fc1.dendrites.units.1.weight"] = best.pop(k)
            elif op == "repoint":
                best[k] = best[keys[0]]
            elif op == "null":
                state["best_state"] = None
            else:
                best["fc9.weight"] = best[keys[0]]

        return edit_best
    if kind == "delete":
        return lambda s: s.pop(key, None)
    return lambda s: s.__setitem__(key, value)


def _edit_controller(folder, edit):
    doc = json.loads((folder / "controller.json").read_text())
    edit(doc["state"])
    (folder / "controller.json").write_text(json.dumps(doc))
    resign(folder)


@st.composite
def header_edits(draw):
    """A function rewriting one safetensors file's header (then the folder is re-signed)."""
    name = draw(st.sampled_from(["model.safetensors", "controller.safetensors", "training.safetensors"]))
    op = draw(
        st.sampled_from(
            [
                "dtype",
                "shape",
                "offsets",
                "drop",
                "add",
                "rename",
                "metadata",
                "length",
                "truncate",
                "append",
                "huge_shape",
            ]
        )
    )
    pick = draw(st.integers(0, 10**6))
    value = draw(json_values)
    dtype = draw(st.sampled_from(["F16", "BF16", "F64", "I64", "BOOL", "U8", "X9", 7]))

    def edit(folder):
        path = folder / name
        header, body = read_safetensors_header(path)
        keys = sorted(k for k in header if k != "__metadata__")
        k = keys[pick % len(keys)]
        e = header[k]
        if op == "dtype":
            e["dtype"] = dtype
        elif op == "shape":
            e["shape"] = value if isinstance(value, list) else [value]
        elif op == "huge_shape":
            e["shape"] = [2**40, 2**40]
        elif op == "offsets":
            e["data_offsets"] = [e["data_offsets"][0] + 4, e["data_offsets"][1] + 4]
        elif op == "drop":
            header.pop(k)
        elif op == "add":
            header["fc1.dendrites.units.7.weight"] = dict(e)
        elif op == "rename":
            header[k + "x"] = header.pop(k)
        elif op == "metadata":
            header["__metadata__"] = {"format": "torch-dendrites", "save_id": "0" * 32} if pick % 2 else value
        if op in ("length", "truncate", "append"):
            data = path.read_bytes()
            if op == "length":
                data = (2**63 + pick).to_bytes(8, "little") + data[8:]
            elif op == "truncate":
                data = data[: 8 + pick % max(1, len(data) - 8)]
            else:
                data += b"\0" * (1 + pick % 64)
            path.write_bytes(data)
        else:
            write_safetensors_raw(path, header, body)
        resign(folder)

    return edit


# ---------------------------------------------------------------------- the generated tests
def _recipe_case(golden, edit):
    _check_hostile(golden, lambda f: edit_recipe(f, edit), kind="recipe edit")


def _controller_case(golden, edit):
    _check_hostile(golden, lambda f: _edit_controller(f, edit), kind="controller edit")


def _header_case(golden, edit):
    _check_hostile(golden, edit, kind="safetensors header edit")


def _flip_case(golden, name, pos, xor):
    def flip(folder):
        path = folder / name
        data = bytearray(path.read_bytes())
        data[pos % len(data)] ^= xor
        path.write_bytes(bytes(data))

    _check_hostile(golden, flip, kind="byte flip")


_FILES = st.sampled_from(
    [
        "recipe.json",
        "model.safetensors",
        "controller.json",
        "controller.safetensors",
        "training.json",
        "training.safetensors",
    ]
)


@FAST
@given(edit=recipe_edits())
def test_recipe_edits(any_golden, edit):
    _recipe_case(any_golden, edit)


@FAST
@given(edit=controller_edits())
def test_controller_edits(any_golden, edit):
    _controller_case(any_golden, edit)


@FAST
@given(edit=header_edits())
def test_safetensors_header_edits(any_golden, edit):
    _header_case(any_golden, edit)


@FAST
@given(name=_FILES, pos=st.integers(0, 10**7), xor=st.integers(1, 255))
def test_byte_flips(any_golden, name, pos, xor):
    _flip_case(any_golden, name, pos, xor)


@pytest.mark.slow
@SLOW
@given(edit=recipe_edits())
def test_recipe_edits_sweep(any_golden, edit):
    _recipe_case(any_golden, edit)


@pytest.mark.slow
@SLOW
@given(edit=controller_edits())
def test_controller_edits_sweep(any_golden, edit):
    _controller_case(any_golden, edit)


@pytest.mark.slow
@SLOW
@given(edit=header_edits())
def test_safetensors_header_edits_sweep(any_golden, edit):
    _header_case(any_golden, edit)


@pytest.mark.slow
@SLOW
@given(name=_FILES, pos=st.integers(0, 10**7), xor=st.integers(1, 255))
def test_byte_flips_sweep(any_golden, name, pos, xor):
    _flip_case(any_golden, name, pos, xor)


def _flip_sweep(golden, stride):
    """Flip one bit of every ``stride``-th byte of three files and load the model with its controller
    (one child for all): none loads wrongly."""
    work = Path(tempfile.mkdtemp(dir=golden["root"]))
    folder = work / "ck"
    shutil.copytree(golden["folder"], folder)

    def sweep():
        counts = {"refused": 0, "correct": 0}
        for name in ("recipe.json", "model.safetensors", "controller.json"):
            path = folder / name
            clean = path.read_bytes()
            for pos in range(0, len(clean), stride):
                data = bytearray(clean)
                data[pos] ^= 0x20
                path.write_bytes(bytes(data))
                base = _base_model(golden["adapter"])
                ctl = td.GrowthController(td.add_dendrites(MLP()), CFG)
                td.remove_dendrites(ctl.model)
                ctl.model = base
                try:
                    loaded = td.load(folder, base, ctl)
                except td.CheckpointError:
                    counts["refused"] += 1
                    continue
                with torch.no_grad():
                    assert torch.equal(loaded(X), golden["out"]) and ctl.epoch == golden["epoch"], (name, pos)
                counts["correct"] += 1
            path.write_bytes(clean)
        return counts

    res = in_child(sweep, extra_address_space=LIMIT, timeout=900)
    shutil.rmtree(work, ignore_errors=True)
    assert res.get("ok"), res
    kind = "adapter-sized, " if golden["adapter"] else ""
    for outcome, n in res["result"].items():
        TALLY[(f"flip sweep ({kind}every {stride}. byte)", "fresh+controller", outcome)] += n
    return res["result"]


def test_strided_byte_flips_are_all_caught(any_golden):
    counts = _flip_sweep(any_golden, 151)
    assert counts["refused"] > 80 and counts["correct"] == 0


@pytest.mark.slow
def test_every_single_byte_flip_is_caught(any_golden):
    counts = _flip_sweep(any_golden, 1)
    assert counts["refused"] > 5000


# ---------------------------------------------------------------------- named cases (issue 13)
def _fresh_folder(golden, name="ck"):
    work = Path(tempfile.mkdtemp(dir=golden["root"]))
    folder = work / name
    shutil.copytree(golden["folder"], folder)
    return folder


def test_a_recipe_asking_for_51_gb_is_refused_before_allocating(golden):
    """Item 1: a small edit asking for huge dendrites must raise, not exhaust memory (the child has 512 MiB)."""
    edits = {
        "dendrites": lambda r: [e.update(num_dendrites=10_000) for e in r["layers"]],
        "lowrank_rank": lambda r: (
            r["dendrite_config"].update(dendrite_type="lowrank", dendrite_options={"rank": 10**9}),
            [e.update(dendrite_type="lowrank") for e in r["layers"]],
        ),
        "gated_context": lambda r: (
            r["dendrite_config"].update(
                dendrite_type="gated", dendrite_options={"context_dim": 10**7, "segments": 10**4}
            ),
            [e.update(dendrite_type="gated") for e in r["layers"]],
        ),
        "candidates": lambda r: [e.update(candidates=10_000) for e in r["layers"]],
    }
    for name, edit in edits.items():
        res = _check_hostile(golden, lambda f, edit=edit: edit_recipe(f, edit), refuse=("resume", "fresh"))
        assert res == {"resume": "refused", "fresh": "refused"}, name


def test_best_counts_beyond_the_saved_structure_are_refused(golden):
    for counts in ({"fc1": 10_000}, {"fc1": 3}, {"fc1": -1}, {"nope": 1}, {"fc1": "2"}, {"fc1": 1.0}, []):
        _check_hostile(
            golden,
            lambda f, c=counts: _edit_controller(f, lambda s: s.update(best_counts=c)),
            refuse=("resume",),
            isolate=False,
        )


def test_best_state_must_fit_the_model_at_best_counts(golden, tmp_path):
    """Item 9 (persistence side): best weights of another shape, or for dendrites the best model had not."""

    def wrong_shape(folder):
        header, body = read_safetensors_header(folder / "controller.safetensors")
        doc = json.loads((folder / "controller.json").read_text())
        ref = doc["state"]["best_state"]["fc1.base.weight"]["__tensor__"]
        e = header[ref]
        e["shape"] = [e["shape"][1], e["shape"][0]]  # same bytes, transposed shape
        write_safetensors_raw(folder / "controller.safetensors", header, body)
        resign(folder)

    def more_dendrites(state):  # the model at best_counts (1 dendrite) has no unit 1
        state["best_state"]["fc1.dendrites.units.1.out_gain"] = state["best_state"]["fc1.dendrites.units.0.out_gain"]

    _check_hostile(golden, wrong_shape, refuse=("resume",), isolate=False)
    _check_hostile(golden, lambda f: _edit_controller(f, more_dendrites), refuse=("resume",), isolate=False)
    # an unreferenced tensor in the file is refused (nothing unaccounted for loads) ...
    _check_hostile(
        golden, lambda f: _edit_controller(f, lambda s: s["best_state"].pop("fc1.base.bias")), refuse=("resume",)
    )
    # ... but a snapshot that leaves out frozen non-dendrite parameters (a subset) is fine
    model, ctl, *_ = _victim_run()
    ctl.best_state.pop("fc1.base.bias")
    folder = td.save(tmp_path / "subset", model, ctl)
    c2 = td.GrowthController(td.add_dendrites(MLP()), CFG)
    td.remove_dendrites(c2.model)
    td.load(folder, MLP(), c2)
    assert sorted(c2.best_state) == sorted(ctl.best_state)


def test_a_base_table_claiming_dendrites_or_stored_tensors_is_refused(adapter_golden):
    """An adapter-sized recipe may list as left out only base tensors the model holds: a dendrite tensor taken out
    of the weights file and listed as "base" with the digest of the resumed model's own value must not load."""
    import hashlib

    from safetensors.torch import load_file, save_file

    key = "fc1.dendrites.units.0.out_gain"
    mine = _targets(adapter=True)[0].state_dict()[key]

    def claim(folder):
        path = folder / "model.safetensors"
        tensors = load_file(str(path))
        tensors.pop(key)
        save_file(tensors, str(path), metadata={"format": "pt", "save_id": read_recipe(folder)["save_id"]})
        digest = hashlib.sha256(mine.contiguous().view(torch.uint8).numpy()).hexdigest()

        def edit(r):
            r["base"]["tensors"][key] = {"dtype": "F32", "shape": [16], "sha256": digest}
            resign_base(r)

        edit_recipe(folder, edit)

    res = _check_hostile(adapter_golden, claim, refuse=("resume", "fresh"), isolate=False)
    assert res == {"resume": "refused", "fresh": "refused"}

    def stored(r):  # a stored tensor listed as left out too
        r["base"]["tensors"]["fc2.base.bias"] = {"dtype": "F32", "shape": [16], "sha256": "0" * 64}
        resign_base(r)

    _check_hostile(adapter_golden, lambda f: edit_recipe(f, stored), refuse=("resume", "fresh"), isolate=False)


_INVALID_CONTROLLER = [
    ("policy.epoch", -1),
    ("policy.epoch", "3"),
    ("policy.phase", "dreaming"),
    ("policy.best", "high"),
    ("policy.best", {"__float__": "nan"}),
    ("policy.phase_since_best", -5),
    ("policy.tries", 1.5),
    ("policy.done", "no"),
    ("policy.dendrites", 99),
    ("history", [{"epoch": "x"}]),
    ("best_counts", {"fc1": 5}),
    ("candidate_phase.norm_momenta", {"no.such.module": 0.1}),
    ("candidate_phase.trainable_before", ["no.such.parameter"]),
    ("shiny_new_field", 1),
    ("architectures", {"x": 1}),
]


def _set_path(state, dotted, value):
    *parents, last = dotted.split(".")
    for key in parents:
        state = state[key]
    state[last] = value


@pytest.mark.parametrize("field,value", _INVALID_CONTROLLER)
def test_invalid_controller_fields_are_refused(golden, field, value):
    """Item 9: every malformed controller field (the layout of ``GrowthController.state_dict()``) is refused by
    the controller's own validation before anything changes; it never escapes as a raw error or half-applies."""
    _check_hostile(
        golden, lambda f: _edit_controller(f, lambda s: _set_path(s, field, value)), refuse=("resume",), isolate=False
    )


def test_torn_folder_mixing_two_saves_is_refused(golden, tmp_path):
    """Item 2: files of two saves of one folder never pair up, even if their hashes are made to agree."""
    model, ctl, opt, sched, gen = _victim_run()
    a = td.save(tmp_path / "a", model, ctl)
    _perturb(model, 99)  # a later epoch
    b = td.save(tmp_path / "b", model, ctl)
    for name in ("model.safetensors", "controller.json", "controller.safetensors"):
        mixed = tmp_path / f"mixed-{name}"
        shutil.copytree(a, mixed)
        shutil.copy(b / name, mixed / name)
        for sign in (False, True):
            if sign:
                resign(mixed)
            fresh, c2 = MLP(), td.GrowthController(td.add_dendrites(MLP()), CFG)
            td.remove_dendrites(c2.model)
            with pytest.raises(td.CheckpointError, match="another save|hash"):
                td.load(mixed, fresh, c2)
            assert not td.dendritic_layers(fresh)


def test_weights_with_flipped_bits_are_refused_not_loaded(golden):
    """Item 14: a flipped bit in tensor data gives values like 1e24 if loaded; the hash refuses it."""
    folder = _fresh_folder(golden)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 0x40  # an exponent bit of the last float
    (folder / "model.safetensors").write_bytes(bytes(data))
    m = MLP()
    with pytest.raises(td.CheckpointError, match="hash"):
        td.load(folder, m)
    assert not td.dendritic_layers(m)


def test_symlinks_inside_a_checkpoint_are_refused(golden, tmp_path):
    folder = _fresh_folder(golden)
    secret = tmp_path / "elsewhere.safetensors"
    shutil.copy(folder / "model.safetensors", secret)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(secret)
    with pytest.raises(td.CheckpointError, match="symbolic link"):
        td.load(folder, MLP())
    # a link to the whole folder is fine: users point `latest` at a run's checkpoint
    link = tmp_path / "link"
    link.symlink_to(golden["folder"])
    td.load(link, MLP())


def test_format_version_zero_or_negative_is_refused(golden):
    for v in (0, -1, True, 1.0, "2", None):
        folder = _fresh_folder(golden)
        edit_recipe(folder, lambda r, v=v: r.update(format_version=v))
        with pytest.raises(td.CheckpointError, match="format_version"):
            td.load(folder, MLP())


def test_sparse_index_buffers_are_range_checked(tmp_path):
    torch.manual_seed(0)
    cfg = td.DendriteConfig(dendrite_type="sparse", dendrite_options={"branch_inputs": 3})
    model = td.add_dendrites(MLP(), cfg)
    td.grow(model)
    ctl = td.GrowthController(model, td.GrowthConfig(mode="never"))
    ctl.step(0.5)
    for where, value in (("model", 99), ("model", -1), ("controller", 16), ("model", "dup")):
        folder = td.save(tmp_path / f"s-{where}-{value}", model, ctl)
        name = "model.safetensors" if where == "model" else "controller.safetensors"
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / name))
        key = next(k for k in tensors if k.endswith("fc2.dendrites.units.0.index"))
        t = tensors[key].clone()
        if value == "dup":
            t[0, 1] = t[0, 0]  # a repeated input: the scatter would silently drop a weight
        else:
            t[0, 0] = value
        tensors[key] = t
        save_file(
            tensors,
            str(folder / name),
            metadata={"format": "torch-dendrites", "save_id": read_recipe(folder)["save_id"]},
        )
        resign(folder)
        fresh, c2 = MLP(), td.GrowthController(td.add_dendrites(MLP(), cfg), td.GrowthConfig(mode="never"))
        td.remove_dendrites(c2.model)
        with pytest.raises(td.CheckpointError, match="connectivity buffer"):
            td.load(folder, fresh, c2 if where == "controller" else None)
        assert not td.dendritic_layers(fresh)


def test_neuron_axis_edits_are_refused(golden):
    """Item 7: on square layers a wrong axis changes outputs silently; the recipe must agree with itself."""
    for edit in (
        lambda r: r["layers"][1].update(neuron_axis=-2),
        lambda r: r["layers"][1].update(neuron_axis=0),
        lambda r: r["dendrite_config"].update(neuron_axis=-2),
    ):
        res = _check_hostile(golden, lambda f, e=edit: edit_recipe(f, e), refuse=("resume", "fresh"), isolate=False)
        assert res == {"resume": "refused", "fresh": "refused"}


def test_unknown_scheduler_and_optimizer_keys_are_refused(golden):
    """Item 12 (first half): training.json may set only keys the scheduler's own state_dict has."""

    def edit(fn):
        def mutate(folder):
            doc = json.loads((folder / "training.json").read_text())
            fn(doc)
            (folder / "training.json").write_text(json.dumps(doc))
            resign(folder)

        return mutate

    cases = [
        lambda d: d["scheduler"]["state"].update(optimizer="boom"),
        lambda d: d["scheduler"]["state"].update(step_size="two"),
        lambda d: d["scheduler"]["state"].update(base_lrs=[0.1, 0.2, 0.3]),
        lambda d: d["scheduler"]["state"].update(get_lr=None),
        lambda d: d["optimizer"]["param_groups"][0].update(lr="fast"),
        lambda d: d["optimizer"]["param_groups"][0].update(zap=1),
        lambda d: d["optimizer"]["param_groups"][0].update(params=[0, 1]),
        lambda d: d["optimizer"]["state"].update({"999": {}}),
        lambda d: d["optimizer"]["state"].update({"x": {}}),
        lambda d: d["optimizer"].update({"class": "SGD"}),
        lambda d: d["rng"].update(python=[3, [1, 2], None]),
        lambda d: d["rng"].update(numpy=["MT19937", [-1] * 624, 0, 0, 0.0]),
        lambda d: d["generators"].update(g=d["generators"]["g"]) or d.pop("generators"),
    ]
    for fn in cases:
        res = _check_hostile(golden, edit(fn), refuse=("resume",), isolate=False)
        assert res["resume"] == "refused"


def test_bad_generator_state_data_is_refused(golden):
    def corrupt(folder):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "training.safetensors"))
        key = next(k for k in tensors if k.startswith("generator"))
        tensors[key] = tensors[key][:100].clone()  # a truncated generator state
        save_file(
            tensors,
            str(folder / "training.safetensors"),
            metadata={"format": "torch-dendrites", "save_id": read_recipe(folder)["save_id"]},
        )
        resign(folder)

    _check_hostile(golden, corrupt, refuse=("resume",))


# ---------------------------------------------------------------------- raw escapes (item 13)
def _deep_json(depth):
    return "[" * depth + "]" * depth


def _escape_cases(golden, tmp):
    """(name, callable) pairs: each must raise one of the library's errors and leave nothing behind."""
    model = td.add_dendrites(MLP())
    folder = golden["folder"]

    def edited(text_fn):
        f = tmp / f"e{len(list(tmp.iterdir()))}"
        shutil.copytree(folder, f)
        (f / "recipe.json").write_text(text_fn((f / "recipe.json").read_text()))
        return f

    def signed(edit):
        f = tmp / f"s{len(list(tmp.iterdir()))}"
        shutil.copytree(folder, f)
        edit_recipe(f, edit)
        return f

    meta = torch.nn.Sequential(torch.nn.Linear(2, 2, device="meta"))
    return [
        ("deep JSON nesting", lambda: td.load(edited(lambda t: _deep_json(100_000)), MLP())),
        (
            "deep JSON in a field",
            lambda: td.load(signed(lambda r: r.update(skipped=json.loads(_deep_json(500)))), MLP()),
        ),
        (
            "a 5000-digit integer",
            lambda: td.load(
                edited(lambda t: re.sub('"format_version": [0-9]+', '"format_version": ' + "9" * 5000, t)), MLP()
            ),
        ),
        (
            "an integer of 10**30 dendrites",
            lambda: td.load(signed(lambda r: r["layers"][0].update(num_dendrites=10**30)), MLP()),
        ),
        (
            "NaN literal",
            lambda: td.load(edited(lambda t: re.sub(r'"init_scale": [0-9.e-]+', '"init_scale": NaN', t)), MLP()),
        ),
        (
            "1e999",
            lambda: td.load(edited(lambda t: re.sub(r'"init_scale": [0-9.e-]+', '"init_scale": 1e999', t)), MLP()),
        ),
        (
            "duplicate keys",
            lambda: td.load(
                edited(
                    lambda t: t.replace('"format": "torch-dendrites"', '"format": "torch-dendrites", "format": "x"')
                ),
                MLP(),
            ),
        ),
        ('save("")', lambda: td.save("", model)),
        ('save(".")', lambda: td.save(".", model)),
        ('save("..")', lambda: td.save(tmp / "..", model)),
        ("save to a root", lambda: td.save("/", model)),
        ("NUL in the path", lambda: td.save(str(tmp / "a\x00b"), model)),
        ("a 256-byte name", lambda: td.save(tmp / ("n" * 256), model)),
        ("a name of 128 two-byte letters", lambda: td.save(tmp / ("é" * 128), model)),
        ("save a non-model", lambda: td.save(tmp / "x", "model")),
        ("load into a non-model", lambda: td.load(folder, {"fc1": 1})),
        ("a non-path", lambda: td.save(3.5, model)),
        ("save a meta-device model", lambda: td.save(tmp / "meta", meta)),
        ("load into a meta-device model", lambda: td.load(folder, MLP().to("meta"))),
        ("a non-generator", lambda: td.save(tmp / "g", model, generators={"g": 3})),
        ("generators not a dict", lambda: td.save(tmp / "g", model, generators=[torch.Generator()])),
        (
            "load a generator absent from the file",
            lambda: td.persistence.load_training_state(folder, generators={"zz": torch.Generator()}),
        ),
        ("a non-optimizer", lambda: td.save(tmp / "o", model, optimizer="adam")),
        ("rng not a bool", lambda: td.save(tmp / "r", model, rng="yes")),
        ("extra not a dict", lambda: td.save(tmp / "x2", model, extra=[1])),
        ("extra not JSON", lambda: td.save(tmp / "x3", model, extra={"f": object()})),
        ("a controller that is not one", lambda: td.save(tmp / "c", model, controller=object())),
        ("load from a file", lambda: td.load(folder / "recipe.json", MLP())),
        ("load from nowhere", lambda: td.load(tmp / "nothing", MLP())),
        (
            "training state from a folder without any",
            lambda: td.persistence.load_training_state(tmp / "nothing", rng=True),
        ),
        (
            "an optimizer built before load",
            lambda: td.load(folder, MLP(), optimizer=torch.optim.SGD(MLP().parameters(), lr=1)),
        ),
    ]


def test_inputs_that_used_to_escape_raise_library_errors(golden, tmp_path):
    """Item 13: every case raises a DendriteError subclass, and no helper folders stay behind."""
    work = tmp_path / "w"
    work.mkdir()
    outcomes = {}
    for name, call in _escape_cases(golden, work):
        before = sorted(p.name for p in work.iterdir())
        try:
            call()
        except td.DendriteError as exc:
            outcomes[name] = type(exc).__name__
        else:
            outcomes[name] = "no error"
        leftovers = sorted(p.name for p in work.iterdir() if p.name.startswith(".") and p.name not in before)
        assert not leftovers, (name, leftovers)
    assert all(v != "no error" for v in outcomes.values()), outcomes


def test_disk_full_while_saving_raises_and_leaves_no_leftovers(golden, tmp_path):
    model, ctl, opt, *_ = _victim_run()
    td.save(tmp_path / "ck", model, ctl)
    before = snapshot_files(tmp_path)
    res = in_child(lambda: td.save(tmp_path / "ck", model, ctl, optimizer=opt) and None, file_size=4096)
    assert not res["ok"] and res["library"] and res["error"] == "CheckpointError", res
    assert "full" in res["message"]
    assert snapshot_files(tmp_path) == before  # the previous copy, untouched; no helpers


# ---------------------------------------------------------------------- odd paths (items 3, 14)
_NAME_CHARS = st.one_of(
    st.sampled_from(list("[]*?{}!^$ -_.,;'&()=+~#%@") + ["é", "ß", "中", "😀", "\u200b"]),
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\x00"),
)
names = st.text(_NAME_CHARS, min_size=1, max_size=250).filter(lambda s: s not in (".", ".."))


def _round_trip_name(name, golden):
    parent = Path(tempfile.mkdtemp(dir=golden["root"]))
    model = td.add_dendrites(MLP())
    td.grow(model)
    if len(name.encode()) > 255:
        with pytest.raises(td.CheckpointError, match="bytes long"):
            td.save(parent / name, model)
        assert list(parent.iterdir()) == []
        return
    sibling = parent / (name[:-1] + ("y" if name[-1] == "x" else "x"))  # a name the name's globs may match
    sibling.mkdir()
    (sibling / "keep").write_text("mine")
    for _ in range(2):  # the second save replaces the first
        td.save(parent / name, model)
    loaded = td.load(parent / name, MLP())
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    assert sorted(p.name for p in parent.iterdir()) == sorted({name, sibling.name})
    assert (sibling / "keep").read_text() == "mine"
    shutil.rmtree(parent)


@FAST
@given(name=names)
def test_odd_folder_names_round_trip(golden, name):
    _round_trip_name(name, golden)


@pytest.mark.slow
@SLOW
@given(name=names)
def test_odd_folder_names_round_trip_sweep(golden, name):
    _round_trip_name(name, golden)


@pytest.mark.parametrize("name", ["exp[1]", "lr[0.1]", "c*", "a?b", "with space", "ünï", "x" * 250])
def test_glob_names_recover_after_a_crash_between_the_renames(tmp_path, name):
    """Item 3: killed between the swap's two renames, the previous copy is found; the next save cleans."""
    from torch_dendrites.persistence import io

    class DieAtSecondRename(io.FileSystem):
        renames = 0

        def before(self, op, what):
            if op == "rename":
                DieAtSecondRename.renames += 1
                if DieAtSecondRename.renames == 2:
                    import os
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)

    model = td.add_dendrites(MLP())
    td.save(tmp_path / name, model)
    other = tmp_path / (name[:-1] + "z")  # another folder whose helpers a glob of `name` would match
    td.save(other, model)
    td.grow(model)

    def crash():
        with io.use(DieAtSecondRename()):
            td.save(tmp_path / name, model)

    assert in_child(crash) == {"died": 9}
    assert not (tmp_path / name).exists()
    assert td.load(tmp_path / name, MLP()).fc1.num_dendrites == 0  # the previous copy
    td.save(tmp_path / name, model)
    assert td.load(tmp_path / name, MLP()).fc1.num_dendrites == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, other.name])
    td.load(other, MLP())


def test_a_live_writers_temporary_folder_is_never_deleted(tmp_path):
    """Item 3/10: a save to `c*` (or any name) must not remove another folder's, or a live process's, helpers."""
    import os

    from torch_dendrites.persistence.io import _helper_name

    model = td.add_dendrites(MLP())
    live = tmp_path / _helper_name("c1", "tmp")  # a helper of folder c1 by this (live) process
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"in progress")
    dead_pid = next(p for p in range(4_000_000, 4_100_000) if not _alive(p))
    mine = _helper_name("c*", "tmp").replace(f"-{os.getpid()}-", f"-{dead_pid}-")
    (tmp_path / mine).mkdir()  # left by a writer of c* that died
    (tmp_path / mine / "model.safetensors").write_bytes(b"stale")
    td.save(tmp_path / "c*", model)
    assert (live / "model.safetensors").read_bytes() == b"in progress"
    assert not (tmp_path / mine).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c*", live.name])


def _alive(pid):
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def test_save_refuses_to_overwrite_what_it_did_not_write(tmp_path):
    """Item 4: a folder of other files, a file, a link are never replaced or hidden."""
    model = td.add_dendrites(MLP())
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "photos")
    mixed = td.save(tmp_path / "mixed", model)
    (mixed / "README").write_text("my notes about this run")
    before = snapshot_files(tmp_path)
    for target in ("photos", "notes.txt", "link", "mixed"):
        with pytest.raises(td.CheckpointError, match="not a checkpoint|not a folder|symbolic link"):
            td.save(tmp_path / target, model)
    assert snapshot_files(tmp_path) == before
    (tmp_path / "empty").mkdir()
    td.save(tmp_path / "empty", model)  # an empty folder holds nothing to lose
    td.load(tmp_path / "empty", MLP())


# ---------------------------------------------------------------------- loads that must not change anything
def test_a_failed_load_leaves_everything_as_it_was(golden):
    """Item 5: the optimizer state fits nothing here, so the load fails after every other part was checked:
    the model, controller, optimizer, scheduler, RNG and generators are exactly as before."""
    model, ctl, opt, sched, gen = _targets()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the checkpoint holds an Adam
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7)
    before = _state(model, ctl, opt, sched, gen)
    with pytest.raises(td.CheckpointError, match="Adam"):
        td.load(golden["folder"], model, ctl, optimizer=opt, scheduler=sched, rng=True, generators={"g": gen})
    assert _same(_state(model, ctl, opt, sched, gen), before)


def test_a_failure_while_applying_is_rolled_back(golden, monkeypatch):
    """Even a failure in the last step (the scheduler's own load_state_dict) undoes every earlier one."""
    model, ctl, opt, sched, gen = _targets()
    before = _state(model, ctl, opt, sched, gen)

    def boom(state):
        sched.__dict__["last_epoch"] = -99  # half-applied, then failing
        raise RuntimeError("scheduler exploded")

    monkeypatch.setattr(sched, "load_state_dict", boom)
    with pytest.raises(td.CheckpointError, match="exploded"):
        td.load(golden["folder"], model, ctl, optimizer=opt, scheduler=sched, rng=True, generators={"g": gen})
    monkeypatch.undo()
    assert _same(_state(model, ctl, opt, sched, gen), before)
    fresh = MLP()
    c2 = td.GrowthController(td.add_dendrites(MLP()), CFG)
    monkeypatch.setattr(c2, "load_state_dict", lambda s: (_ for _ in ()).throw(KeyError("bad")))
    with pytest.raises(td.CheckpointError):
        td.load(golden["folder"], fresh, c2)
    assert not td.dendritic_layers(fresh)


def test_a_resumed_model_with_other_settings_is_refused(golden, tmp_path):
    """Item 6: a sigmoid checkpoint must not silently load into a tanh-wrapped (or other-option) model."""
    for cfg in (
        td.DendriteConfig(activation="tanh"),
        td.DendriteConfig(neuron_axis=0),
        td.DendriteConfig(dendrite_type="lowrank"),
    ):
        model = td.add_dendrites(MLP(), cfg)
        td.grow(model)
        td.grow(model)
        before = _state(model)
        with pytest.raises(td.CheckpointError, match="activation|neuron_axis|dendrite_type"):
            td.load(golden["folder"], model)
        assert _same(_state(model), before)
    low = td.DendriteConfig(dendrite_type="lowrank", dendrite_options={"rank": 2})
    saved = td.add_dendrites(MLP(), low)
    folder = td.save(tmp_path / "low", saved)
    other = td.add_dendrites(MLP(), td.DendriteConfig(dendrite_type="lowrank", dendrite_options={"rank": 3}))
    with pytest.raises(td.CheckpointError, match="dendrite_options"):
        td.load(folder, other)
    same = td.add_dendrites(MLP(), td.DendriteConfig(dendrite_type="lowrank", dendrite_options={"rank": 2}))
    td.load(folder, same)  # equal settings (spelled the same or by default) load


def test_a_model_whose_only_child_is_named_module_round_trips(tmp_path):
    """Item 8: EMA and task wrappers hold the model as `module`; the DDP prefix must not be stripped."""

    class EMA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = MLP()

        def forward(self, x):
            return self.module(x)

    model = td.add_dendrites(EMA())
    td.grow(model)
    _perturb(model, 0)
    td.save(tmp_path / "ema", model)
    loaded = td.load(tmp_path / "ema", EMA())
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    # and DDP around it: the outer `module.` goes, the EMA's own stays
    from safetensors.torch import save_file

    folder = tmp_path / "ema"
    state = {f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(
        state,
        str(folder / "model.safetensors"),
        metadata={"format": "torch-dendrites", "save_id": read_recipe(folder)["save_id"]},
    )
    resign(folder)
    with torch.no_grad():
        assert torch.equal(td.load(folder, EMA())(X), model(X))


def test_a_loaded_model_pickles(golden):
    import pickle

    loaded = td.load(golden["folder"], MLP())
    again = pickle.loads(pickle.dumps(loaded))  # our own object, in memory: never a file
    with torch.no_grad():
        assert torch.equal(again(X), golden["out"])
