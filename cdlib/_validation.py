"""Argument checks shared by the library: each raises ``ValueError`` naming the value."""

import math
from numbers import Integral, Real

import torch


def check_positive(name: str, value) -> float:
    """Return ``value`` as a float, or raise unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_int_at_least(name: str, value, minimum: int) -> int:
    """Return ``value``, or raise unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(name: str, value, allowed) -> str:
    """Return ``value``, or raise unless it is one of ``allowed``."""
    if value not in allowed:
        options = ", ".join(repr(option) for option in allowed)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_batch(name: str, x, dim: int) -> torch.Tensor:
    """Return ``x``, or raise unless it is a finite float tensor of shape (n, dim)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != dim or x.shape[0] < 1:
        raise ValueError(
            f"{name} must have shape (n, {dim}) with n >= 1, got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"{name} must be finite, got {bad} rows with NaN or inf")
    return x
