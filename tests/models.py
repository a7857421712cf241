"""The zoo of tiny models that drives the table-driven invariant tests."""

from __future__ import annotations

import torch
from torch import nn

import torch_dendrites as td


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNNBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, dilation=1, groups=2, padding_mode="circular", padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(6, 6, 3, dilation=2, groups=3)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean(-1))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(1, 4, 3, padding=1)
        self.c2 = nn.Conv3d(4, 4, (1, 3, 3), stride=(1, 2, 2), bias=False)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x))).mean((2, 3, 4))


class TokenMLP(nn.Module):
    """An MLP applied per token of a [batch, tokens, features] input."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 12), nn.Linear(12, 8)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


class Shared(nn.Module):
    """One Linear reachable at two paths, used twice per forward."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(5, 5)
        self.again = self.block
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.relu(self.again(torch.relu(self.block(x)))))


class Tied(nn.Module):
    """An embedding whose weight is tied to the output projection."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.proj = nn.Linear(6, 11, bias=False)
        self.proj.weight = self.emb.weight

    def forward(self, idx):
        return self.proj(torch.tanh(self.mid(self.emb(idx))))


class Bilinearish(nn.Module):
    """A user layer the library does not know: out = (x @ W^T) * gate."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.gate = nn.Parameter(torch.ones(n_out))
        self.out_features = n_out

    def forward(self, x):
        return (x @ self.weight.t()) * self.gate


td.register_layer_type(Bilinearish, neuron_axis=-1)


class CustomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Bilinearish(4, 7)
        self.b = Bilinearish(7, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class ConvBN(nn.Sequential):
    """A convolution and its batch norm treated as one dendritic unit (README: "Conv + BatchNorm as one unit")."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__(conv, bn)


class ConvBNSpec(td.LayerSpec):
    """Dendrites of a ConvBN unit: convolutions of the unit's conv shape (groups=1), added after the batch norm.
    The default vmap spec cannot run the unit (batch norm updates its running statistics in place)."""

    def __init__(self):
        super().__init__(neuron_axis=-3, num_neurons=lambda m: m[0].out_channels)

    def param_names(self, module):
        return ["weight", "bias"]

    def init_params(self, module, scale, generator):
        conv = module[0]
        bound = scale / conv.weight[0].numel() ** 0.5

        def uniform(shape):
            return ((torch.rand(shape, generator=generator) * 2 - 1) * bound).to(conv.weight)

        return {"weight": uniform(conv.weight.shape), "bias": uniform((conv.out_channels,))}

    def batched_forward(self, module, params, x):
        conv = module[0]
        w, b = torch.cat(params["weight"]), torch.cat(params["bias"])
        return torch.nn.functional.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation)


td.register_layer_type(ConvBN, ConvBNSpec())


class ConvBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = ConvBN(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
        self.block2 = ConvBN(nn.Conv2d(6, 4, 3, stride=2), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.block2(torch.relu(self.block1(x)))).flatten(1))


class EmbeddingNet(nn.Module):
    """Token embeddings (with a padding row) feeding a Linear, as in a bag-of-words classifier."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 6, padding_idx=0)
        self.fc = nn.Linear(6, 3)

    def forward(self, idx):
        return self.fc(torch.tanh(self.emb(idx)).mean(1))


class Backbone(nn.Module):
    """A "pretrained" feature extractor: a tied embedding-like pair, BatchNorm, and a head that trains."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 12)
        self.bn = nn.BatchNorm1d(12)
        self.mid = nn.Linear(12, 12)
        self.mid_t = nn.Linear(12, 12, bias=False)
        self.mid_t.weight = self.mid.weight  # tied: one frozen parameter under two names
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.inp(x)))
        return self.head(torch.tanh(self.mid(h)) + self.mid_t(h))


def pretrained_backbone():
    """Stands for ``from_pretrained``: the same weights at every call; the backbone frozen, the head trainable."""
    torch.manual_seed(0)
    model = Backbone()
    for m in (model.inp, model.bn, model.mid):
        m.requires_grad_(False)
    return model


def trained_backbone():
    model = td.add_dendrites(pretrained_backbone(), td.DendriteConfig(target_names=["head", "mid"]))
    td.grow(model)
    td.grow(model)
    torch.manual_seed(1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(3):  # BatchNorm statistics move although its weights are frozen
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        for layer in td.dendritic_layers(model).values():
            for u in layer.dendrites.units:
                u.out_gain.normal_()
    return model.eval()


def transformer():
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True), nn.Linear(8, 3))


# name -> (factory, input factory, config)
CASES = {
    "mlp": (MLP, lambda: torch.randn(4, 6), None),
    "cnn_bn": (CNNBN, lambda: torch.randn(3, 3, 8, 8), None),
    "conv1d": (Conv1dNet, lambda: torch.randn(3, 2, 20), None),
    "conv3d": (Conv3dNet, lambda: torch.randn(2, 1, 4, 6, 6), None),
    "tokens": (TokenMLP, lambda: torch.randn(2, 5, 8), None),
    "transformer": (transformer, lambda: torch.randn(2, 5, 8), None),
    "shared": (Shared, lambda: torch.randn(4, 5), None),
    "tied": (Tied, lambda: torch.randint(0, 11, (3, 4)), None),
    "custom": (CustomNet, lambda: torch.randn(4, 4), td.DendriteConfig(target_types=[Bilinearish])),
    "conv_bn_unit": (ConvBNNet, lambda: torch.randn(3, 3, 8, 8), td.DendriteConfig(target_types=[ConvBN, nn.Linear])),
    "embedding": (
        EmbeddingNet,
        lambda: torch.randint(0, 13, (4, 5)),
        td.DendriteConfig(target_types=[nn.Embedding, nn.Linear]),
    ),
}
# Cases whose layers only the cascade and gated types support (the others build weights from the layer algebra).
CUSTOM_CASES = ("custom", "conv_bn_unit", "embedding")
