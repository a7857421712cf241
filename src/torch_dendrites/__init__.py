"""torch-dendrites: add artificial dendrites to any PyTorch model, grow them when training plateaus,
and measure what they buy.

Example:
    >>> import torch, torch_dendrites as td
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = torch.randn(5, 4)
    >>> before = net(x)
    >>> net = td.add_dendrites(net)
    >>> added = td.grow(net)
    >>> torch.equal(net(x), before)
    True
"""

from . import datasets as datasets
from ._version import __version__ as __version__
from .config import DendriteConfig, GrowthConfig
from .context import TaskPrototypes
from .dendrites import dendrite_context, register_dendrite_type
from .errors import (
    CheckpointError,
    ConfigError,
    DendriteError,
    ScoreError,
    StateError,
    TargetError,
    UnsupportedModuleError,
)
from .growth import GrowthController, StepResult
from .kwta import KWTA
from .layer import DendriticLayer
from .optim import param_groups, sync_optimizer
from .persistence import load, save
from .specs import LayerSpec, register_layer_type
from .surgery import (
    Plan,
    Summary,
    add_dendrites,
    dendritic_layers,
    grow,
    load_base_state_dict,
    plan,
    remove_dendrites,
    summary,
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DendriteConfig",
    "DendriteError",
    "DendriticLayer",
    "GrowthConfig",
    "GrowthController",
    "KWTA",
    "LayerSpec",
    "Plan",
    "ScoreError",
    "StateError",
    "StepResult",
    "Summary",
    "TargetError",
    "TaskPrototypes",
    "UnsupportedModuleError",
    "add_dendrites",
    "dendrite_context",
    "dendritic_layers",
    "grow",
    "load",
    "load_base_state_dict",
    "param_groups",
    "plan",
    "register_dendrite_type",
    "register_layer_type",
    "remove_dendrites",
    "save",
    "summary",
    "sync_optimizer",
]
