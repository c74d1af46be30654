"""Tolerances for statistical tests, derived from a declared failure rate."""

import torch


def normal_quantile(two_sided_failure_rate: float) -> float:
    """Return z with P(|Z| > z) = two_sided_failure_rate for a standard normal Z."""
    return float(torch.special.ndtri(torch.tensor(1.0 - two_sided_failure_rate / 2)))
