"""gradinv: gradient inversion attacks on federated learning updates (pure torch)."""

__version__ = "0.1.0"
