"""Feed-forward experts held as stacked weights.

Shape legend:
  T tokens, D d_model, F expert hidden width, E experts held here (all, or a rank's local slice),
  N tokens routed to the experts here, sorted by expert, n one expert's share of them,
  G tokens that every expert answers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from competesmoe.common.errors import ConfigError


class GroupedExperts(nn.Module):
    """E feed-forward experts (GELU or SwiGLU) stored as stacked [E, ...] weights.

    `forward` runs tokens already sorted by expert: one grouped GEMM per matrix for all experts
    (`torch.nn.functional.grouped_mm`) or one product per expert, as `grouped_gemm` says (moe.grouped_gemm: 'auto'
    takes grouped GEMM on CUDA where it runs, the per-expert loop elsewhere); `forward_all` lets every expert answer
    every token (competition): one product for all experts' input projections and one batched product for their
    outputs.

    `recompute_hidden` (set by the parallelize step's activation checkpointing) keeps no hidden layer for
    backward: it is recomputed there (in `forward_all` one expert at a time, so at most one is alive).
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str = "gelu",
                 init_stds: tuple[float, float] | None = None, grouped_gemm: str = "auto"):
        """init_stds: the standard deviations of w_in and w_out at init (`expert_init_stds`); None = fan-in.
        grouped_gemm: 'auto', 'on' or 'off', as moe.grouped_gemm."""
        super().__init__()
        self.activation = activation
        self.grouped_gemm = grouped_gemm
        in_width = 2 * hidden if activation == "swiglu" else hidden
        self.w_in_EDF = nn.Parameter(torch.empty(num_experts, d_model, in_width))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.recompute_hidden = False
        self.init_stds = init_stds or fan_in_stds(d_model, hidden)
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return self.w_in_EDF.shape[0]

    def reset_parameters(self) -> None:
        std_in, std_out = self.init_stds
        nn.init.normal_(self.w_in_EDF, std=std_in)
        nn.init.normal_(self.w_out_EFD, std=std_out)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h)

    def _checkpointed(self, fn, *args) -> torch.Tensor:
        if self.recompute_hidden and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x_ND: torch.Tensor, counts_e: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
        """x_ND holds counts_e[j] consecutive tokens for local expert j; returns their outputs in the same order.
        counts: the same counts on the host when the caller has them (the per-expert fallback needs them)."""
        if self._use_grouped_gemm(x_ND):
            offsets_e = torch.cumsum(counts_e, 0).to(torch.int32)
            return self._checkpointed(self._grouped, x_ND, offsets_e)
        return self._per_expert(x_ND, counts_e.tolist() if counts is None else list(counts))

    def _use_grouped_gemm(self, x_ND: torch.Tensor) -> bool:
        if self.grouped_gemm == "off":
            return False
        supported = grouped_gemm_supported(x_ND, self.w_in_EDF, self.w_out_EFD)
        if self.grouped_gemm == "on" and not supported:
            raise ConfigError(f"moe.grouped_gemm is on, but torch's grouped GEMM cannot run {x_ND.dtype} on "
                              f"{x_ND.device} with d_model {x_ND.shape[-1]} and these expert widths (it needs CPU, or "
                              f"CUDA bf16 on compute capability 8.0+, and rows of a multiple of 16 bytes); set "
                              f"moe.grouped_gemm=auto")
        return supported and (self.grouped_gemm == "on" or x_ND.device.type == "cuda")

    def _grouped(self, x_ND: torch.Tensor, offsets_e: torch.Tensor) -> torch.Tensor:
        h_NF = _contiguous_grad(F.grouped_mm(x_ND, self.w_in_EDF, offs=offsets_e))
        return _contiguous_grad(F.grouped_mm(self._act(h_NF), self.w_out_EFD, offs=offsets_e))

    def _expert(self, x_nD: torch.Tensor, w_in_DF: torch.Tensor, w_out_FD: torch.Tensor) -> torch.Tensor:
        return self._act(x_nD @ w_in_DF) @ w_out_FD

    def _per_expert(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """One product per expert (devices without grouped GEMM for this dtype)."""
        # split/unbind rather than slicing per expert: slicing makes backward zero-fill and sum one
        # full-size gradient per expert (17% of a step in a profile); this gives identical numbers.
        w_in, w_out = self.w_in_EDF.unbind(0), self.w_out_EFD.unbind(0)
        outputs = [self._checkpointed(self._expert, x_nD, w_in_DF, w_out_FD)
                   for x_nD, w_in_DF, w_out_FD, n in zip(x_ND.split(counts), w_in, w_out, counts) if n]
        if not outputs:
            # No tokens here: keep every parameter in the graph so backward reaches it with zeros.
            return x_ND.new_zeros(0, x_ND.shape[1]) + 0.0 * (self.w_in_EDF.sum() + self.w_out_EFD.sum())
        return torch.cat(outputs, dim=0)

    def forward_all(self, x_GD: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: returns o_EGD."""
        if self.recompute_hidden and torch.is_grad_enabled():
            # One expert at a time, each recomputed in backward: at most one hidden layer is ever alive.
            return torch.stack([self._checkpointed(self._expert, x_GD, w_in_DF, w_out_FD)
                                for w_in_DF, w_out_FD in zip(self.w_in_EDF.unbind(0), self.w_out_EFD.unbind(0))])
        num_experts, d_model, in_width = self.w_in_EDF.shape
        # All experts' input projections are one product with the experts side by side: [D, E * F_in].
        w_in_DX = self.w_in_EDF.transpose(0, 1).reshape(d_model, num_experts * in_width)
        h_GEF = self._act((x_GD @ w_in_DX).view(-1, num_experts, in_width))
        return torch.bmm(h_GEF.transpose(0, 1), self.w_out_EFD)


def grouped_gemm_supported(x_ND: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `torch.nn.functional.grouped_mm` runs these operands: every row a multiple of 16 bytes (its
    kernels' alignment, on CPU too), and on CPU (torch >= 2.9) any float dtype, on CUDA bf16 on compute capability
    8.0 or newer; nowhere else."""
    if not hasattr(F, "grouped_mm"):
        return False
    row_sizes = [x_ND.shape[-1]] + [size for w in weights for size in w.shape[-2:]]
    if any(size * x_ND.element_size() % 16 for size in row_sizes):
        return False
    if x_ND.device.type == "cpu":
        return True
    return (x_ND.device.type == "cuda" and torch.cuda.get_device_capability(x_ND.device) >= (8, 0)
            and all(t.dtype == torch.bfloat16 for t in (x_ND, *weights)))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's backward refuses the stride-0 gradient
    an expanded tensor gives (`y.sum().backward()`), and an empty one with zero strides."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.new_zeros(grad.shape) if grad.numel() == 0 else grad.contiguous()


def _contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(x)


def expert_init_stds(cfg, d_model: int, n_layers: int) -> tuple[float, float]:
    """Standard deviations of (w_in, w_out) at init for moe.expert_init (cfg: MoEConfig).

    'fan_in': 1/sqrt(D) and 1/sqrt(F). 'official_lm': the v2 LM code's (Fsoft-AIC/CompeteSMoE, moe_pretrain_model:
    layers/moe/moe.py keys/values with weight_scale = sqrt(2 / n_layers) from relative_moe_transformer.py):
    sqrt(2/L)/sqrt(D) and sqrt(2/L)/sqrt(E F), E the layer's experts over all ranks.
    """
    if cfg.expert_init == "official_lm":
        scale = math.sqrt(2.0 / n_layers)
        return scale / math.sqrt(d_model), scale / math.sqrt(cfg.num_experts * cfg.expert_hidden)
    return fan_in_stds(d_model, cfg.expert_hidden)


def fan_in_stds(d_model: int, hidden: int) -> tuple[float, float]:
    """1/sqrt(fan-in) for w_in (D inputs) and w_out (F inputs)."""
    return 1.0 / math.sqrt(d_model), 1.0 / math.sqrt(hidden)


class DenseFFN(nn.Module):
    """The dense feed-forward block (GLaM's dense layers and the dense baseline)."""

    def __init__(self, d_model: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d_model, 2 * hidden if activation == "swiglu" else hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return self.w_out(F.silu(gate) * up)
        return self.w_out(F.gelu(h))


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one torch._grouped_mm, counted as FlopCounterMode counts a matmul (2 per multiply-add): the products
    of all groups together are those of one [rows, contraction] x [contraction, columns] product. 2D x 2D (the
    weight gradients): the contraction is the jagged dim, the output [groups, rows, columns]; otherwise the output is
    [rows, columns] (2D x 3D) or [groups, rows, columns] (3D x 3D), the contraction a's last dim."""
    contraction = a_shape[-1]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * out_shape[-2] * out_shape[-1] * contraction
    return 2 * math.prod(out_shape) * contraction


def _register_grouped_mm_flops() -> None:
    """torch's FlopCounterMode has no formula for grouped GEMM (torch 2.13): without one, a FLOP count of our experts
    would read zero."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    op = getattr(torch.ops.aten, "_grouped_mm", None)
    if op is not None and op not in flop_registry:
        register_flop_formula(op)(grouped_mm_flops)


_register_grouped_mm_flops()
