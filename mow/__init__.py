"""Reference reproduction of Mixture-of-World Models (MoW, ICLR 2026) and STORM (NeurIPS 2023)."""

__version__ = "0.1.0"
