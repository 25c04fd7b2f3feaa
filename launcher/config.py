"""Typed configuration: dataclasses with a docstring per field, loaded from YAML plus dotted overrides.

Every check raises `ConfigError` with a one-line message that names the field and the fix; the
command line prints it without a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from competesmoe.launcher.errors import UserError


class ConfigError(UserError):
    """A user-facing configuration problem; its message names the field and how to fix it."""


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
    dropout: float = 0.0
    """Dropout on attention and residual branches."""


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
    router: Literal["smoe", "competesmoe", "xmoe", "stablemoe", "smoe_dropout"] = "competesmoe"
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


@dataclass
class DataConfig:
    path: str | None = None
    """Raw text file (.txt, .xml, or .bz2/.gz of them). null = the bundled Wikipedia fragment."""
    tokenizer: Literal["byte", "sentencepiece"] = "byte"
    """'byte': one token per byte (bits per character, enwik8 convention); 'sentencepiece': trained by prepare."""
    spm_model_type: Literal["bpe", "unigram"] = "bpe"
    """SentencePiece model type when tokenizer = sentencepiece."""
    vocab_size: int = 8000
    """SentencePiece vocabulary size (ignored for byte level, which has 256)."""
    prepared_dir: str | None = None
    """Where prepare writes the .bin/.idx splits; null = <output_dir>/data."""


@dataclass
class TrainConfig:
    max_steps: int = 300
    """Optimizer steps to train."""
    micro_batch_size: int = 8
    """Sequences per rank per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""
    warmup_steps: int = 20
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    beta2: float = 0.99
    """AdamW beta2 (beta1 is 0.9)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision (bf16 uses DeepSpeed's bf16 mode)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0, 1 or 2."""
    seed: int = 1234
    """Seed of weights, data order and the competition schedule."""
    log_every: int = 10
    """Write a train record to metrics.jsonl and TensorBoard every N steps."""
    eval_every: int = 100
    """Evaluate on the valid split every N steps (0: only at the end)."""
    eval_batches: int = 8
    """Micro-batches per rank in one evaluation."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep."""
    max_nonfinite_steps: int = 3
    """A step with a non-finite loss or gradient is skipped; stop after this many in a row."""


@dataclass
class ParallelConfig:
    expert_parallel_size: int = 1
    """Ranks one MoE layer's experts are spread over (EP); must divide moe.num_experts and the world size."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = nccl on CUDA, gloo otherwise."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available, else cpu."""
    threads_per_rank: int = 1
    """Intra-op threads per rank (torch.set_num_threads)."""
    activation_checkpointing: Literal["none", "experts", "full"] = "none"
    """Recompute activations in backward instead of keeping them: 'experts' the experts' hidden layers, one
    expert at a time (the largest activations of an MoE model, above all on competition steps; costs one extra
    input projection), 'full' every transformer block (the least memory, about one extra forward)."""


@dataclass
class Config:
    output_dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, tensorboard/, checkpoints/."""
    resume: str = "none"
    """'none': start fresh (refuses a directory holding another run); 'auto': continue from the newest checkpoint."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The Transformer."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """The MoE layers and their routing."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and tokenizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and logging."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Distributed layout."""


# ---------------------------------------------------------------------------------------------
# Building dataclasses from dictionaries, with errors that name the field.


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where} = {value!r} is not one of {_type_name(tp)}; set {where} to one of them")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in get_args(tp):
            return None
        inner = [a for a in get_args(tp) if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of fields, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where} = {value!r} has the wrong type; expected {_type_name(tp)}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else f"; known: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{where}'{hint}")
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=3' -> ('a.b', 3); the value is parsed as YAML so numbers and booleans keep their type."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.max_steps=40)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply dotted overrides, build and validate the typed Config."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/tiny-cpu.yaml")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            line = getattr(getattr(err, "problem_mark", None), "line", None)
            raise ConfigError(f"{path} is not valid YAML" + (f" (line {line + 1})" if line is not None else "")) from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections at top level")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Cross-field checks that a single field's type cannot express."""
    m, moe, t, c, p = cfg.model, cfg.moe, cfg.train, cfg.moe.competition, cfg.parallel
    for name, value in [("model.d_model", m.d_model), ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
                        ("model.seq_len", m.seq_len), ("moe.num_experts", moe.num_experts), ("moe.top_k", moe.top_k),
                        ("moe.expert_hidden", moe.expert_hidden), ("model.dense_hidden", m.dense_hidden),
                        ("train.max_steps", t.max_steps), ("train.micro_batch_size", t.micro_batch_size),
                        ("train.grad_accum", t.grad_accum), ("parallel.expert_parallel_size", p.expert_parallel_size),
                        ("parallel.threads_per_rank", p.threads_per_rank), ("train.eval_batches", t.eval_batches),
                        ("train.log_every", t.log_every), ("train.keep_checkpoints", t.keep_checkpoints),
                        ("train.max_nonfinite_steps", t.max_nonfinite_steps)]:
        _check(value >= 1, f"{name} ({value}) must be at least 1")
    _check(m.d_model % m.n_heads == 0, f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    _check(m.positions != "rotary" or (m.d_model // m.n_heads) % 2 == 0,
           f"rotary positions need an even head size; model.d_model / model.n_heads = {m.d_model // m.n_heads}")
    _check(moe.top_k <= moe.num_experts, f"moe.top_k ({moe.top_k}) must not exceed moe.num_experts ({moe.num_experts})")
    _check(0.0 <= c.rate <= 1.0, f"moe.competition.rate ({c.rate}) must be within [0, 1]")
    _check(0.0 <= c.warmup <= 1.0, f"moe.competition.warmup ({c.warmup}) must be a fraction of steps within [0, 1]")
    _check(c.cap >= 1, f"moe.competition.cap ({c.cap}) must be at least 1")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout ({m.dropout}) must be within [0, 1)")
    _check(t.lr > 0, f"train.lr ({t.lr}) must be positive")
    _check(t.warmup_steps >= 0, f"train.warmup_steps ({t.warmup_steps}) must not be negative")
    _check(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio ({t.min_lr_ratio}) must be within [0, 1]")
    _check(t.grad_clip >= 0, f"train.grad_clip ({t.grad_clip}) must not be negative (0 disables clipping)")
    _check(t.eval_every >= 0 and t.checkpoint_every >= 0, "train.eval_every and train.checkpoint_every must not be negative")
    _check(t.zero_stage in (0, 1, 2), f"train.zero_stage ({t.zero_stage}) must be 0, 1 or 2")
    _check(moe.capacity_factor >= 0, f"moe.capacity_factor ({moe.capacity_factor}) must be 0 (dropless) or positive")
    _check(moe.jitter >= 0 and moe.jitter < 1, f"moe.jitter ({moe.jitter}) must be within [0, 1)")
    for name in ("balance_coef", "z_loss_coef"):
        _check(getattr(moe, name) >= 0, f"moe.{name} ({getattr(moe, name)}) must not be negative")
    for name in ("router_loss_coef", "hybrid_coef", "diversity_coef", "balance_coef"):
        _check(getattr(c, name) >= 0, f"moe.competition.{name} ({getattr(c, name)}) must not be negative")
    validate_baseline(moe)
    _check(moe.router != "stablemoe" or (t.zero_stage == 0 and t.precision == "fp32"),
           f"moe.router = 'stablemoe' needs train.zero_stage 0 and train.precision fp32 (got {t.zero_stage}, "
           f"{t.precision}): its stage 2 freezes the distilled router by giving it no gradient, and DeepSpeed's "
           f"ZeRO 1/2 and bf16 optimizers keep moving it with Adam's momentum")
    _check(moe.num_experts % p.expert_parallel_size == 0,
           f"moe.num_experts ({moe.num_experts}) must be divisible by parallel.expert_parallel_size ({p.expert_parallel_size})")
    _check(cfg.resume == "none" or cfg.resume == "auto" or Path(cfg.resume).exists(),
           f"resume = {cfg.resume!r}: use 'none', 'auto' or an existing checkpoint directory")
    _check(cfg.data.tokenizer == "byte" or cfg.data.vocab_size >= 512,
           f"data.vocab_size ({cfg.data.vocab_size}) must be at least 512 for sentencepiece "
           f"(byte fallback takes 256 pieces plus the corpus's characters)")


def validate_baseline(moe: MoEConfig) -> None:
    b = moe.baseline
    _check(b.xmoe_dim >= 1, f"moe.baseline.xmoe_dim ({b.xmoe_dim}) must be at least 1")
    _check(b.xmoe_temperature >= 0.01, f"moe.baseline.xmoe_temperature ({b.xmoe_temperature}) must be at least 0.01")
    _check(0.0 <= b.stablemoe_stage1 <= 1.0,
           f"moe.baseline.stablemoe_stage1 ({b.stablemoe_stage1}) must be a fraction of train.max_steps within [0, 1]")
    _check(b.stablemoe_dim >= 1, f"moe.baseline.stablemoe_dim ({b.stablemoe_dim}) must be at least 1")
    _check(b.stablemoe_distill_coef >= 0,
           f"moe.baseline.stablemoe_distill_coef ({b.stablemoe_distill_coef}) must not be negative")
    k_end = b.dropout_k_end or moe.num_experts
    _check(1 <= b.dropout_k_start <= moe.num_experts,
           f"moe.baseline.dropout_k_start ({b.dropout_k_start}) must be within [1, moe.num_experts ({moe.num_experts})]")
    _check(b.dropout_k_end >= 0 and k_end <= moe.num_experts,
           f"moe.baseline.dropout_k_end ({b.dropout_k_end}) must be within [0, moe.num_experts ({moe.num_experts})] "
           f"(0 = all experts)")
    _check(k_end >= b.dropout_k_start,
           f"moe.baseline.dropout_k_end ({k_end}) must not be below moe.baseline.dropout_k_start ({b.dropout_k_start})")


def validate_world(cfg: Config, world_size: int) -> None:
    """Checks that need the number of ranks, made once the launcher has told us."""
    ep = cfg.parallel.expert_parallel_size
    _check(world_size % ep == 0,
           f"world size ({world_size} ranks) must be divisible by parallel.expert_parallel_size ({ep}); "
           f"launch a multiple of {ep} ranks or lower the EP size")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
