"""The classifiers behind NCE, CNCE and CD, written out explicitly.

Each classifier is built from the model log p_theta. Its logit is the log-odds that the
input is in its original order (or, for NCE, that it is a data point), so that
``sigmoid(logit)`` is the classifier's probability D_theta. Training uses the estimators,
which apply the same updates more cheaply. These classes exist so that the
chapters and tests can check the identities between a classifier's BCE loss and
those updates.

Equation, algorithm and observation numbers are those of Yair and Michaeli,
"Contrastive Divergence Learning is a Time Reversal Adversarial Game", ICLR 2021.
"""

import torch
import torch.nn.functional as F

from .kernels import evaluate


def nce_logit(model, reference, x: torch.Tensor) -> torch.Tensor:
    """Return log D/(1 - D) = log p_theta(x) - log p_ref(x) for NCE's eq. 5."""
    return model(x) - reference.log_prob(x)


class TimeReversalClassifier:
    """Tell a chain (a_0, ..., a_k) from its time reversal, the paper's eq. 17.

    D_theta(a_0, ..., a_k) = (1 + prod_i w_theta(a_(i-1), a_i))^-1, where w_theta uses the
    transition density of ``kernel`` and the model. The kernel is held fixed: its
    log q terms are computed from scores detached from theta, and only the log p_theta
    terms carry gradient. With the MALA kernel, log q is the Metropolis-Hastings transition
    density, so w_theta = 1 up to rounding on every step. A chain of two states with the Gaussian noise kernel is the
    CNCE pair classifier of eqs. 7-9.
    """

    def __init__(self, model, kernel):
        self.model = model
        self.kernel = kernel

    def log_w(self, path: torch.Tensor) -> torch.Tensor:
        """Return log prod_i w_theta(a_(i-1), a_i) for paths of shape (k + 1, n, dim)."""
        if path.ndim != 3 or path.shape[0] < 2:
            raise ValueError(
                f"path must have shape (k + 1, n, dim) with k >= 1, got {tuple(path.shape)}"
            )
        k_plus_1, n, dim = path.shape
        log_p = self.model(path.reshape(k_plus_1 * n, dim)).reshape(k_plus_1, n)
        states = [evaluate(self.model, x, self.kernel.needs_score) for x in path]
        log_q_ratio = torch.zeros(n, dtype=path.dtype, device=path.device)
        for before, after in zip(states[:-1], states[1:]):
            log_q_ratio += self.kernel.log_q(before, after)
            log_q_ratio -= self.kernel.log_q(after, before)
        return log_q_ratio + (log_p[1:] - log_p[:-1]).sum(0)

    def logit(self, path: torch.Tensor) -> torch.Tensor:
        """Return log D/(1 - D), the log-odds that ``path`` is in its original order."""
        return -self.log_w(path)

    def probability(self, path: torch.Tensor) -> torch.Tensor:
        """Return D_theta(path), the probability of the original order."""
        return torch.sigmoid(self.logit(path))

    def loss(self, path: torch.Tensor, is_original: torch.Tensor) -> torch.Tensor:
        """Return the mean BCE for presented paths and their order labels (1 = original)."""
        return F.binary_cross_entropy_with_logits(
            self.logit(path), is_original.to(path.dtype)
        )


def present_in_random_order(path: torch.Tensor, generator: torch.Generator):
    """Reverse each chain with probability 1/2; return the paths and labels.

    The label is 1 where the chain keeps its original order and 0 where it was
    reversed, the classes Y = 1 and Y = 0 of the paper's time-reversal task.
    """
    n = path.shape[1]
    is_original = torch.rand(n, generator=generator, device=generator.device) < 0.5
    is_original = is_original.to(path.device)
    reversed_path = path.flip(0)
    presented = torch.where(is_original[None, :, None], path, reversed_path)
    return presented, is_original
