"""Token transports: the interface every transport implements (`TokenDispatcher`), and the one for a
single process, where the experts all live here.

The expert-parallel transport (all-to-all, all-gather) in `competesmoe.parallel.expert_parallel`
implements the same interface; the MoE layer only calls these methods, and each dispatch or gather
returns a frozen metadata object that the next phase consumes (nothing is kept on the transport).

Shape legend:
  T home tokens, D d_model, E global experts, e experts held on this rank, K choices per token,
  A kept (token, expert) assignments, N tokens received by this rank's experts (sorted by local
  expert), G tokens every local expert answers in a competition step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


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

    def dispatch(self, x_TD: torch.Tensor, token_A: torch.Tensor, expert_A: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Rows for this rank's experts, grouped by local expert (x_ND), and the metadata combine needs;
        the metadata has `counts`: rows per local expert."""

    def combine(self, y_ND: torch.Tensor, weight_A: torch.Tensor, meta: Any, num_tokens: int) -> torch.Tensor:
        """The experts' outputs back home, weighted and summed per token: y_TD."""

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

    order_A: torch.Tensor
    """Permutation that sorts the assignments by expert."""
    token_A: torch.Tensor
    """Home token of each assignment (original assignment order)."""
    counts: list[int]
    """Tokens per local expert, in the order the experts see them."""


@dataclass(frozen=True)
class LocalCompetitionMeta:
    num_tokens: int


def sort_by_expert(expert_A: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """Stable permutation grouping assignments by expert, and the count per expert."""
    order_A = torch.argsort(expert_A, stable=True)
    counts = torch.bincount(expert_A, minlength=num_experts).tolist()
    return order_A, counts


class LocalDispatcher:
    """All experts on this process: dispatch is a sort, combine a weighted scatter-add."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.num_local_experts = num_experts
        self.first_local_expert = 0

    # Router steps ---------------------------------------------------------------------------
    def dispatch(self, x_TD: torch.Tensor, token_A: torch.Tensor, expert_A: torch.Tensor):
        order_A, counts = sort_by_expert(expert_A, self.num_experts)
        meta = LocalDispatchMeta(order_A=order_A, token_A=token_A, counts=counts)
        return x_TD[token_A[order_A]], meta

    def combine(self, y_ND: torch.Tensor, weight_A: torch.Tensor, meta: LocalDispatchMeta, num_tokens: int):
        return weighted_scatter(unsort(y_ND, meta.order_A), weight_A, meta.token_A, num_tokens)

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


def weighted_scatter(y_AD: torch.Tensor, weight_A: torch.Tensor, token_A: torch.Tensor, num_tokens: int):
    """y_TD[t] = sum over assignments a of token t of weight_a * y_a."""
    out_TD = y_AD.new_zeros(num_tokens, y_AD.shape[-1])
    return out_TD.index_add(0, token_A, y_AD * weight_A.unsqueeze(-1).to(y_AD.dtype))
