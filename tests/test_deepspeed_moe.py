"""DeepSpeed engine + our stacked-expert MoE: gradients/updates equal EP=1, for ZeRO 0/1/2 (fp32),
bf16 ZeRO 0/1/2, grad clipping, and checkpoint save/load. Real gloo ranks via torch.multiprocessing;
one process set per (world size, ep size), reused across all cases."""

from __future__ import annotations

import glob
import os
import tempfile

import pytest
import torch
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from competesmoe.common.net import free_port

pytestmark = pytest.mark.slow  # real training runs / launchers: see tests/conftest.py

D, FH, E, C = 4, 3, 4, 2  # d_model, expert hidden, global experts, tokens per (rank, expert)
T = E * C  # tokens per rank
LR, MOMENTUM = 0.5, 0.9


# ----------------------------------------------------------------------------- toy model


class ToyExperts(nn.Module):
    def __init__(self, e_local: int):
        super().__init__()
        self.w_in_EDF = nn.Parameter(torch.zeros(e_local, D, FH))
        self.w_out_EFD = nn.Parameter(torch.zeros(e_local, FH, D))


class ToyMoE(nn.Module):
    """h = x @ w_dense; each token goes to one expert (exactly C tokens per expert per rank);
    y = h + expert(h). Expert-parallel dispatch is a real autograd all-to-all over the EP group."""

    def __init__(self, e_local: int):
        super().__init__()
        self.w_dense = nn.Parameter(torch.zeros(D, D))
        self.experts = ToyExperts(e_local)

    def forward(self, x_TD, order_T, ep_group, ep_size):
        h_TD = x_TD @ self.w_dense.to(x_TD.dtype)
        send = h_TD[order_T]  # sorted by global expert: [E*C, D]
        if ep_size > 1:
            recv = funcol.all_to_all_single_autograd(send, None, None, ep_group)
        else:
            recv = send
        e_local = E // ep_size
        x_ESD = recv.view(ep_size, e_local, C, D).transpose(0, 1).reshape(e_local, ep_size * C, D)
        w_in, w_out = self.experts.w_in_EDF, self.experts.w_out_EFD
        o_ESD = torch.bmm(F.gelu(torch.bmm(x_ESD, w_in.to(x_ESD.dtype))), w_out.to(x_ESD.dtype))
        back = o_ESD.view(e_local, ep_size, C, D).transpose(0, 1).reshape(ep_size * e_local * C, D)
        if ep_size > 1:
            back = funcol.all_to_all_single_autograd(back.contiguous(), None, None, ep_group)
        out = torch.empty_like(back)
        out[order_T] = back
        return h_TD + out


def full_init():
    g = torch.Generator().manual_seed(0)
    return {
        "w_dense": torch.randn(D, D, generator=g) * 0.5 + torch.eye(D),
        "experts.w_in_EDF": torch.randn(E, D, FH, generator=g) * 0.5,
        "experts.w_out_EFD": torch.randn(E, FH, D, generator=g) * 0.5,
    }


def rank_data(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(T, D, generator=g)
    target = torch.randn(T, D, generator=g)
    expert_T = torch.randperm(T, generator=g) % E  # balanced: C tokens per expert
    order_T = torch.argsort(expert_T, stable=True)
    # Rank-dependent loss weight: a plain mean would hide a wrong per-rank scale.
    weight = 1.0 + 0.5 * rank
    return x, target, order_T, weight


def local_loss(model, rank, step, ep_group, ep_size, dtype=torch.float32):
    x, target, order_T, weight = rank_data(rank, step)
    y = model(x.to(dtype), order_T, ep_group, ep_size).float()
    return weight * ((y - target) ** 2).mean()


def reference(world: int, steps: int, clip: float = 0.0):
    """EP=1, single process: loss = mean over ranks of the per-rank losses; torch SGD."""
    model = ToyMoE(E)
    model.load_state_dict(full_init())
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    states = []
    for step in range(steps):
        opt.zero_grad()
        loss = sum(local_loss(model, r, step, None, 1) for r in range(world)) / world
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def local_slice(full: dict, ep_rank: int, e_local: int) -> dict:
    s = slice(ep_rank * e_local, (ep_rank + 1) * e_local)
    return {k: (v[s] if k.startswith("experts.") else v).clone() for k, v in full.items()}


# ----------------------------------------------------------------------------- worker


def _config(stage: int, bf16: bool = False, clip: float = 0.0):
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # torch SGD under ZeRO 1/2
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def _close(a, b, what, rtol=1e-5, atol=1e-6):
    a, b = a.float(), b.float()
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        raise AssertionError(f"{what}: max abs diff {(a - b).abs().max().item():.3e}\n{a}\n{b}")


def _worker(rank, world, ep, port, tmpdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import logging

    import deepspeed
    from deepspeed.utils import logger as ds_logger

    from competesmoe.parallel.deepspeed import clipping, expert_files
    from competesmoe.parallel.deepspeed import engine as dse
    from competesmoe.parallel.deepspeed.safe_load import SafeTorchCheckpointEngine

    ds_logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    g = dse.ensure_expert_groups(ep)
    assert g.ep_rank == rank % ep and g.edp_rank == rank // ep
    e_local = E // ep
    full = full_init()

    def new_engine(stage, bf16=False, clip=0.0, init=None):
        model = ToyMoE(e_local)
        model.load_state_dict(local_slice(init or full, g.ep_rank, e_local))
        engine, _, _ = dse.make_engine(model, _config(stage, bf16, clip), ep, E,
                                       lambda groups: torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM))
        return engine

    def train_step(engine, step, dtype=torch.float32, our_clip=0.0):
        loss = local_loss(engine, rank, step, g.ep_group, ep, dtype)
        engine.backward(loss)
        if our_clip:
            clipping.clip_grad_norm_ep(engine.module, our_clip)
        engine.step()

    def check(engine, ref_state, what, **tol):
        mine = engine.module.state_dict()
        for k, v in local_slice(ref_state, g.ep_rank, e_local).items():
            _close(mine[k], v, f"rank {rank} ep {ep} {what} {k}", **tol)

    ref = reference(world, 3)

    # 1) fp32 ZeRO 0/1/2: two SGD+momentum steps equal EP=1.
    for stage in (0, 1, 2):
        engine = new_engine(stage)
        assert engine.has_moe_layers
        for step in range(2):
            train_step(engine, step)
            check(engine, ref[step], f"zero{stage} step{step}")
        engine.destroy()

    # 2) gradient clipping (max norm well below the gradient norm, so it is active).
    clip = 0.05
    ref_clip = reference(world, 2, clip)
    for stage in (1, 2):  # DeepSpeed's own ZeRO 1/2 clipping is EP-correct
        engine = new_engine(stage, clip=clip)
        for step in range(2):
            train_step(engine, step)
            check(engine, ref_clip[step], f"zero{stage} clip step{step}")
        engine.destroy()
    engine = new_engine(0)  # ZeRO 0: our clipping, DeepSpeed's clipping off
    for step in range(2):
        train_step(engine, step, our_clip=clip)
        check(engine, ref_clip[step], f"zero0 our-clip step{step}")
    engine.destroy()

    # 3) bf16: one step, compared through the fp32 master weights against fp32 EP=1 (loose:
    #    bf16 forward). Unclipped, and clipped (ZeRO 0: our clipping; ZeRO 1/2: DeepSpeed's).
    from deepspeed.utils import safe_get_full_fp32_param

    def masters(engine):
        out = {}
        for n, p in engine.module.named_parameters():
            v = safe_get_full_fp32_param(p)
            if v is None:  # ZeRO 0 bf16: FP16_UnfusedOptimizer keeps fp32 copies per group
                v = next(f for fg, hg in zip(engine.optimizer.fp32_groups, engine.optimizer.fp16_groups)
                         for f, h in zip(fg, hg) if h is p)
            out[n] = v.detach().float().clone()
        return out

    for stage in (0, 1, 2):
        for max_norm, ref_bf in ((0.0, ref), (clip, ref_clip)):
            engine = new_engine(stage, bf16=True, clip=max_norm if stage else 0.0)
            before = masters(engine)
            train_step(engine, 0, dtype=torch.bfloat16, our_clip=max_norm if stage == 0 else 0.0)
            after = masters(engine)
            ref0 = local_slice(full, g.ep_rank, e_local)
            ref1 = local_slice(ref_bf[0], g.ep_rank, e_local)
            for k in ref1:
                d_mine, d_ref = after[k] - before[k], ref1[k] - ref0[k]
                rel = ((d_mine - d_ref).norm() / d_ref.norm()).item()
                assert rel < 0.03, f"rank {rank} bf16 zero{stage} clip {max_norm} {k}: relative update error {rel:.3f}"
            engine.destroy()

    # 4) checkpoints: save after step 0, continue; a fresh engine loading it must match exactly.
    for stage in (0, 1, 2):
        ckpt = os.path.join(tmpdir, f"ckpt_w{world}_ep{ep}_z{stage}")
        engine = new_engine(stage)
        train_step(engine, 0)
        expert_files.save_checkpoint(engine, ckpt, tag="t0")
        saved = {k: v.clone() for k, v in engine.module.state_dict().items()}
        train_step(engine, 1)
        continued = {k: v.clone() for k, v in engine.module.state_dict().items()}
        engine.destroy()

        if rank == 0:
            tagdir = os.path.join(ckpt, "t0")
            assert len(glob.glob(os.path.join(tagdir, "experts_ep*_of_*.pt"))) == ep
            assert not glob.glob(os.path.join(tagdir, "layer_*_expert_*")), os.listdir(tagdir)
            ds_model = torch.load(os.path.join(tagdir, "mp_rank_00_model_states.pt"), map_location="cpu",
                                  weights_only=True)["module"]
            assert set(ds_model) == {"w_dense"}, ds_model.keys()
            files = glob.glob(os.path.join(tagdir, "experts_ep*_of_*.pt"))
            got = expert_files.load_expert_state(tagdir, ["experts.w_in_EDF"], 0, E)["experts.w_in_EDF"]
            assert got.shape[0] == E and len(files) == ep

        zeros = {k: torch.zeros_like(v) for k, v in full.items()}
        engine = new_engine(stage, init=zeros)
        expert_files.load_checkpoint(engine, ckpt, tag="t0")
        assert isinstance(engine.checkpoint_engine, SafeTorchCheckpointEngine)  # DeepSpeed's files: weights-only
        for k, v in engine.module.state_dict().items():
            _close(v, saved[k], f"rank {rank} zero{stage} loaded {k}", rtol=0, atol=0)
        train_step(engine, 1)
        for k, v in engine.module.state_dict().items():
            _close(v, continued[k], f"rank {rank} zero{stage} resumed {k}", rtol=0, atol=0)
        engine.destroy()

        # module-only load (fresh optimizer): params restored, fp32 masters refreshed.
        engine = new_engine(stage, init=zeros)
        expert_files.load_checkpoint(engine, ckpt, tag="t0", load_module_only=True)
        for k, v in engine.module.state_dict().items():
            _close(v, saved[k], f"rank {rank} zero{stage} module-only {k}", rtol=0, atol=0)
        train_step(engine, 1)  # would pull rank-0 experts back in if the masters were stale
        fresh = reference_from(saved, world, rank, g, e_local, step=1)
        for k, v in engine.module.state_dict().items():
            _close(v, fresh[k], f"rank {rank} zero{stage} module-only step {k}")
        engine.destroy()

    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def reference_from(saved_local, world, rank, g, e_local, step):
    """EP=1 SGD step (fresh momentum) from the saved state, gathered across ranks; local slice."""
    import torch.distributed as dist
    pieces = {}
    for k, v in saved_local.items():
        if k.startswith("experts."):
            out = [torch.empty_like(v) for _ in range(dist.get_world_size())]
            dist.all_gather(out, v.contiguous())
            # ranks r with r % ep == i hold experts of EP rank i; take one copy per EP rank
            ep = len(g.ep_ranks)
            pieces[k] = torch.cat([out[i] for i in range(ep)])
        else:
            pieces[k] = v
    model = ToyMoE(E)
    model.load_state_dict(pieces)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loss = sum(local_loss(model, r, step, None, 1) for r in range(world)) / world
    loss.backward()
    opt.step()
    return local_slice(model.state_dict(), g.ep_rank, e_local)


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2)])
def test_deepspeed_engine_matches_ep1(world, ep):
    with tempfile.TemporaryDirectory() as tmpdir:
        mp.spawn(_worker, args=(world, ep, free_port(), tmpdir), nprocs=world, join=True)


def test_load_expert_state_reshards(tmp_path):
    """Expert files saved at one EP size assemble any rank's slice at another EP size."""
    from competesmoe.parallel.deepspeed import engine as dse
    from competesmoe.parallel.deepspeed import expert_files

    full = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    for ep_rank in range(2):  # saved with ep 2: 4 experts per file
        torch.save({"num_experts": 8, "ep_size": 2, "ep_rank": ep_rank, "expert_start": 4 * ep_rank,
                    "num_local_experts": 4, "params": {"experts.w": full[4 * ep_rank:4 * ep_rank + 4].clone()}},
                   tmp_path / f"experts_ep{ep_rank:03d}_of_002.pt")
    for ep in (1, 2, 4, 8):
        k = 8 // ep
        for r in range(ep):
            got = expert_files.load_expert_state(str(tmp_path), ["experts.w"], r * k, k)["experts.w"]
            assert torch.equal(got, full[r * k:(r + 1) * k])
    with pytest.raises(RuntimeError, match="not found"):
        expert_files.load_expert_state(str(tmp_path), ["experts.w"], 6, 4)
    with pytest.raises(ValueError, match="clipping"):
        dse.check_config({"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0})
    with pytest.raises(ValueError, match="contiguous"):
        dse.check_config({"zero_optimization": {"stage": 1, "contiguous_gradients": False}})
    dse.check_config({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0})


class Payload:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_safe_load_refuses_code_and_reads_deepspeed_s_objects(tmp_path):
    """What DeepSpeed's ZeRO optimizer files hold besides tensors loads weights-only; an object whose unpickling
    runs code is refused, naming the file, and never runs (the same file does run it when loaded unsafely)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from competesmoe.parallel.deepspeed.safe_load import SafeTorchCheckpointEngine, UnsafeCheckpointFile, safe_load

    zero_like = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                 "fragment": fragment_address(numel=3, start=4), "w": torch.ones(2)}
    torch.save(zero_like, tmp_path / "zero.pt")
    loaded = SafeTorchCheckpointEngine().load(str(tmp_path / "zero.pt"))
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and loaded["fragment"] == fragment_address(3, 4)
    assert loaded["loss_scaler"].cur_scale == 1.0 and torch.equal(loaded["w"], torch.ones(2))

    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "x": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointFile, match=f"{tmp_path / 'evil.pt'} holds the Python object exec"):
        safe_load(tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointFile):
        SafeTorchCheckpointEngine().load(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the control: unsafe loading runs it
    assert marker.exists()
