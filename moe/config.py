"""Configuration of the model and its MoE layers: `model.*` and `moe.*` of a run's YAML.

Each field's docstring is its documentation; `validate()` checks what a single field's type cannot
and raises ConfigError naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from competesmoe.common.typed_config import check


@dataclass
class ModelConfig:
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of Transformer blocks."""
    n_heads: int = 4
    """Attention heads per block; must divide d_model."""
    seq_len: int = 256
    """Tokens per training sequence (the context length)."""
    layout: Literal["switch", "glam", "dense"] = "switch"
    """'switch': every FFN is an MoE; 'glam': dense and MoE FFNs alternate (MoE on odd blocks);
    'dense': no MoE at all (the dense baseline)."""
    positions: Literal["rotary", "learned"] = "rotary"
    """Position encoding: rotary embeddings in attention, or a learned absolute table."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    dense_hidden: int = 512
    """Hidden width of the dense FFNs (glam's dense blocks and the dense layout)."""
    dense_activation: Literal["gelu", "swiglu"] | None = None
    """Activation of the dense FFNs; null = the experts' (moe.activation), so a dense baseline matches its
    MoE twin."""
    dropout: float = 0.0
    """Dropout on attention and residual branches."""

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "seq_len", "dense_hidden"):
            value = getattr(self, name)
            check(value >= 1, f"model.{name} ({value}) must be at least 1")
        check(self.d_model % self.n_heads == 0,
              f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        check(self.positions != "rotary" or (self.d_model // self.n_heads) % 2 == 0,
              f"rotary positions need an even head size; model.d_model / model.n_heads = {self.d_model // self.n_heads}")
        check(0.0 <= self.dropout < 1.0, f"model.dropout ({self.dropout}) must be within [0, 1)")


@dataclass
class CompetitionConfig:
    rate: float = 0.05
    """Probability that an MoE layer competes at an optimizer step after warm-up (v2 default 0.05)."""
    warmup: float = 0.05
    """Fraction of train.max_steps before the first competition step."""
    cap: int = 3
    """At most this many layers compete in one step; extra draws move to the nearest free step."""
    variant: Literal["v2", "v1"] = "v2"
    """v2: weights = winners' affinities renormalised; v1: softmax over the winners' affinities,
    and the schedule draws per forward (not per optimizer step)."""
    affinity: Literal["softplus_mean", "l2_norm", "relu_mean", "sigmoid_mean"] = "softplus_mean"
    """The neural response s_j computed from expert output o_j."""
    router_loss_coef: float = 0.01
    """Weight of MSE(p_R, stopgrad p_C), the router's distillation of the competition."""
    hybrid_coef: float = 0.0
    """Weight theta of the extra MSE term restricted to the K winners (0 disables)."""
    diversity_coef: float = 0.01
    """Weight of the mean pairwise cosine similarity among the winners' outputs."""
    balance_coef: float = 0.01
    """Weight of the Switch balance loss computed on p_C and the top-1 winner."""
    gather: Literal["scores", "outputs"] = "scores"
    """Expert-parallel transport of a competition step: all-gather per-token affinities (default,
    cheaper) or the literal variant that all-gathers the expert outputs themselves."""

    def validate(self) -> None:
        check(0.0 <= self.rate <= 1.0, f"moe.competition.rate ({self.rate}) must be within [0, 1]")
        check(0.0 <= self.warmup <= 1.0, f"moe.competition.warmup ({self.warmup}) must be a fraction of steps within [0, 1]")
        check(self.cap >= 1, f"moe.competition.cap ({self.cap}) must be at least 1")
        for name in ("router_loss_coef", "hybrid_coef", "diversity_coef", "balance_coef"):
            check(getattr(self, name) >= 0, f"moe.competition.{name} ({getattr(self, name)}) must not be negative")


@dataclass
class BaselineConfig:
    xmoe_dim: int = 16
    """XMoE: dimension of the routing space that tokens are projected into (cosine to expert embeddings)."""
    xmoe_temperature: float = 0.5
    """XMoE: initial value of the learnable temperature tau (logits = cosine / tau, tau kept >= 0.01)."""
    stablemoe_stage1: float = 0.1
    """StableMoE: fraction of train.max_steps in stage 1 (routing learned with its balance loss and
    distilled); from step floor(stablemoe_stage1 * max_steps) on, the distilled router is frozen."""
    stablemoe_dim: int = 16
    """StableMoE: width of the distilled router's token embedding (it routes on the token id alone)."""
    stablemoe_distill_coef: float = 1.0
    """StableMoE: weight of the cross-entropy that distils stage-1 routing into the lightweight router."""
    dropout_k_start: int = 1
    """SMoE-Dropout: experts per token at the first training step."""
    dropout_k_end: int = 0
    """SMoE-Dropout: experts per token at the last training step (K grows linearly in between);
    0 = moe.num_experts. Evaluation uses moe.top_k."""
    smoe_raw_gates: bool = False
    """SMoE (router = smoe): gate with the chosen experts' softmax probabilities as they are (the Switch
    Transformer's gate) instead of renormalising them to sum to one. With top_k 1, renormalised gates
    are all 1 and the router learns from the balance and z-losses only; repro's 'switch' sets this."""

    def validate(self, num_experts: int) -> None:
        check(self.xmoe_dim >= 1, f"moe.baseline.xmoe_dim ({self.xmoe_dim}) must be at least 1")
        check(self.xmoe_temperature >= 0.01,
              f"moe.baseline.xmoe_temperature ({self.xmoe_temperature}) must be at least 0.01")
        check(0.0 <= self.stablemoe_stage1 <= 1.0,
              f"moe.baseline.stablemoe_stage1 ({self.stablemoe_stage1}) must be a fraction of train.max_steps "
              f"within [0, 1]")
        check(self.stablemoe_dim >= 1, f"moe.baseline.stablemoe_dim ({self.stablemoe_dim}) must be at least 1")
        check(self.stablemoe_distill_coef >= 0,
              f"moe.baseline.stablemoe_distill_coef ({self.stablemoe_distill_coef}) must not be negative")
        k_end = self.dropout_k_end or num_experts
        check(1 <= self.dropout_k_start <= num_experts,
              f"moe.baseline.dropout_k_start ({self.dropout_k_start}) must be within [1, moe.num_experts ({num_experts})]")
        check(self.dropout_k_end >= 0 and k_end <= num_experts,
              f"moe.baseline.dropout_k_end ({self.dropout_k_end}) must be within [0, moe.num_experts ({num_experts})] "
              f"(0 = all experts)")
        check(k_end >= self.dropout_k_start,
              f"moe.baseline.dropout_k_end ({k_end}) must not be below moe.baseline.dropout_k_start "
              f"({self.dropout_k_start})")


RouterKind = Literal["smoe", "competesmoe", "xmoe", "stablemoe", "smoe_dropout"]


@dataclass
class MoEConfig:
    num_experts: int = 8
    """Experts per MoE layer (E)."""
    top_k: int = 2
    """Experts chosen per token (K); 1 is Switch, 2 is GShard."""
    expert_hidden: int = 256
    """Hidden width of each expert FFN."""
    activation: Literal["gelu", "swiglu"] = "gelu"
    """Expert FFN: GELU MLP, or SwiGLU (gate and up projections)."""
    router: RouterKind = "competesmoe"
    """Routing policy: softmax top-K ('smoe'; top_k 1 is Switch, 2 is GShard), CompeteSMoE (router steps
    plus competition steps), or a baseline of the papers (moe/baselines.py, settings in moe.baseline):
    'xmoe' low-dimensional cosine routing with a learnable temperature, 'stablemoe' two-stage routing
    with a distilled then frozen router, 'smoe_dropout' a random frozen router whose K grows."""
    balance_coef: float = 0.01
    """Weight of the Switch load-balancing loss on router steps."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss mean(logsumexp(g)^2)."""
    jitter: float = 0.0
    """Multiplicative uniform noise eps on router inputs in training (x * U(1-eps, 1+eps)); 0 disables."""
    capacity_factor: float = 0.0
    """0 = dropless (default). Otherwise each expert takes at most ceil(cf * T * K / E) tokens per
    rank; assignments past capacity (in token order) are dropped and contribute zero."""
    competition: CompetitionConfig = field(default_factory=CompetitionConfig)
    """The competition schedule and losses (used when router = competesmoe)."""
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    """Settings of the baseline routers (used when router = xmoe, stablemoe or smoe_dropout)."""

    @property
    def competes(self) -> bool:
        """Whether this routing policy has competition steps."""
        return self.router == "competesmoe"

    def validate(self) -> None:
        for name in ("num_experts", "top_k", "expert_hidden"):
            value = getattr(self, name)
            check(value >= 1, f"moe.{name} ({value}) must be at least 1")
        check(self.top_k <= self.num_experts,
              f"moe.top_k ({self.top_k}) must not exceed moe.num_experts ({self.num_experts})")
        check(self.capacity_factor >= 0, f"moe.capacity_factor ({self.capacity_factor}) must be 0 (dropless) or positive")
        check(0 <= self.jitter < 1, f"moe.jitter ({self.jitter}) must be within [0, 1)")
        for name in ("balance_coef", "z_loss_coef"):
            check(getattr(self, name) >= 0, f"moe.{name} ({getattr(self, name)}) must not be negative")
        self.competition.validate()
        self.baseline.validate(self.num_experts)
