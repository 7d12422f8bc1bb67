"""Matrix factorisation scored by inner products and trained with BPR (docs/method.md §3).

Shared by the meta-learned model and the MF-FT baseline so the ablation
differs from ours only in the meta loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bpr_triple_loss(
    p_user: torch.Tensor,
    q_pos: torch.Tensor,
    q_neg: torch.Tensor,
    lambda_p: float,
    lambda_q_pos: float,
    lambda_q_neg: float,
) -> torch.Tensor:
    """L_ijk = -log sigma(p_i.q_j - p_i.q_k) + lambda_P|p_i|^2 + lambda_Q+|q_j|^2 + lambda_Q-|q_k|^2.

    Shapes: (..., d) each; returns (...) one loss per triple, unreduced.
    """
    x_ijk = (p_user * (q_pos - q_neg)).sum(-1)
    return (
        -F.logsigmoid(x_ijk)
        + lambda_p * p_user.pow(2).sum(-1)
        + lambda_q_pos * q_pos.pow(2).sum(-1)
        + lambda_q_neg * q_neg.pow(2).sum(-1)
    )


def init_table(rows: int, dim: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """A fresh embedding table with N(0, std^2) entries."""
    return torch.randn(rows, dim, generator=generator) * std


def mean_plus_noise(table: torch.Tensor, count: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """Rows for new users or items: the mean of the existing rows plus N(0, std^2 I) (docs/method.md §7)."""
    mean = table.mean(0, keepdim=True) if len(table) else table.new_zeros(1, table.shape[1])
    # drawn on the generator's device (the CPU), so a seed gives the same rows wherever the table lives
    return mean + (torch.randn(count, table.shape[1], generator=generator) * std).to(table.device)
