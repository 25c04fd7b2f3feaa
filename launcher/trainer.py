"""The Trainer: builds model, data and the DeepSpeed engine from a Config, and runs steps.

Process groups come in explicitly (a ParallelGroups); nothing here reads them from globals.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from competesmoe.common.errors import UserError
from competesmoe.data.loader import open_train_data
from competesmoe.data.meta import load_meta
from competesmoe.data.tokenizer import quality
from competesmoe.launcher.config import Config
from competesmoe.launcher.hardware import device_peak_tflops
from competesmoe.launcher.init_from import apply_init_from
from competesmoe.launcher.metrics import RoutingStats
from competesmoe.moe.flops import training_flops_per_token
from competesmoe.moe.model import TransformerLM
from competesmoe.moe.routing import RoutingContext
from competesmoe.moe.schedule import CompetitionSchedule
from competesmoe.parallel import collectives
from competesmoe.parallel.deepspeed.clipping import clip_grad_norm_ep
from competesmoe.parallel.deepspeed.config import engine_config
from competesmoe.parallel.deepspeed.engine import make_engine
from competesmoe.parallel.groups import ParallelGroups
from competesmoe.parallel.parallelize import parallelize


def lr_lambda(cfg: Config):
    """Linear warm-up, then cosine decay to min_lr_ratio at max_steps (a factor of train.lr)."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed engine's config for this run (parallel/deepspeed/config.py: ours plus the user's fragment)."""
    t = cfg.train
    return engine_config(micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, grad_clip=t.grad_clip,
                         zero_stage=t.zero_stage, precision=t.precision, parallel=cfg.parallel)


def adamw_options(impl: str, device: torch.device) -> dict:
    """torch.optim.AdamW's implementation switches for train.optimizer_impl on this device."""
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "default"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False},
            "default": {}}[impl]


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on the compute device. CUDA: through pinned memory, without waiting (a pageable copy would
    wait for every kernel queued before it)."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (including stacked experts); not norms or the router (it is a distribution)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or "router" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class StepResult:
    """One optimizer step, as train_step leaves it: host figures, and the loss still on the device (`Trainer.record`
    makes the logged record, on log steps only)."""

    step: int
    lm_loss: torch.Tensor
    """This rank's mean LM loss over the step's micro-batches (fp32, on the compute device)."""
    lr: float
    grad_norm: float | None
    competing_layers: list[int]
    skipped: bool
    nonfinite_layers: list[int]


@dataclass
class Interval:
    """The steps since the last record, for the next record's averages: their time and competing layers."""

    seconds: float = 0.0
    """train_step's wall time, summed. Each step ends waiting for its gradient norm, so on a GPU this covers the
    kernels too, not only their launch."""
    steps: int = 0
    competing_layers: float = 0.0
    """Summed over the steps (each: competing layers averaged over its micro-batches)."""

    def add_step(self, seconds: float, competing_layers: float) -> None:
        self.seconds += seconds
        self.steps += 1
        self.competing_layers += competing_layers

    def take(self) -> tuple[float, float]:
        """(seconds per step, competing layers per step) since the last take; starts the next interval."""
        steps = max(self.steps, 1)
        per_step = (self.seconds / steps, self.competing_layers / steps)
        self.seconds, self.steps, self.competing_layers = 0.0, 0, 0.0
        return per_step


class Trainer:
    def __init__(self, cfg: Config, groups: ParallelGroups, device: torch.device, data_dir: Path):
        import deepspeed

        self.cfg = cfg
        self.groups = groups
        self.device = device
        self.data_dir = data_dir
        self.meta = load_meta(data_dir)
        self.step = 0
        self.nonfinite_streak = 0

        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        with torch.device("cpu"):  # drawn on the host, the same on every device; the engine moves them
            model = TransformerLM(cfg.model, cfg.moe, vocab_size=self.meta["tokenizer"]["vocab_size"])
        self.num_moe_layers = len(model.moe_layers)
        init_sampler_state = apply_init_from(cfg, model, self.meta["tokenizer"], groups.rank, device)  # model.init_from
        model = parallelize(model, groups, gather=cfg.moe.competition.gather,
                            activation_checkpointing=cfg.parallel.activation_checkpointing)
        ds_config = deepspeed_config(cfg)
        groups_wd = param_groups(model, cfg.train.weight_decay)
        if self.num_moe_layers:  # expert gradients reduced over the expert-data-parallel group
            # Expert params are tagged even at EP 1 so checkpoints always store experts one way.
            self.engine, self.optimizer, self.scheduler = make_engine(
                model, ds_config, groups.ep_size, cfg.moe.num_experts, self._make_optimizer,
                param_groups=groups_wd, lr_scheduler=self._make_scheduler)
        else:
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=self._make_optimizer(groups_wd), lr_scheduler=self._make_scheduler, config=ds_config)
        # Per-rank streams for dropout and router jitter, distinct between ranks.
        seed_everything(cfg.train.seed + 1000 * (groups.rank + 1))

        self.schedule = CompetitionSchedule(cfg.moe.competition, cfg.train.seed, cfg.train.max_steps,
                                            self.num_moe_layers, enabled=cfg.moe.competes)
        t = cfg.train
        self.data = open_train_data(cfg.data, data_dir, cache_dir=Path(cfg.output_dir) / "gpt_index_cache",
                                    seq_len=cfg.model.seq_len, micro_batch_size=t.micro_batch_size,
                                    dp_rank=groups.rank, dp_size=groups.dp_size, seed=t.seed,
                                    train_samples=t.max_steps * t.grad_accum * t.micro_batch_size * groups.dp_size,
                                    eval_samples=t.eval_batches * t.micro_batch_size * groups.dp_size)
        self.sampler = self.data.sampler
        if init_sampler_state is not None:  # model.init_from_data: continue
            self.sampler.load_state_dict(init_sampler_state)
        self.routing_stats = RoutingStats()
        self.nan_steps = injected_nan_steps()
        self.peak_tflops, self.peak_source = device_peak_tflops(cfg.train.peak_tflops, device, cfg.train.precision)
        self.since_record = Interval()

    def _make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.cfg))

    def _make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        t = self.cfg.train
        return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, t.beta2), eps=1e-8,
                                 **adamw_options(t.optimizer_impl, self.device))

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum * self.groups.dp_size * self.cfg.model.seq_len

    # ------------------------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum micro-batches.

        A non-finite loss or gradient anywhere makes the whole step a no-op on every rank (ZeRO 1/2:
        DeepSpeed's overflow check; ZeRO 0: our global norm, identical on all ranks). Nothing here waits for the
        device per micro-batch: the loss and the routing figures stay there (`record` reads them on log steps);
        the one wait per step is the skip decision on the gradient norm.
        """
        self.engine.train()
        start = time.perf_counter()
        compete = self.schedule.layers_at(self.step)
        skipped_before = self.engine.skipped_steps
        lm_loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_norm, competing, moe_auxes = None, 0, []
        for micro in range(self.cfg.train.grad_accum):
            if self.cfg.moe.competition.variant == "v1":
                compete = self.schedule.layers_at(self.step, micro)
            competing += len(compete)
            inputs_BS, targets_BS = (to_device(t, self.device) for t in self.sampler.next_batch())
            out = self.engine(inputs_BS, targets_BS, compete, self.routing_context())
            loss = out.loss if self.step + 1 not in self.nan_steps else out.loss * float("nan")
            self.engine.backward(loss)
            if self.engine.is_gradient_accumulation_boundary() and self.cfg.train.zero_stage == 0:
                grad_norm = self._clip_zero0()
            self.engine.step()
            lm_loss_sum += out.lm_loss.detach()
            self.routing_stats.add(out.moe_aux, out.lm_loss)
            moe_auxes.append(out.moe_aux)  # read only if the step is skipped (which layers went non-finite)
        self.step += 1
        if self.cfg.train.zero_stage > 0:
            grad_norm = self.engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        skipped = self.engine.skipped_steps > skipped_before or not math.isfinite(grad_norm or 0.0)
        bad_layers = set().union(*(nonfinite_layers(aux) for aux in moe_auxes)) if skipped else set()
        self._count_nonfinite(skipped, bad_layers)
        self.since_record.add_step(time.perf_counter() - start, competing / self.cfg.train.grad_accum)
        return StepResult(step=self.step, lm_loss=(lm_loss_sum / self.cfg.train.grad_accum).float(),
                          lr=self.scheduler.get_last_lr()[0],
                          grad_norm=grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                          competing_layers=sorted(compete), skipped=skipped, nonfinite_layers=sorted(bad_layers))

    def record(self, result: StepResult) -> dict:
        """The metrics.jsonl record of a step: its loss averaged over the ranks (collective: every rank calls it on
        the same steps; its host copy is the one wait for the loss), throughput and MFU averaged over the steps since
        the previous record."""
        lm_loss = collectives.all_reduce_(result.lm_loss.clone(), self.device, group=self.groups.dp)
        loss = (lm_loss / self.groups.dp_size).item()
        elapsed, competing_layers = self.since_record.take()
        return {
            "step": result.step,
            "split": "train",
            "loss": loss,
            **self._quality(loss),
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": self.tokens_per_step / elapsed,
            **self._utilisation(elapsed, competing_layers),
            "competing_layers": result.competing_layers,
            "skipped": result.skipped,
            **({"nonfinite_layers": result.nonfinite_layers} if result.nonfinite_layers else {}),
        }

    def _utilisation(self, elapsed: float, competing_layers: float) -> dict:
        """Model FLOPs per token of this step (moe/flops.py: no recomputation), what one device achieved, and MFU."""
        flops_per_token = training_flops_per_token(self.cfg.model, self.cfg.moe, self.meta["tokenizer"]["vocab_size"],
                                                   competing_layers)
        achieved = flops_per_token * self.tokens_per_step / self.groups.world_size / elapsed / 1e12
        return {"model_flops_per_token": flops_per_token, "tflops_per_device": achieved,
                "mfu": achieved / self.peak_tflops}

    def _count_nonfinite(self, skipped: bool, bad_layers: set[int]) -> None:
        self.nonfinite_streak = self.nonfinite_streak + 1 if skipped else 0
        if self.nonfinite_streak >= self.cfg.train.max_nonfinite_steps:
            where = f" (MoE layers {sorted(bad_layers)})" if bad_layers else ""
            raise UserError(f"stopping: {self.nonfinite_streak} steps in a row up to step {self.step} had a non-finite "
                            f"loss or gradient{where}; nothing was saved from them; lower train.lr or raise "
                            f"train.max_nonfinite_steps, then resume=auto from the last good checkpoint")

    def _clip_zero0(self) -> float:
        """ZeRO 0: the global gradient norm (each expert counted once), clipping, and the skip of a
        non-finite step."""
        norm = float(clip_grad_norm_ep(self.engine.module, self.cfg.train.grad_clip, self.device))
        self._make_step_a_skip(not math.isfinite(norm))
        return norm

    def _make_step_a_skip(self, skip: bool) -> None:
        """ZeRO 0: turn the coming engine.step() into a skip that DeepSpeed counts and that holds the LR schedule.
        fp32 (torch AdamW): AdamW leaves parameters without a gradient alone, and the engine reads
        `optimizer.overflow` as it does from its own optimizers. bf16 (DeepSpeed's wrapper): the wrapper turns a
        missing gradient into zeros, which Adam's momentum would still apply, so it gets non-finite gradients
        instead and its own overflow check skips the step on every rank."""
        plain_torch = isinstance(self.engine.optimizer, torch.optim.Optimizer)
        if plain_torch:
            self.engine.optimizer.overflow = skip
        for param in self.engine.module.parameters() if skip else ():
            if plain_torch:
                param.grad = None
            elif param.grad is not None:
                param.grad.fill_(float("nan"))

    def _quality(self, nats: float) -> dict:
        return quality(nats, self.meta["tokenizer"]["kind"])

    def routing_context(self) -> RoutingContext:
        """What the routing policies may depend on: the step (StableMoE's stage, SMoE-Dropout's K)."""
        return RoutingContext(step=self.step, total_steps=self.cfg.train.max_steps)

    @torch.no_grad()
    def evaluate(self, split: str) -> dict:
        """Mean next-token loss on a split (never competes); every rank runs the same batch count."""
        self.engine.eval()
        t = self.cfg.train
        nats_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        for inputs_BS, targets_BS in self.data.eval_batches(split, t.eval_batches):
            out = self.engine(to_device(inputs_BS, self.device), to_device(targets_BS, self.device), frozenset(),
                              self.routing_context())
            nats_sum += out.lm_loss.double() * targets_BS.numel()
            tokens += targets_BS.numel()
        total = torch.stack([nats_sum, torch.full((), float(tokens), dtype=torch.float64, device=self.device)])
        collectives.all_reduce_(total, self.device, group=self.groups.dp)
        nats = (total[0] / total[1].clamp_min(1)).item()
        return {"step": self.step, "split": split, "loss": nats, **self._quality(nats)}

    def take_routing_stats(self) -> list[dict]:
        return self.routing_stats.reduce(self.groups.dp, self.device)

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The trainer's own state (the engine, sampler and RNG are checkpointed by launcher.checkpoint)."""
        return {"step": self.step, "nonfinite_streak": self.nonfinite_streak}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.nonfinite_streak = state["nonfinite_streak"]


FAULT_NAN_STEPS = "COMPETESMOE_FAULT_NAN_STEPS"
"""Fault injection for tests: comma-separated optimizer steps (1-based) whose loss is made NaN."""


def injected_nan_steps() -> frozenset[int]:
    """The steps COMPETESMOE_FAULT_NAN_STEPS names, read once at start-up (never in the step loop)."""
    return frozenset(int(s) for s in os.environ.get(FAULT_NAN_STEPS, "").split(",") if s.strip().isdigit())


def nonfinite_layers(moe_aux) -> set[int]:
    return {i for i, aux in enumerate(moe_aux)
            if not torch.isfinite(aux.loss) or any(not torch.isfinite(v).all() for v in aux.stats.values())}


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
