"""Training checkpoints and --resume in one process: a resumed run repeats an uninterrupted one."""

import json
import shutil

import pytest
import torch

from conftest import STORIES, gsm8k_rows, metrics, need, override
from qdora.checkpoint import latest_checkpoint, load_run
from qdora.cli import main


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return gsm8k_rows(tmp_path_factory.mktemp("data"), 22)


def flags(rows, out, *extra) -> list[str]:
    # 22 rows in batches of 3 with grad_accum 2: the checkpoint at step 3 sits mid-epoch (6 of 8 batches)
    # and the run crosses two epoch boundaries; dropout makes the RNG state matter too.
    base = ["train", f"--model={need(STORIES)}", f"--data={rows}", f"--out_dir={out}", "--steps=7", "--batch_size=3",
            "--grad_accum=2", "--eval_rows=0", "--max_length=512", "--rank=8", "--warmup=1", "--lr=1e-2",
            "--dropout=0.1", "--save_every=3", "--compute_dtype=float32"]
    return override(base, extra)


def losses(out) -> list[float]:
    return [r["loss"] for r in metrics(out) if "loss" in r]


@pytest.fixture(scope="module")
def full_run(rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(flags(rows, out)) == 0
    return out


def killed_after_checkpoint(full_run, dest):
    """What a run killed during step 5 leaves: checkpoint-3, metrics up to step 4, a cut-off line."""
    shutil.copytree(full_run, dest)
    for name in ("checkpoint-6", "adapter", "summary.json"):
        shutil.rmtree(dest / name) if (dest / name).is_dir() else (dest / name).unlink()
    lines = (dest / "metrics.jsonl").read_text().splitlines()[:4]
    (dest / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')
    return dest


@pytest.mark.parametrize("resume", ["true", "checkpoint"])
def test_resume_repeats_the_uninterrupted_run(full_run, rows, tmp_path, resume):
    out = killed_after_checkpoint(full_run, tmp_path / "run")
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-3")
    arg = "true" if resume == "true" else str(out / "checkpoint-3")
    assert main(flags(rows, out, f"--resume={arg}")) == 0
    expected, got = losses(full_run), losses(out)
    assert len(got) == 7 and [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 8))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-6, atol=0)
    a, b = load_run(str(full_run))[0], load_run(str(out))[0]
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=n)
    assert json.loads((out / "summary.json").read_text())["steps"] == 7
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_checkpoint_keeps_the_adapter_format(full_run):
    model, _, meta = load_run(str(full_run / "checkpoint-3"))
    assert meta["step"] == 3 and meta["adapter"]["method"] == "qdora"
    trainer = json.loads((full_run / "checkpoint-3" / "trainer.json").read_text())
    assert (trainer["step"], trainer["epoch"], trainer["consumed"]) == (3, 0, 6)


@pytest.mark.parametrize("flag,name", [("--lr=2e-2", "lr"), ("--rank=4", "rank"), ("--seed=1", "seed"),
                                       ("--batch_size=2", "batch_size"), ("--method=qlora", "method")])
def test_resume_with_changed_setting_is_refused(full_run, rows, tmp_path, capsys, flag, name):
    out = killed_after_checkpoint(full_run, tmp_path / "run")
    before = (out / "metrics.jsonl").read_text()
    assert main(flags(rows, out, "--resume=true", flag)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qdora: error: cannot resume") and f" {name} was " in err and "\n" not in err
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched


def test_resume_true_without_checkpoint_starts_fresh(rows, tmp_path):
    out = tmp_path / "run"
    assert main(flags(rows, out, "--resume=true", "--steps=2", "--save_every=0")) == 0
    assert len(losses(out)) == 2
    assert main(flags(rows, tmp_path / "other", f"--resume={tmp_path / 'nowhere'}")) == 2
