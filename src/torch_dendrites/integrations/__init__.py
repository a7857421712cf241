"""Integrations with other libraries, each imported only when used:

- :mod:`torch_dendrites.integrations.lightning`: ``DendriteCallback`` for ``lightning`` Trainers.
- :mod:`torch_dendrites.integrations.transformers`: ``DendriteTrainerCallback`` for the Hugging Face Trainer.
"""
