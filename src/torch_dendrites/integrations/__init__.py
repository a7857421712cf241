"""Integrations with other libraries, each imported only when used:

- :mod:`torch_dendrites.integrations.lightning`: ``DendriteCallback`` for ``lightning`` Trainers.
- :mod:`torch_dendrites.integrations.transformers`: ``DendriteTrainerCallback`` for the Hugging Face Trainer,
  ``save_pretrained`` / ``from_pretrained`` that keep the dendrites.
- :mod:`torch_dendrites.integrations.peft`: ``merge_and_unload`` that keeps the dendrites, ``from_pretrained``.
- :mod:`torch_dendrites.integrations.accelerate`: ``AcceleratedGrowth`` for plain accelerate loops.
- :mod:`torch_dendrites.integrations.distributed`: DDP/FSDP2 helpers and the replica check.
- :mod:`torch_dendrites.integrations.embedded`: the dendrite structure inside a framework's model checkpoint.
"""
