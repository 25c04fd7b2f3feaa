"""The Trainer: builds model, data and the DeepSpeed engine from a Config, and runs steps.

Process groups come in explicitly (a ParallelGroups); nothing here reads them from globals.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

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
from competesmoe.parallel.deepspeed.clipping import clip_grad_norm_ep
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
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # DeepSpeed's ZeRO-0 clipping is wrong with expert parallelism: we clip ourselves there.
        "gradient_clipping": t.grad_clip if t.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


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
        model = TransformerLM(cfg.model, cfg.moe, vocab_size=self.meta["tokenizer"]["vocab_size"])
        self.num_moe_layers = len(model.moe_layers)
        init_sampler_state = apply_init_from(cfg, model, self.meta["tokenizer"], groups.rank)  # model.init_from
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

    def _make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.cfg))

    def _make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        t = self.cfg.train
        return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, t.beta2), eps=1e-8)

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum * self.groups.dp_size * self.cfg.model.seq_len

    # ------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns the step's figures.

        A non-finite loss or gradient anywhere makes the whole step a no-op on every rank (ZeRO 1/2:
        DeepSpeed's overflow check; ZeRO 0: our global norm, identical on all ranks).
        """
        self.engine.train()
        start = time.perf_counter()
        compete = self.schedule.layers_at(self.step)
        skipped_before = self.engine.skipped_steps
        lm_loss_sum, bad_layers, grad_norm, competing = 0.0, set(), None, 0
        for micro in range(self.cfg.train.grad_accum):
            if self.cfg.moe.competition.variant == "v1":
                compete = self.schedule.layers_at(self.step, micro)
            competing += len(compete)
            inputs_BS, targets_BS = (t.to(self.device) for t in self.sampler.next_batch())
            out = self.engine(inputs_BS, targets_BS, compete, self.routing_context())
            loss = out.loss if self.step + 1 not in self.nan_steps else out.loss * float("nan")
            if not torch.isfinite(loss):
                bad_layers |= nonfinite_layers(out.moe_aux)
            self.engine.backward(loss)
            if self.engine.is_gradient_accumulation_boundary() and self.cfg.train.zero_stage == 0:
                grad_norm = self._clip_zero0()
            self.engine.step()
            lm_loss_sum += out.lm_loss.detach().float().item()
            self.routing_stats.add(out.moe_aux, out.lm_loss)
        self.step += 1
        lm_loss = torch.tensor(lm_loss_sum / self.cfg.train.grad_accum)
        if dist.is_initialized():
            dist.all_reduce(lm_loss, group=self.groups.dp)
            lm_loss /= self.groups.dp_size
        elapsed = time.perf_counter() - start
        if self.cfg.train.zero_stage > 0:
            grad_norm = self.engine.get_global_grad_norm()
        skipped = self.engine.skipped_steps > skipped_before or not math.isfinite(grad_norm or 0.0)
        self._count_nonfinite(skipped, bad_layers)
        return {
            "step": self.step,
            "split": "train",
            "loss": lm_loss.item(),
            **self._quality(lm_loss.item()),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None and math.isfinite(grad_norm) else None,
            "tokens_per_s": self.tokens_per_step / elapsed,
            **self._utilisation(elapsed, competing / self.cfg.train.grad_accum),
            "competing_layers": sorted(compete),
            "skipped": skipped,
            **({"nonfinite_layers": sorted(bad_layers)} if bad_layers else {}),
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
        norm = float(clip_grad_norm_ep(self.engine.module, self.cfg.train.grad_clip))
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
        total = torch.zeros(2, dtype=torch.float64)
        for inputs_BS, targets_BS in self.data.eval_batches(split, t.eval_batches):
            out = self.engine(inputs_BS.to(self.device), targets_BS.to(self.device), frozenset(),
                              self.routing_context())
            total += torch.tensor([out.lm_loss.double().item() * targets_BS.numel(), targets_BS.numel()])
        if dist.is_initialized():
            dist.all_reduce(total, group=self.groups.dp)
        nats = (total[0] / total[1].clamp_min(1)).item()
        return {"step": self.step, "split": split, "loss": nats, **self._quality(nats)}

    def take_routing_stats(self) -> list[dict]:
        return self.routing_stats.reduce(self.groups.dp)

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
