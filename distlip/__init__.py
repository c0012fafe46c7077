"""distlip: Lipschitz-constrained transformers trained on many GPUs."""

__version__ = "0.1.0"
