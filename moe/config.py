"""Configuration of the model and its MoE layers: `model.*` and `moe.*` of a run's YAML.

Each field's docstring is its documentation; `validate()` checks what a single field's type cannot
and raises ConfigError naming the field.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

from competesmoe.common.typed_config import check

MAX_LAYERS = 1024


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
    init_from: str | None = None
    """Start from another run's weights instead of a random initialisation: its output_dir, one of its checkpoint
    folders or an exported .safetensors (read weights-only). A dense run (model.layout dense, dense_hidden =
    moe.expert_hidden, the same activation) is upcycled: each MoE layer's experts start as copies of the dense FFN
    of the same block (plus moe.upcycle_noise), the routers keep their fresh initialisation, every other tensor is
    copied (moe/upcycle.py). Applied when the run starts, never when it resumes (its checkpoint has the weights).
    null = random initialisation."""
    init_from_data: Literal["restart", "continue"] = "restart"
    """With init_from: 'restart' reads the training data from the beginning, as any new run; 'continue' carries on
    from where the init_from run stopped (its checkpoint's sampler position; same data, seed and micro-batch as
    that run), so that both runs together read the data one longer run would (e.g. a token budget split between
    a dense model and its upcycled MoE)."""

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "seq_len", "dense_hidden"):
            value = getattr(self, name)
            check(value >= 1, f"model.{name} ({value}) must be at least 1")
        check(self.n_layers <= MAX_LAYERS, f"model.n_layers ({self.n_layers}) must be at most {MAX_LAYERS} (deeper "
                                           f"than any Transformer LM trained; a larger value is a typo)")
        check(self.d_model % self.n_heads == 0,
              f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        check(self.positions != "rotary" or (self.d_model // self.n_heads) % 2 == 0,
              f"rotary positions need an even head size; model.d_model / model.n_heads = {self.d_model // self.n_heads}")
        check(0.0 <= self.dropout < 1.0, f"model.dropout ({self.dropout}) must be within [0, 1)")
        check(self.init_from != "", "model.init_from is empty: name a run, checkpoint or .safetensors, or null")
        check(self.init_from_data == "restart" or self.init_from is not None,
              "model.init_from_data: continue needs model.init_from (the run whose data position to continue)")


@dataclass
class CompetitionConfig:
    """The competition and its losses. Defaults: the authors' v2 code (Fsoft-AIC/CompeteSMoE,
    moe_model/train/train.py, ModelArguments); docs/competesmoe.md names the source of every value."""

    rate: float = 0.05
    """Probability that an MoE layer competes at an optimizer step after warm-up (v2 default 0.05; the v2 LM
    sweep uses 0.07). variant v1 draws per forward instead: 1.0 = every forward, as the v1 scripts."""
    warmup: float = 0.05
    """Fraction of train.max_steps before the first competition step."""
    cap: int = 3
    """At most this many layers compete in one step; extra draws move to the nearest free step (v2 plan only:
    variant v1 draws per forward and has no cap)."""
    variant: Literal["v2", "v1"] = "v2"
    """v2: weights = the winners' affinities renormalised, router target stopgrad softmax(s) over all E experts,
    competition balance on the top-1 winner, one plan per optimizer step. v1 (the 2024 paper's regime): weights =
    softmax over the winners' affinities, router target = softmax over the winners only (0 for the others) with the
    gradient flowing through it into the experts, competition balance over all K winners, a draw per forward.
    The v1 paper's settings: moe.competition.{affinity: l2_norm, rate: 1.0, warmup: 0.0, router_loss_coef: 0.05,
    balance_coef: 0.05, diversity_coef: 0.0} (moe/presets.py 'competesmoe-v1', configs/switch-small-v1.yaml)."""
    affinity: Literal["softplus_mean", "l2_norm", "relu_mean", "sigmoid_mean"] = "softplus_mean"
    """The neural response s_j computed from expert output o_j."""
    combine_gate: bool = False
    """variant v1 only (the v1 code's --combine_gate): compete on 0.5 * s_j + 0.5 * g_j (g: the router's logits)
    instead of s_j; winners, weights, target and balance all use the mixed score, so the router also gets task
    gradient through the winners' weights."""
    router_loss_coef: float = 0.01
    """Weight of the router loss MSE(p_R, target) + hybrid_theta * MSE restricted to the K winners (the router's
    distillation of the competition). v2 default 0.01; the v2 LM sweep uses 0.001; v1: 0.05 (alpha 5 x 0.01)."""
    hybrid_theta: float = 0.0
    """Relative weight theta of the winners-only MSE inside router_loss_coef: router loss = router_loss_coef *
    (MSE over all E + theta * MSE over the K winners), as the v2 code's --hybrid/--router_theta (0 disables; the v2
    LM sweep uses 0.2)."""
    hybrid_coef: float | None = None
    """Deprecated (old absolute weight of the winners-only MSE, added beside router_loss_coef): still read, and
    turned into hybrid_theta = hybrid_coef / router_loss_coef at load, which keeps an old run's loss exactly."""
    diversity_coef: float = 0.01
    """Weight of the diversity loss: cosine similarity among each token's K winners' outputs, diagonal zeroed,
    mean over all K x K entries (the v2 code's mean; 0 for K = 1). v2 default 0.01; the v2 LM code 0.005."""
    balance_coef: float = 0.01
    """Weight of the Switch balance loss on p_C = softmax(s): over the top-1 winner (v2) or all K winners (v1).
    v2 default 0.01; the v2 LM code 0.005; v1 0.05."""
    gather: Literal["scores", "outputs"] = "scores"
    """Expert-parallel transport of a competition step: all-gather per-token affinities (default,
    cheaper) or the literal variant that all-gathers the expert outputs themselves."""

    def validate(self) -> None:
        check(0.0 <= self.rate <= 1.0, f"moe.competition.rate ({self.rate}) must be within [0, 1]")
        check(0.0 <= self.warmup <= 1.0, f"moe.competition.warmup ({self.warmup}) must be a fraction of steps within [0, 1]")
        check(self.cap >= 1, f"moe.competition.cap ({self.cap}) must be at least 1")
        check(not self.combine_gate or self.variant == "v1",
              "moe.competition.combine_gate is the v1 regime's option; set moe.competition.variant=v1 or "
              "combine_gate=false")
        self._convert_hybrid_coef()
        for name in ("router_loss_coef", "hybrid_theta", "diversity_coef", "balance_coef"):
            check(getattr(self, name) >= 0, f"moe.competition.{name} ({getattr(self, name)}) must not be negative")

    def _convert_hybrid_coef(self) -> None:
        """The deprecated absolute hybrid_coef becomes the relative hybrid_theta (same loss)."""
        if self.hybrid_coef is None:
            return
        coef, self.hybrid_coef = self.hybrid_coef, None
        if coef == 0.0:  # every resolved config before hybrid_theta held hybrid_coef: 0.0 (old checkpoints)
            return
        check(coef > 0, f"moe.competition.hybrid_coef ({coef}, deprecated) must not be negative")
        check(self.hybrid_theta == 0.0,
              "moe.competition.hybrid_coef (deprecated) and hybrid_theta are both set; keep only hybrid_theta")
        check(self.router_loss_coef > 0,
              f"moe.competition.hybrid_coef ({coef}, deprecated) needs router_loss_coef > 0 to become hybrid_theta; "
              f"set hybrid_theta and router_loss_coef instead")
        self.hybrid_theta = coef / self.router_loss_coef
        warnings.warn(f"moe.competition.hybrid_coef is deprecated: read as hybrid_theta = {self.hybrid_theta:g} "
                      f"(= hybrid_coef / router_loss_coef, the same loss); write hybrid_theta instead", FutureWarning,
                      stacklevel=2)


@dataclass
class BaselineConfig:
    xmoe_dim: int = 16
    """XMoE: dimension of the routing space that tokens are projected into (cosine to expert embeddings)."""
    xmoe_temperature: float = 0.5
    """XMoE: temperature tau (logits = cosine / tau, tau kept >= 0.01): the initial value when learned, else fixed.
    The v2 code's fixed 0.3 acts on cosines scaled by its expert-embedding norm 1.5, i.e. tau = 0.2 here."""
    xmoe_learn_temperature: bool = True
    """XMoE: learn tau (our default); false keeps it fixed at xmoe_temperature, as the v2 code."""
    xmoe_gates: Literal["renormalised", "softmax_topk"] = "renormalised"
    """XMoE gate weights: the top-K probabilities renormalised to sum to one (our default), or a softmax over the
    top-K probabilities (the v2 code's _keepTopk)."""
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
    grouped_gemm: Literal["auto", "on", "off"] = "auto"
    """How the experts of a router step multiply (Megatron's --moe-grouped-gemm): 'on' = one grouped GEMM per weight
    matrix for all experts (torch.nn.functional.grouped_mm; runs on CPU, and on CUDA in bf16 on compute capability
    8.0+; an error elsewhere); 'off' = one product per expert; 'auto' (default) = grouped GEMM on CUDA where it
    runs, per expert otherwise (on CPU torch's grouped GEMM measured slower and larger than the per-expert loop:
    `competesmoe bench moe-layer`). The numbers agree to rounding either way."""
    expert_init: Literal["fan_in", "official_lm"] = "fan_in"
    """Initial expert weights. 'fan_in' (default): w_in ~ N(0, 1/d_model), w_out ~ N(0, 1/expert_hidden).
    'official_lm': the v2 LM code's (layers/moe/moe.py with relative_moe_transformer.py's scale sqrt(2/n_layers)):
    w_in ~ N(0, 2/(n_layers d_model)), w_out ~ N(0, 2/(n_layers E expert_hidden)); its expert outputs start about
    n_layers sqrt(E) / 2 times smaller (64x for configs/v2-pretrain.yaml), which changes what an affinity ranks."""
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
    upcycle_noise: float = 0.0
    """With model.init_from a dense run: standard deviation of the N(0, upcycle_noise^2) noise added to each
    expert's copy of the dense FFN weights (drawn from train.seed), so that the experts differ from the first step;
    0 = exact copies (the upcycled model then computes the dense model's loss at step 0)."""
    capacity_factor: float = 0.0
    """0 = dropless (default). Otherwise, within [1/K, E/K], each expert takes at most ceil(cf * T * K / E) tokens
    per rank; assignments past capacity (in token order) are dropped and contribute zero."""
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
        low, high = 1 / self.top_k, self.num_experts / self.top_k
        check(self.capacity_factor == 0 or low <= self.capacity_factor <= high,
              f"moe.capacity_factor ({self.capacity_factor}) must be 0 (dropless) or within [1 / moe.top_k, "
              f"moe.num_experts / moe.top_k] = [{low:g}, {high:g}]: below, the experts have fewer slots than there are "
              f"tokens (tokens are dropped however evenly they are routed); above, every expert can take every token "
              f"(that is dropless: 0)")
        check(0 <= self.jitter < 1, f"moe.jitter ({self.jitter}) must be within [0, 1)")
        check(self.upcycle_noise >= 0, f"moe.upcycle_noise ({self.upcycle_noise}) must not be negative")
        for name in ("balance_coef", "z_loss_coef"):
            check(getattr(self, name) >= 0, f"moe.{name} ({getattr(self, name)}) must not be negative")
        self.competition.validate()
        self.baseline.validate(self.num_experts)
