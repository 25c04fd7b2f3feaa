"""The Trainer: builds model, data and the DeepSpeed engine from a Config, and runs steps.

Process groups come in explicitly (a ParallelGroups); nothing here reads them from globals.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from competesmoe.common.errors import UserError, is_peer_failure
from competesmoe.data.loader import open_train_data
from competesmoe.data.meta import load_meta
from competesmoe.data.tokenizer import quality
from competesmoe.launcher import checkpoint
from competesmoe.launcher.config import Config, to_dict
from competesmoe.launcher.hardware import device_peak_tflops
from competesmoe.launcher.metrics import RoutingStats
from competesmoe.moe.flops import training_flops_per_token
from competesmoe.moe.model import TransformerLM
from competesmoe.moe.routing import RoutingContext
from competesmoe.moe.schedule import CompetitionSchedule
from competesmoe.parallel import deepspeed_moe
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
        model = parallelize(model, groups, gather=cfg.moe.competition.gather,
                            activation_checkpointing=cfg.parallel.activation_checkpointing)
        ds_config = deepspeed_config(cfg)
        groups_wd = param_groups(model, cfg.train.weight_decay)
        if self.num_moe_layers:  # expert gradients reduced over the expert-data-parallel group
            # Expert params are tagged even at EP 1 so checkpoints always store experts one way.
            self.engine, self.optimizer, self.scheduler = deepspeed_moe.make_engine(
                model, ds_config, groups.ep_size, cfg.moe.num_experts, self._make_optimizer,
                param_groups=groups_wd, lr_scheduler=self._make_scheduler)
        else:
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=self._make_optimizer(groups_wd), lr_scheduler=self._make_scheduler, config=ds_config)
        self.has_experts = self.num_moe_layers > 0
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
        norm = float(deepspeed_moe.clip_grad_norm_ep(self.engine.module, self.cfg.train.grad_clip))
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
        """Trainer state beyond model/optimizer/scheduler (which DeepSpeed checkpoints)."""
        return {"step": self.step, "sampler": self.sampler.state_dict(), "nonfinite_streak": self.nonfinite_streak}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.nonfinite_streak = state["nonfinite_streak"]
        self.sampler.load_state_dict(state["sampler"])

    def rng_state(self) -> dict:
        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def load_rng_state(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def run_state(self) -> dict:
        """What a resume must check before touching tensors: layout, tokenizer, shapes."""
        return {"step": self.step, "world_size": self.groups.world_size, "ep_size": self.groups.ep_size,
                "zero_stage": self.cfg.train.zero_stage, "optimizer_kind": self.optimizer_kind,
                "tokenizer": self.meta["tokenizer"],
                "config": to_dict(self.cfg)}

    def save_checkpoint(self, ckpt_root: Path) -> str:
        """Write aside, then publish atomically (launcher.checkpoint). Collective."""
        self._refuse_nonfinite_weights()
        self._refuse_full_disk(ckpt_root)
        try:
            return self._save_checkpoint(ckpt_root)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
            if is_peer_failure(err):  # a dead peer, not a write failure: leave its staged files alone
                raise
            shutil.rmtree(ckpt_root / checkpoint.STAGING / checkpoint.tag_for(self.step), ignore_errors=True)
            raise UserError(f"saving the step-{self.step} checkpoint under {ckpt_root} failed "
                            f"({getattr(err, 'strerror', None) or str(err).splitlines()[0][:120]}); the previous "
                            f"checkpoint is kept; free space or choose another output_dir") from None

    def _refuse_full_disk(self, ckpt_root: Path) -> None:
        """Weights plus two Adam moments, twice over (DeepSpeed's files and ours), must fit."""
        need = 5 * sum(p.numel() * p.element_size() for p in self.engine.module.parameters())
        ckpt_root.mkdir(parents=True, exist_ok=True)
        short = torch.tensor([float(shutil.disk_usage(ckpt_root).free < need)])
        dist.all_reduce(short, op=dist.ReduceOp.MAX)
        if short.item():
            raise UserError(f"No space left for the step-{self.step} checkpoint under {ckpt_root} (about "
                            f"{need / 2**20:.0f} MiB per rank needed); the previous checkpoint is kept; free space "
                            f"or choose another output_dir")

    def _save_checkpoint(self, ckpt_root: Path) -> str:
        tag = checkpoint.tag_for(self.step)
        staging = checkpoint.prepare_staging(ckpt_root, tag, self.groups.rank)
        client_state = {"trainer": self.state_dict()}
        if self.has_experts:  # experts are written once per EP rank, outside DeepSpeed's model file
            deepspeed_moe.save_checkpoint(self.engine, str(staging), tag=tag, client_state=client_state,
                                          save_latest=False)
        else:
            self.engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False)
        self._save_named_optimizer_state(staging / tag)
        torch.save(self.rng_state(), staging / tag / f"rng_rank{self.groups.rank:05d}.pt")
        dist.barrier()
        if self.groups.rank == 0:
            checkpoint.publish(ckpt_root, tag, self.run_state(), self.cfg.train.keep_checkpoints)
        dist.barrier()
        return tag

    @property
    def optimizer_kind(self) -> str:
        """What holds the Adam state, which decides the format of the state saved by name: ZeRO 1 and 2 share
        one (DeepSpeed's partitions, fp32 masters), ZeRO 0 has one per precision."""
        t = self.cfg.train
        return "zero-partitions" if t.zero_stage > 0 else f"zero0-{t.precision}"

    def _refuse_nonfinite_weights(self) -> None:
        bad = torch.tensor([float(not all(torch.isfinite(p).all() for p in self.engine.module.parameters()))])
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise UserError(f"refusing to save a checkpoint with non-finite weights at step {self.step}; "
                            f"the last good checkpoint is kept")

    def _save_named_optimizer_state(self, tag_dir: Path) -> None:
        """Adam state by parameter name (experts sliced per EP rank) so a resume at another EP or world size
        can rebuild it; DeepSpeed's own optimizer files are tied to the layout."""
        state = deepspeed_moe.named_optimizer_state(self.engine)
        dense = {n: s for n, s in state.items() if not deepspeed_moe.is_moe_param(self._param(n))}
        if self.groups.rank == 0:
            torch.save(dense, tag_dir / "optim_dense.pt")
        if self.has_experts:
            tensors = {f"{n}:{k}": v for n, s in state.items() if n not in dense for k, v in s.items() if k != "step"}
            deepspeed_moe.write_expert_slices(self.engine.module, str(tag_dir), "optim_experts", tensors)

    def _param(self, name: str) -> torch.nn.Parameter:
        return dict(self.engine.module.named_parameters())[name]

    def _load_named_optimizer_state(self, tag_dir: Path) -> None:
        dense = torch.load(tag_dir / "optim_dense.pt", weights_only=False)
        params = dict(self.engine.module.named_parameters())
        expert_names = [n for n, p in params.items() if deepspeed_moe.is_moe_param(p)]
        state = dict(dense)
        if expert_names:
            local = self.cfg.moe.num_experts // self.groups.ep_size
            kinds = [k for k in next(iter(dense.values())) if k != "step"]  # the moments (+ fp32 under ZeRO)
            keys = [f"{n}:{k}" for n in expert_names for k in kinds]
            tensors = deepspeed_moe.load_expert_state(str(tag_dir), keys, self.groups.ep_rank * local, local,
                                                      prefix="optim_experts")
            step = next(iter(dense.values()))["step"]
            for name in expert_names:
                state[name] = {"step": step.clone(), **{k: tensors[f"{name}:{k}"] for k in kinds}}
        deepspeed_moe.load_named_optimizer_state(self.engine, state)
        # The groups' lr lives in the optimizer state DeepSpeed did not load; the restored scheduler knows it.
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def check_compatible(self, saved: dict, source: Path) -> None:
        """Refuse a checkpoint whose tokenizer or model shape differs from this run's, naming the field."""
        if saved["tokenizer"] != self.meta["tokenizer"]:
            raise UserError(f"checkpoint {source} was trained with tokenizer {saved['tokenizer']} but the data in "
                            f"{self.data_dir} uses {self.meta['tokenizer']}; use the same data.tokenizer/data.path")
        now = to_dict(self.cfg)
        for section, fields in SHAPE_FIELDS.items():
            for name in fields:
                before, after = saved["config"][section][name], now[section][name]
                if before != after:
                    raise UserError(f"{section}.{name} is {after} but checkpoint {source} was trained with {before}; "
                                    f"a resumed run keeps the model shape")

    def load_checkpoint(self, tag_dir: Path, saved: dict) -> None:
        """Resume from a verified checkpoint; a different world or EP size reshards (see `optimizer_kind`)."""
        self.check_compatible(saved, tag_dir)
        same_layout = (saved["world_size"], saved["ep_size"]) == (self.groups.world_size, self.groups.ep_size)
        if not same_layout and saved.get("optimizer_kind") != self.optimizer_kind:
            was = saved["config"]["train"]
            raise UserError(f"checkpoint {tag_dir} was saved on {saved['world_size']} ranks at EP {saved['ep_size']} "
                            f"with train.zero_stage={was['zero_stage']} train.precision={was['precision']}; to "
                            f"reshard it to {self.groups.world_size} ranks at EP {self.groups.ep_size} resume with "
                            f"the same optimizer setup (ZeRO 1 and 2 mix), or resume on the same layout")
        load = deepspeed_moe.load_checkpoint if self.has_experts else type(self.engine).load_checkpoint
        _, client_state = load(self.engine, str(tag_dir.parent), tag=tag_dir.name,
                               load_optimizer_states=same_layout)
        if not same_layout:
            self._load_named_optimizer_state(tag_dir)
        self.load_state_dict(client_state["trainer"])
        rng_file = tag_dir / f"rng_rank{self.groups.rank:05d}.pt"
        if same_layout:
            self.load_rng_state(torch.load(rng_file, weights_only=False))


SHAPE_FIELDS = {
    "model": ["d_model", "n_layers", "n_heads", "seq_len", "layout", "positions", "tie_embeddings", "dense_hidden"],
    "moe": ["num_experts", "expert_hidden", "activation"],
}


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
