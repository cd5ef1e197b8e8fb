"""Crash safety and non-finite losses.

The kill loop: one driver process imports qdora once and forks a child per run (`qdora train
--resume=true`, the same code path as `python -m qdora.cli`, without paying the ~5 s import per
run), kills it with SIGKILL after a seeded random delay or in the middle of a write (a test hook
pauses between the parts of each write), and checks after every kill that everything under
out_dir that is not a `.tmp-*` entry is complete. A last real `python -P -m qdora.cli` process
resumes to the end; its per-step losses must equal an uninterrupted run's (same tolerance as
test_resume.py: 1e-6 relative), and so must the final adapter tensors.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import qdora.streaming
import qdora.train
from conftest import STORIES, gsm8k_rows, metrics, need, override
from safetensors.torch import load_file

from qdora.checkpoint import latest_checkpoint, load_checkpoint, load_run, publish, remove_stale
from qdora.cli import main
from qdora.train import MAX_NONFINITE_IN_A_ROW, TrainConfig, lr_lambda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS, STEPS = 24, 24


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return gsm8k_rows(tmp_path_factory.mktemp("data"), 22)


def flags(rows, out, *extra) -> list[str]:
    # 22 rows in batches of 3: 8 batches per epoch, so 24 steps cross two epoch boundaries; dropout
    # makes the restored RNG state matter.
    base = ["train", f"--model={need(STORIES)}", f"--data={rows}", f"--out_dir={out}", f"--steps={STEPS}",
            "--batch_size=3", "--eval_rows=0", "--max_length=512", "--rank=8", "--warmup=1", "--lr=1e-2",
            "--dropout=0.1", "--save_every=1", "--compute_dtype=float32"]
    return override(base, extra)


def error(capsys) -> str:
    """The error line of a failed command (progress bars before it are on stderr too)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "qdora: error" in line]
    assert len(lines) == 1, lines
    return lines[0][lines[0].index("qdora: error"):]


def step_losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


DRIVER = r'''
import json, os, random, signal, sys, time
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file
from qdora.checkpoint import latest_checkpoint
from qdora.distributed import safe_reader
from qdora.cli import main

spec = json.load(open(sys.argv[1]))
out, rng, pause = spec["out"], random.Random(spec["seed"]), spec["pause"]


def start(args, env):
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.update(env)
            code = main(args)
        finally:
            os._exit(code)
    return pid


def poll(pid):
    done, status = os.waitpid(pid, os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None


def fresh(t0, metrics=False):
    """The entries this run has created or changed (the metrics file and its rewrite aside): the
    temporary and final names of its checkpoints, adapter and summary; or with `metrics`, whether it
    has reached the training loop (metrics.jsonl opened or replaced)."""
    found = set()
    for n in os.listdir(out) if os.path.isdir(out) else ():
        if n == "metrics.jsonl" if metrics else n not in ("metrics.jsonl", ".tmp-metrics.jsonl"):
            try:
                if os.stat(os.path.join(out, n)).st_mtime_ns >= t0:
                    found.add(n)
            except FileNotFoundError:
                pass
    return found


def check():
    """Everything but .tmp-* entries is complete; returns (latest checkpoint step, .tmp names)."""
    names = os.listdir(out) if os.path.isdir(out) else []
    steps = []
    for n in names:
        p = os.path.join(out, n)
        if n.startswith("checkpoint-"):
            step = int(n.split("-")[1])
            trainer = json.load(open(os.path.join(p, "trainer.json")))
            meta = json.load(open(os.path.join(p, "qdora_config.json")))
            assert trainer["step"] == meta["step"] == step, (n, trainer["step"], meta["step"])
            tensors = load_file(os.path.join(p, "adapter.safetensors"))
            assert tensors and all(bool(t.isfinite().all()) for t in tensors.values()), n
            assert set(load_file(os.path.join(p, "rng-rank0.safetensors"))) == {"cpu"}, n
            safe_reader(os.path.join(p, "state"))  # reads and checks the DCP metadata
            steps.append(step)
        elif n == "adapter":
            assert json.load(open(os.path.join(p, "qdora_config.json")))["step"] == spec["steps"]
            assert load_file(os.path.join(p, "adapter.safetensors"))
        elif n == "summary.json":
            assert json.load(open(p))["steps"] == spec["steps"]
        elif n == "metrics.jsonl":
            text = open(p).read()
            lines = text.split("\n")
            for line in lines[:-1]:  # complete lines parse; only an unterminated last one may be cut
                json.loads(line)
    latest = latest_checkpoint(out)
    assert latest == (os.path.join(out, f"checkpoint-{max(steps)}") if steps else None), (latest, steps)
    return (max(steps) if steps else 0), sorted(n for n in names if n.startswith(".tmp-"))


code = os.waitstatus_to_exitcode(os.waitpid(start(spec["ref"], {}), 0)[1])
assert code == 0, f"reference run exit {code}"
events, tries = [], 0
while sum(e["killed"] for e in events) < spec["kills"]:
    tries += 1
    assert tries < 3 * spec["kills"], events
    t0 = time.time_ns()
    pid = start(spec["argv"], {"QDORA_TEST_SAVE_PAUSE": str(pause)})
    # startup: anywhere in loading, resuming, cleaning up; train: in the training loop;
    # write: just after its first, second or third new entry appeared (in the middle of writing
    # a checkpoint, the adapter or the summary, whatever names the writer uses).
    mode = rng.choice(["startup", "train", "train", "write", "write"])
    code, deadline, writes, seen = None, time.time() + rng.uniform(*spec["startup"]), rng.randint(1, 3), set()
    while code is None and (time.time() < deadline if mode == "startup" else
                            not fresh(t0, True) if mode == "train" else len(seen) < writes):
        time.sleep(0.002)
        code = poll(pid)
        seen |= fresh(t0) if mode == "write" else set()
    if code is None and mode != "startup":
        time.sleep(rng.uniform(*(spec["train"] if mode == "train" else (0, 3 * pause))))
        code = poll(pid)
    if code is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    else:
        assert code == 0, f"run {tries} exited with {code}; see {spec['log']}"
    latest, tmp = check()
    events.append({"mode": mode, "killed": code is None, "seconds": (time.time_ns() - t0) / 1e9,
                   "latest": latest, "tmp": tmp, "finished": os.path.exists(os.path.join(out, "summary.json"))})
print(json.dumps(events))
'''


def test_sigkill_loop_never_leaves_a_broken_checkpoint(rows, tmp_path):
    out, ref = tmp_path / "run", tmp_path / "ref"
    spec = {"out": str(out), "seed": 7, "pause": 0.03, "startup": [0.1, 2.5], "train": [0, 1.5], "kills": KILLS,
            "steps": STEPS,
            "log": str(tmp_path / "children.log"), "ref": flags(rows, ref), "argv": flags(rows, out, "--resume=true")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("QDORA_TEST_SAVE_PAUSE", None)
    proc = subprocess.run([sys.executable, "-P", str(tmp_path / "driver.py"), str(tmp_path / "spec.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = json.loads(proc.stdout.strip().splitlines()[-1])
    kills = [e for e in events if e["killed"]]
    assert len(kills) == KILLS
    # The kills hit checkpoint writes and the run advanced between them.
    assert sum(bool(e["tmp"]) for e in kills) >= 3, events
    assert len({e["latest"] for e in events}) >= 5, events
    print(f"\n{len(kills)} kills, {sum(bool(e['tmp']) for e in kills)} left a .tmp- entry; after each run: "
          + " ".join(f"{e['mode'][0]}{e['seconds']:.1f}s->{e['latest']}{'*' if e['tmp'] else ''}"
                     f"{'F' if e['finished'] else ''}{'' if e['killed'] else '(done)'}" for e in events))

    # Every checkpoint restores into a model and optimizer, and rebuilds as an adapter.
    model = load_run(str(out / f"checkpoint-{events[-1]['latest'] or 1}"))[0] if events[-1]["latest"] else None
    if model is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(1, STEPS))
        for path in sorted(out.glob("checkpoint-*")):
            assert load_checkpoint(model, opt, sched, str(path), torch.device("cpu"))["step"] == int(path.name[11:])

    # A real CLI process resumes to the end, cleaning up what the last kill left.
    cli_env = {**env, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-P", "-m", "qdora.cli", *flags(rows, out, "--resume=true")],
                          cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}/" in proc.stdout
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    got, expected = step_losses(out), step_losses(ref)
    assert list(got) == list(range(1, STEPS + 1)) == list(expected)
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, STEPS + 1))  # each step once
    torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(expected.values())),
                               rtol=1e-6, atol=0)
    a, b = load_run(str(ref))[0], load_run(str(out))[0]
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=n)
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS


def test_temporary_entries_are_never_checkpoints_and_resume_removes_them(tmp_path):
    for name in ("checkpoint-2", ".tmp-checkpoint-9", ".tmp-old-checkpoint-2", ".tmp-old-checkpoint-3",
                 ".tmp-abc123"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer.json").write_text("{}")
    for name in (".tmp-metrics.jsonl", "predictions_step0.jsonl.tmp123", "predictions_step0.jsonl", "metrics.jsonl"):
        (tmp_path / name).write_text("x")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    # .tmp-old-checkpoint-3 without checkpoint-3: killed between publish's two renames, so the old
    # complete version is put back; .tmp-old-checkpoint-2 beside checkpoint-2 is leftover.
    assert sorted(remove_stale(str(tmp_path))) == [".tmp-abc123", ".tmp-checkpoint-9", ".tmp-metrics.jsonl",
                                                   ".tmp-old-checkpoint-2", "predictions_step0.jsonl.tmp123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "metrics.jsonl",
                                                         "predictions_step0.jsonl"]
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-3")
    shutil.rmtree(tmp_path / "checkpoint-3")
    # publish replaces a folder without ever leaving it half removed, and a file atomically
    (tmp_path / ".tmp-new").mkdir()
    (tmp_path / ".tmp-new" / "a").write_text("new")
    publish(str(tmp_path / ".tmp-new"), str(tmp_path / "checkpoint-2"))
    assert [p.name for p in (tmp_path / "checkpoint-2").iterdir()] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "metrics.jsonl", "predictions_step0.jsonl"]


class Inject:
    """answer_loss with a non-finite loss (or only a non-finite gradient) from its `at`-th call on
    (grad_accum 1: one call per step), for `count` calls."""

    def __init__(self, at: int, count: int = 1, where: str = "loss"):
        self.calls, self.at, self.count, self.where = 0, at, count, where
        self.loss = qdora.train.answer_loss

    def __call__(self, model, batch):
        self.calls += 1
        loss = self.loss(model, batch)
        if not self.at <= self.calls < self.at + self.count:
            return loss
        return loss * float("nan") if self.where == "loss" else InfGrad.apply(loss)


class InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_nonfinite_stop_then_resume_with_skip(rows, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(qdora.train, "answer_loss", Inject(at=3))
    assert main(flags(rows, out, "--steps=5", "--device=cpu")) == 2
    assert not qdora.streaming.freed_memory_kept()  # the failed CPU run ended its allocator policy
    err = error(capsys)
    assert err == ("qdora: error: loss became nan at step 3; lower --lr, check the data, or pass "
                   "--on_nonfinite=skip (with --resume=true to continue from checkpoint-2)")
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2") and not (out / "adapter").exists()
    assert load_run(str(out / "checkpoint-2"))[2]["step"] == 2
    assert metrics(out)[-1] == {"step": 3, "skipped_nonfinite": False, "reason": "loss became nan", "epoch": 0}

    # on_nonfinite may change on resume; the same batch (step 3) is non-finite again and is skipped.
    monkeypatch.setattr(qdora.train, "answer_loss", Inject(at=1))
    assert main(flags(rows, out, "--steps=5", "--resume=true", "--on_nonfinite=skip")) == 0
    assert "step 3: loss became nan; skipped (no optimizer or learning-rate step)" in capsys.readouterr().out
    recs = metrics(out)
    assert [r for r in recs if r.get("step") == 3] == [
        {"step": 3, "skipped_nonfinite": True, "reason": "loss became nan", "epoch": 0}]
    assert sorted(step_losses(out)) == [1, 2, 4, 5]
    assert all(math.isfinite(v) for v in step_losses(out).values())
    # The skipped step changed no parameter, optimizer step count or schedule; step 4 trained again.
    before, skipped, after = (load_run(str(out / f"checkpoint-{s}"))[0] for s in (2, 3, 4))
    trainable = [n for n, p in before.named_parameters() if p.requires_grad]
    p2, p3, p4 = (dict(m.named_parameters()) for m in (before, skipped, after))
    assert all(torch.equal(p2[n], p3[n]) for n in trainable)
    assert not all(torch.equal(p3[n], p4[n]) for n in trainable)
    t2, t3 = (json.loads((out / f"checkpoint-{s}" / "trainer.json").read_text()) for s in (2, 3))
    assert t3["scheduler"] == t2["scheduler"] and (t3["consumed"], t2["consumed"]) == (3, 2)
    assert (t3["nonfinite_steps"], t3["nonfinite_in_a_row"]) == ([3], 1)
    assert json.loads((out / "summary.json").read_text())["nonfinite_steps"] == [3]


def test_too_many_nonfinite_steps_in_a_row_stop(rows, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(qdora.train, "answer_loss", Inject(at=2, count=99, where="grad"))
    steps = MAX_NONFINITE_IN_A_ROW + 2
    assert main(flags(rows, out, f"--steps={steps}", "--on_nonfinite=skip", "--save_every=0")) == 2
    err = error(capsys)
    assert err.startswith("qdora: error: gradient norm became ")
    assert f"at step {MAX_NONFINITE_IN_A_ROW + 1}, the {MAX_NONFINITE_IN_A_ROW}th step in a row" in err
    assert "steps 2-11 skipped" in err and "lower --lr or check the data" in err
    skipped = [r["step"] for r in metrics(out) if r.get("skipped_nonfinite")]
    assert skipped == list(range(2, MAX_NONFINITE_IN_A_ROW + 2))


NAN_ON_RANK_1 = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    import qdora.train
    from qdora import distributed as D
    from qdora.cli import main

    D.init_from_env("cpu")
    calls, loss = [0], qdora.train.answer_loss

    def nan_on_rank_1(model, batch):  # only rank 1 sees a NaN, at step 3
        calls[0] += 1
        out = loss(model, batch)
        return out * float("nan") if dist.get_rank() == 1 and calls[0] == 3 else out

    qdora.train.answer_loss = nan_on_rank_1
    code = main(["train", *sys.argv[1:]])
    dist.destroy_process_group()
    sys.exit(code)
""")


def test_fsdp_ranks_agree_to_skip_a_step_one_rank_found_nonfinite(rows, tmp_path):
    script, out = tmp_path / "worker.py", tmp_path / "run"
    script.write_text(NAN_ON_RANK_1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *flags(rows, out, "--steps=4", "--batch_size=4", "--device=cpu",
                                               "--on_nonfinite=skip")[1:]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in metrics(out) if r.get("skipped_nonfinite")] == [3]
    assert sorted(step_losses(out)) == [1, 2, 4]
    # Neither rank stepped its shards at step 3 (the checkpoint gathers both), both did at step 4.
    t2, t3, t4 = (load_file(out / name / "adapter.safetensors") for name in ("checkpoint-2", "checkpoint-3", "adapter"))
    assert all(torch.equal(t2[n], t3[n]) for n in t2) and not all(torch.equal(t3[n], t4[n]) for n in t3)


def test_batch_size_must_split_over_ranks(rows, tmp_path, monkeypatch, capsys):
    """Checked before anything is loaded or initialized (WORLD_SIZE is what torchrun sets)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    assert main(flags(rows, out, "--batch_size=3")) == 2
    assert error(capsys) == ("qdora: error: batch_size 3 does not split evenly over 2 ranks; "
                                               "pass a multiple of 2")
    assert not out.exists()


def test_on_nonfinite_is_validated():
    with pytest.raises(ValueError, match="on_nonfinite must be stop or skip, got 'ignore'"):
        TrainConfig(on_nonfinite="ignore")
