"""Dense-to-MoE upcycling (moe/upcycle.py): the upcycled model computes the dense model's loss at step 0, on router
steps and competition steps alike; the router is fresh, the noise is per expert and reproducible, and a dense model
of another shape is refused with a message naming the fields. Through the real launcher (model.init_from, slow): at
2 ranks and EP 2 an upcycled run's first loss is the dense run's on the same batch and it trains on from there, a
resumed run restores its own checkpoint without upcycling again, and bad settings are one line."""

import shutil

import pytest
import torch

from competesmoe.common.errors import UserError
from competesmoe.moe.config import CompetitionConfig, ModelConfig, MoEConfig
from competesmoe.moe.model import TransformerLM
from competesmoe.moe.upcycle import upcycle
from support import FAST, SMALL, TINY, competesmoe, records

V, F = 40, 32


def model_cfg(layout: str, **extra) -> ModelConfig:
    return ModelConfig(d_model=16, n_layers=4, n_heads=2, seq_len=12, layout=layout, dense_hidden=F, **extra)


def pair(layout="switch", activation="gelu", variant="v2", num_experts=4, top_k=2):
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=F, activation=activation,
                    competition=CompetitionConfig(variant=variant, affinity="l2_norm" if variant == "v1" else
                                                  "softplus_mean"))
    torch.manual_seed(0)
    dense = TransformerLM(model_cfg("dense"), moe, V)
    with torch.no_grad():  # a dense model that is not at its own init: upcycling must copy, not re-initialise
        for p in dense.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(1)
    return dense, TransformerLM(model_cfg(layout), moe, V)


def losses(model: TransformerLM, compete: frozenset[int]):
    torch.manual_seed(5)
    tokens, targets = torch.randint(0, V, (3, 12)), torch.randint(0, V, (3, 12))
    model.train()
    out = model(tokens, targets, compete)
    return out.lm_loss, out.logits_BSV, [a.stats["competed"].item() for a in out.moe_aux]


@pytest.mark.parametrize("layout", ["switch", "glam"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("variant", ["v2", "v1"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_upcycled_model_computes_the_dense_loss_on_router_and_competition_steps(layout, activation, variant, top_k):
    dense, moe = pair(layout, activation, variant, top_k=top_k)
    moe.load_state_dict(upcycle(dense.state_dict(), moe))
    dense_loss, dense_logits, _ = losses(dense, frozenset())
    every_layer = frozenset(range(len(moe.moe_layers)))
    for compete in (frozenset(), every_layer):
        loss, logits, competed = losses(moe, compete)
        assert competed == [float(bool(compete))] * len(moe.moe_layers)
        torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss, dense_loss, atol=1e-6, rtol=1e-6)


def test_router_is_fresh_everything_else_is_the_dense_models_and_the_moe_model_is_untouched():
    dense, moe = pair("glam")
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    state = upcycle(dense.state_dict(), moe)
    assert all(torch.equal(v, moe.state_dict()[k]) for k, v in before.items()), "upcycle must not change moe_model"
    dense_state = dense.state_dict()
    for name, tensor in state.items():
        if ".router." in name:
            assert torch.equal(tensor, before[name]), name
        elif ".experts." in name:
            block = name.split(".experts.")[0]
            w_in, w_out = dense_state[f"{block}.w_in.weight"].t(), dense_state[f"{block}.w_out.weight"].t()
            assert all(torch.equal(e, w_in if "w_in" in name else w_out) for e in tensor), name
        else:
            assert torch.equal(tensor, dense_state[name]), name
    assert any(".router." in n for n in state) and any(".experts." in n for n in state)
    assert "blocks.0.ffn.w_in.weight" in state  # glam: block 0 stays dense, copied


def test_noise_makes_the_experts_differ_reproducibly():
    dense, moe = pair()
    a = upcycle(dense.state_dict(), moe, noise_std=0.01, generator=torch.Generator().manual_seed(3))
    b = upcycle(dense.state_dict(), moe, noise_std=0.01, generator=torch.Generator().manual_seed(3))
    w = a["blocks.1.ffn.experts.w_in_EDF"]
    assert torch.equal(w, b["blocks.1.ffn.experts.w_in_EDF"])
    copy = dense.state_dict()["blocks.1.ffn.w_in.weight"].t()
    assert not torch.equal(w[0], w[1])
    assert (w - copy).std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.equal(a["embed.weight"], dense.state_dict()["embed.weight"])


@pytest.mark.parametrize("change,needle", [
    ({"expert_hidden": 2 * F}, "model.dense_hidden equal to moe.expert_hidden"),
    ({"activation": "swiglu"}, "the same activation"),
])
def test_a_dense_model_of_another_ffn_shape_is_refused(change, needle):
    dense, _ = pair()
    moe = TransformerLM(model_cfg("switch"), MoEConfig(num_experts=4, top_k=2, **{"expert_hidden": F, **change}), V)
    with pytest.raises(UserError, match=needle):
        upcycle(dense.state_dict(), moe)


def test_a_dense_model_of_another_shape_or_layout_is_refused():
    dense, moe = pair()
    other = TransformerLM(model_cfg("switch", positions="learned"), moe.moe_layers[0].cfg, V)
    with pytest.raises(UserError, match="pos_embed.weight"):
        upcycle(dense.state_dict(), other)
    with pytest.raises(UserError, match="model.layout: dense"):
        upcycle(moe.state_dict(), other)


# ------------------------------------------------------------------------------------------------------------------
# model.init_from through the real launcher: 2 ranks, EP 2.

UPCYCLE_SMALL = [o for o in SMALL if not o.startswith(("moe.competition.rate", "train.max_steps"))]
DENSE_STEPS = 6


def launch(run_dir, *overrides: str, ranks: int = 2):
    result = competesmoe("launch", "--nproc", str(ranks), "--launcher", "torchrun", TINY, f"output_dir={run_dir}",
                         *UPCYCLE_SMALL, *overrides, timeout=900)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result


def last_losses(run_dir) -> dict[int, float]:
    """Train loss per step; a resumed run's records of a step replace the earlier ones."""
    return {r["step"]: r["loss"] for r in records(run_dir, "train")}


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A dense run of one expert's width on 2 ranks: a checkpoint after DENSE_STEPS steps, then one step more."""
    run = tmp_path_factory.mktemp("dense") / "run"
    launch(run, "model.layout=dense", "model.dense_hidden=128", f"train.max_steps={DENSE_STEPS + 1}",
           f"train.checkpoint_every={DENSE_STEPS}", "train.keep_checkpoints=2")
    return run


@pytest.mark.slow
def test_upcycled_run_at_ep2_starts_at_the_dense_loss_and_trains_on(dense_run, tmp_path):
    source = dense_run / "checkpoints" / f"step{DENSE_STEPS:08d}"
    run = tmp_path / "moe"
    result = launch(run, f"model.init_from={source}", "model.init_from_data=continue", "parallel.expert_parallel_size=2",
                    "moe.competition.rate=1.0", "moe.competition.warmup=0.0", "train.max_steps=30")
    assert f"initialised from {source}: upcycled into 2 MoE layers" in result.stdout
    losses = last_losses(run)
    # Step 1 reads the batch the dense run read after its checkpoint, with the dense weights: the same loss, on a
    # step where both MoE layers compete (identical experts tie, and the winners' weights sum to one).
    assert records(run, "train")[0]["competing_layers"] == [0, 1]
    assert losses[1] == pytest.approx(last_losses(dense_run)[DENSE_STEPS + 1], abs=1e-5)
    late = sum(losses[s] for s in range(26, 31)) / 5
    assert late < losses[1] - 0.1, (losses[1], late)


@pytest.mark.slow
def test_a_resumed_upcycled_run_does_not_upcycle_again(dense_run, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(dense_run, source)
    run = tmp_path / "moe"
    settings = [f"model.init_from={source}", "parallel.expert_parallel_size=2", "moe.upcycle_noise=0.01",
                "moe.competition.rate=0.3", "train.max_steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=2"]
    launch(run, *settings)
    first = last_losses(run)
    shutil.rmtree(run / "checkpoints" / "step00000008")
    shutil.rmtree(source)  # a resume needs only its own checkpoint
    again = launch(run, *settings, "resume=auto")
    assert "initialised from" not in again.stdout and "resumed from" in again.stdout
    resumed = last_losses(run)
    assert [resumed[s] for s in range(5, 9)] == pytest.approx([first[s] for s in range(5, 9)], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("overrides,needle", [
    (["model.init_from=/nonexistent/run"], "model.init_from: checkpoint /nonexistent/run does not exist"),
    (["model.init_from_data=continue"], "model.init_from_data: continue needs model.init_from"),
    (["moe.upcycle_noise=-1"], "moe.upcycle_noise (-1"),
])
def test_bad_init_from_is_one_line(tmp_path, overrides, needle):
    result = competesmoe("train", TINY, f"output_dir={tmp_path / 'run'}", *FAST, *overrides, timeout=900)
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
def test_an_moe_run_is_not_upcycled(dense_run, tmp_path):
    moe_run = tmp_path / "moe"
    launch(moe_run, "train.max_steps=2", ranks=1)
    result = competesmoe("train", TINY, f"output_dir={tmp_path / 'again'}", *UPCYCLE_SMALL,
                         f"model.init_from={moe_run}", "train.max_steps=2", timeout=900)
    assert result.returncode == 2 and "upcycle from a run with model.layout: dense" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
