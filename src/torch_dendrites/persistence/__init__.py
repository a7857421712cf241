"""Save and load dendritic models: a folder holding a JSON recipe and safetensors weights.

``save`` writes ``recipe.json`` (format and library version, a save id, the size and SHA-256 of every
other file, the dendrite config and, per wrapped layer, its path, type, dendrite count and settings) and
``model.safetensors``; with a controller also ``controller.json`` and ``controller.safetensors`` (its
best weights); with an optimizer, scheduler, RNG or generator states also ``training.json`` and
``training.safetensors``. ``load`` takes a freshly built base model, checks everything against it before
changing anything, re-applies the structure from the recipe and loads strictly. Nothing here ever
unpickles: JSON is parsed by ``json`` and tensors are read from safetensors files. ``save(...,
base_weights=False)`` writes an adapter-sized folder: the frozen base weights are left out and only their
fingerprint is kept; ``load`` then takes them from the base model passed in, after comparing the fingerprint.

The package is split by role:

- :mod:`.io`: the file-system seam (atomic folders, locks, reading through descriptors, fault injection);
- :mod:`.codec`: the one codec for "JSON with tensors" and the bounded safetensors reader;
- :mod:`.recipe`: the recipe schema, its migration table, and the structure it describes;
- :mod:`.base`: which tensors an adapter-sized folder leaves out, their fingerprint, peft adapter configs;
- :mod:`.training`: the controller, optimizer, scheduler, RNG and generator codecs;
- :mod:`.checkpoint`: ``save``, ``load`` and ``load_training_state``.
"""

from .checkpoint import load, load_training_state, save
from .io import resolve as _resolve  # noqa: F401 - the growth controller's resume() finds latest/ with it

__all__ = ["save", "load", "load_training_state"]
