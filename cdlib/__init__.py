"""Contrastive divergence as a time-reversal game: data, models, kernels and estimators.

The library behind the book's chapters. Every random draw takes an explicit
``torch.Generator``; every model maps a batch ``x`` of shape ``(n, dim)`` to the
unnormalised log-density ``log p_theta(x)`` of shape ``(n,)``.
"""

__version__ = "0.1.0"
