"""`competesmoe finetune`: a classification head on a pretrained checkpoint, SST-2-format TSV.

The labelled data here is SYNTHETIC (template sentences whose label is decided by a word list), made
by the test itself: no real labelled corpus is available from a package on this machine. It checks
the mechanics (format, pooling, training, routing plumbing), not sentiment quality."""

import json
import random
from pathlib import Path

import pytest
import torch

from competesmoe.common.errors import UserError
from competesmoe.experiments.finetune import SequenceClassifier, read_tsv
from support import TINY, competesmoe

pytestmark = pytest.mark.slow  # real training runs / launchers: see tests/conftest.py
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=48", "moe.num_experts=4",
         "moe.expert_hidden=32", "train.max_steps=8", "train.eval_every=0", "train.log_every=4",
         "train.eval_batches=2", "train.micro_batch_size=4", "train.checkpoint_every=0"]

POSITIVE = ["great", "superb", "lovely", "brilliant", "charming"]
NEGATIVE = ["awful", "boring", "dreadful", "clumsy", "tedious"]
NOUNS = ["film", "plot", "cast", "score", "ending", "script"]


def synthetic_sst2(path: Path, n: int, seed: int) -> None:
    """SYNTHETIC sentences in SST-2 format: label 1 iff the adjective is from the positive list."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.randint(0, 1)
        adjective = rng.choice(POSITIVE if label else NEGATIVE)
        lines.append(f"the {rng.choice(NOUNS)} was {adjective} .\t{label}")
    path.write_text("\n".join(lines) + "\n")




@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    run = tmp / "run"
    result = competesmoe("train", TINY, *SMALL, "moe.router=competesmoe", "moe.competition.rate=0.5",
                         f"output_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    for name, n, seed in (("train", 240, 1), ("dev", 60, 2), ("test", 60, 3)):
        synthetic_sst2(tmp / f"{name}.tsv", n, seed)
    return run, tmp


def test_tsv_format_and_errors(tmp_path):
    good = tmp_path / "good.tsv"
    good.write_text("sentence\tlabel\na film , with a tab-free sentence .\t1\nbad .\t0\n\n")
    assert [(e.text, e.label) for e in read_tsv(good)] == [("a film , with a tab-free sentence .", 1), ("bad .", 0)]
    for body, needle in (("no tab here\n", ":1: no TAB"), ("sentence\tlabel\nok\tpositive\n", ":2: label 'positive'"),
                         ("x\t-1\n", "negative")):
        bad = tmp_path / "bad.tsv"
        bad.write_text(body)
        with pytest.raises(UserError, match=None) as err:
            read_tsv(bad)
        assert needle in str(err.value)


def test_padding_does_not_change_a_sentence_s_logits():
    """The body is causal: a sentence padded after its end gets the same pooled logits."""
    from competesmoe.moe.config import ModelConfig, MoEConfig
    from competesmoe.moe.model import TransformerLM

    torch.manual_seed(0)
    lm = TransformerLM(ModelConfig(d_model=16, n_layers=2, n_heads=2, seq_len=16, dense_hidden=32),
                       MoEConfig(num_experts=4, top_k=2, expert_hidden=16, router="smoe"), vocab_size=50)
    for pool in ("mean", "last"):
        model = SequenceClassifier(lm, 3, pool).eval()
        tokens = torch.randint(1, 50, (1, 7))
        alone, _ = model(tokens, torch.tensor([7]))
        padded = torch.cat([tokens, torch.zeros(1, 5, dtype=torch.long)], dim=1)
        batch = torch.cat([padded, torch.randint(1, 50, (1, 12))])
        together, _ = model(batch, torch.tensor([7, 12]))
        torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)


def test_finetune_learns_the_synthetic_task(pretrained, tmp_path):
    run, data = pretrained
    out = tmp_path / "ft"
    result = competesmoe("finetune", str(run), "--train", str(data / "train.tsv"), "--valid", str(data / "dev.tsv"),
                         "--test", str(data / "test.tsv"), "--epochs", "6", "--lr", "3e-3", "--batch-size", "8",
                         "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["epoch"] for r in valid] == [1, 2, 3, 4, 5, 6] and valid[-1]["examples"] == 60
    assert valid[-1]["train_loss"] < valid[0]["train_loss"]
    test = [r for r in records if r["split"] == "test"][0]
    assert test["accuracy"] >= 0.9, records  # the synthetic label is one word: well above chance (0.5)
    saved = torch.load(out / "classifier.pt", weights_only=False)
    assert saved["classes"] == 2 and "head.weight" in saved["state_dict"]
    assert "test accuracy" in result.stdout


def test_linear_probe_leaves_the_body_untouched(pretrained, tmp_path):
    from competesmoe.experiments.finetune import finetune
    from competesmoe.launcher.evaluate import load_run

    run, data = pretrained
    before = {k: v.clone() for k, v in load_run(run).model.state_dict().items()}
    result = finetune(run, data / "train.tsv", data / "dev.tsv", epochs=1, lr=1e-2, freeze_body=True,
                      out_dir=tmp_path / "probe", progress=False)
    after = torch.load(tmp_path / "probe" / "classifier.pt", weights_only=False)["state_dict"]
    for key, value in before.items():
        assert torch.equal(after[f"lm.{key}"], value), key
    assert result["valid"]["examples"] == 60


def test_label_outside_the_train_classes_is_one_line(pretrained, tmp_path):
    run, data = pretrained
    bad = tmp_path / "dev.tsv"
    bad.write_text("a .\t0\nb .\t4\n")
    result = competesmoe("finetune", str(run), "--train", str(data / "train.tsv"), "--valid", str(bad))
    assert result.returncode == 2 and "--num-classes" in result.stderr and "Traceback" not in result.stderr
