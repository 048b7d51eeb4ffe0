"""Equilibrated Diffusion: frequency-aware subject customization (Ma, Fang, Qi; ACM MM 2024)."""

__version__ = "0.1.0"
