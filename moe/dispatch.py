"""Token transports: the interface every transport implements (`TokenDispatcher`), and the one for a
single process, where the experts all live here.

The expert-parallel transport (all-to-all, all-gather) in `competesmoe.parallel.expert_parallel`
implements the same interface; the MoE layer only calls these methods, and each dispatch or gather
returns a frozen metadata object that the next phase consumes (nothing is kept on the transport).

Shape legend:
  T home tokens, D d_model, E global experts, e experts held on this rank, K choices per token,
  A = T * K (token, expert) assignments in token-major order, N the kept rows received by this rank's
  experts (sorted by local expert), G tokens every local expert answers in a competition step.

No method waits for the device where it need not: counts are made by scatter-adds (not bincount), and what
the host must know (split sizes, kept rows) travels in one copy per dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from competesmoe.moe.routing import count_per_expert


class TokenDispatcher(Protocol):
    """How a layer's tokens reach its experts and come back (router steps), and how a competition step
    sees every expert's answer to every token. Implemented by `LocalDispatcher` (one process) and
    `competesmoe.parallel.expert_parallel.AllToAllDispatcher` (experts sharded over an EP group)."""

    num_experts: int
    """E, the layer's experts over all ranks."""
    num_local_experts: int
    """e, the experts held here."""
    first_local_expert: int
    """Global id of the first expert held here (they are contiguous)."""

    def dispatch(self, x_TD: torch.Tensor, experts_TK: torch.Tensor,
                 keep_TK: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """Rows for this rank's experts, grouped by local expert (x_ND), and the metadata combine needs. The
        assignments are token-major (assignment a = t * K + k); keep_TK (capacity) drops the others. The metadata
        has `counts_e` (rows per local expert, on the device) and `counts` (the same on the host, or None where
        the transport did not need them)."""

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, meta: Any) -> torch.Tensor:
        """The experts' outputs back home, weighted and summed per token in fp32: y_TD."""

    def gather_tokens(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The tokens every local expert must answer in a competition step (x_GD), and their metadata."""

    def gather_outputs(self, outputs_eGD: torch.Tensor, meta: Any) -> tuple[torch.Tensor, Any]:
        """Expert outputs moved home where the transport compares outputs there (else unchanged)."""

    def gather_scores(self, scores_Ge: torch.Tensor, meta: Any) -> torch.Tensor:
        """Every expert's affinity for each home token: scores_TE (columns in global expert order)."""

    def gather_winners(self, outputs_eGD: torch.Tensor, winners_TK: torch.Tensor, meta: Any) -> torch.Tensor:
        """The winners' outputs for each home token: outputs_TKD."""


@dataclass(frozen=True)
class LocalDispatchMeta:
    """What combine needs to undo dispatch."""

    order_N: torch.Tensor
    """The kept assignments, sorted by expert: x_ND[n] is assignment order_N[n]."""
    experts_TK: torch.Tensor
    """The routing (its shape gives T and K)."""
    counts_e: torch.Tensor
    """Rows per expert, on the device."""
    counts: list[int] | None = None
    """The same on the host (None: not needed, nothing waited for the device)."""


@dataclass(frozen=True)
class LocalCompetitionMeta:
    num_tokens: int


def sort_by_expert(experts_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int):
    """The token-major assignments grouped by expert, dropped ones (keep_TK false) last: the stable order_A and the
    kept rows per expert counts_E (device), without waiting for the device."""
    expert_A = experts_TK.reshape(-1)
    if keep_TK is not None:
        expert_A = expert_A.masked_fill(~keep_TK.reshape(-1), num_experts)  # past every expert: sorted last
    order_A = torch.argsort(expert_A, stable=True)
    counts_E = count_per_expert(expert_A, num_experts + 1)[:num_experts]
    return order_A, counts_E


def rows_of_assignments(x_TD: torch.Tensor, order_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """x_ND[n] = x_TD[order_N[n] // K]. Through the [T, K, D] copy, so backward sums each token's K gradients in a
    fixed order (a direct x_TD[token_N] sums them by atomic adds on CUDA, in no fixed order)."""
    x_AD = x_TD.unsqueeze(1).expand(-1, top_k, -1).reshape(-1, x_TD.shape[-1])
    return x_AD[order_N]


def weighted_sum(y_ND: torch.Tensor, order_N: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """y_TD[t] = sum_k weights_TK[t, k] * y[t * K + k] in fp32, where row n of y_ND is assignment order_N[n] and
    assignments not in order_N (dropped) count zero. order_N holds each assignment once, so nothing is accumulated
    by atomics: the same sum every time."""
    num_tokens, top_k = weights_TK.shape
    if order_N.numel() == num_tokens * top_k:
        y_AD = unsort(y_ND.float(), order_N)
    else:
        y_AD = y_ND.new_zeros(num_tokens * top_k, y_ND.shape[-1], dtype=torch.float32).index_copy(
            0, order_N, y_ND.float())
    return (y_AD.view(num_tokens, top_k, y_ND.shape[-1]) * weights_TK.float().unsqueeze(-1)).sum(1)


class LocalDispatcher:
    """All experts on this process: dispatch is a sort, combine a weighted sum over each token's K rows."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.num_local_experts = num_experts
        self.first_local_expert = 0

    # Router steps ---------------------------------------------------------------------------
    def dispatch(self, x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None = None):
        order_A, counts_E = sort_by_expert(experts_TK, keep_TK, self.num_experts)
        counts = None
        if keep_TK is not None:  # how many rows were kept: the one wait for the device
            counts = counts_E.tolist()
            order_A = order_A[:sum(counts)]
        meta = LocalDispatchMeta(order_N=order_A, experts_TK=experts_TK, counts_e=counts_E, counts=counts)
        return rows_of_assignments(x_TD, order_A, experts_TK.shape[1]), meta

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, meta: LocalDispatchMeta):
        return weighted_sum(y_ND, meta.order_N, weights_TK)

    # Competition steps ----------------------------------------------------------------------
    def gather_tokens(self, x_TD: torch.Tensor):
        """The tokens this rank's experts must answer (here: our own)."""
        return x_TD, LocalCompetitionMeta(num_tokens=x_TD.shape[0])

    def gather_outputs(self, outputs_eGD: torch.Tensor, meta: LocalCompetitionMeta):
        """Expert outputs for the home tokens (a gather='outputs' transport moves them here)."""
        return outputs_eGD, meta

    def gather_scores(self, scores_Ge: torch.Tensor, meta: LocalCompetitionMeta) -> torch.Tensor:
        """Every expert's affinity for each home token: scores_TE."""
        return scores_Ge

    def gather_winners(self, outputs_eGD: torch.Tensor, winners_TK: torch.Tensor, meta: LocalCompetitionMeta):
        """The winners' outputs for each home token: outputs_TKD."""
        return select_winners(outputs_eGD, winners_TK)


def select_winners(outputs_ETD: torch.Tensor, winners_TK: torch.Tensor) -> torch.Tensor:
    """outputs_TKD[t, k] = outputs_ETD[winners_TK[t, k], t]: each home token's winners' outputs, when all E
    experts' outputs for the home tokens are here."""
    token_T1 = torch.arange(winners_TK.shape[0], device=winners_TK.device).unsqueeze(1)
    return outputs_ETD[winners_TK, token_T1]


def unsort(y_sorted_AD: torch.Tensor, order_A: torch.Tensor) -> torch.Tensor:
    """Inverse of x[order]: put rows back in assignment order (differentiable)."""
    inverse_A = torch.empty_like(order_A)
    inverse_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
    return y_sorted_AD[inverse_A]
