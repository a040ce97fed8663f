"""Library for fine-tuning and evaluating retrieval models. Knows nothing of DVC: see ``stages/`` for that."""

__version__ = "0.1.0"
