"""The bad-input catalogue (docs/bad_inputs.md) of every qdora command.

Every case must exit with code 2, print no traceback, end stderr with one `qdora: error:` line that
names the problem and the fix, and leave no output files behind. Most cases fail before a model is
loaded; the ones that need a model use the real 260K-parameter stories260K Llama or tiny configs.
"""

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from conftest import STORIES, need
from qdora.checkpoint import CONFIG, TENSORS
from qdora.cli import main
from qdora.model import AdapterConfig, load_model, prepare_model, trainable_state_dict
from qdora.problems import generate_problems
from qdora.train import TrainConfig

DOCS = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
ROOT = os.geteuid() == 0  # chmod does not stop root from writing
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Hub ids fail at once, as under HF_HUB_OFFLINE=1 (read at import, so set on the constants)."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tiny(folder: Path, config, tokenizer: bool = True, model_max_length: int | None = 512) -> Path:
    """A saved tiny model with the stories260K tokenizer (vocab 512)."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    if tokenizer:
        for name in TOKENIZER_FILES:
            shutil.copyfile(STORIES / name, folder / name)  # not the shared data's read-only mode
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg.pop("model_max_length")
        if model_max_length:
            cfg["model_max_length"] = model_max_length
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def _copy_run(run: Path, dest: Path, edit=None, tensors: bytes | None = None) -> Path:
    shutil.copytree(run, dest)
    if edit:
        meta = json.loads((dest / "adapter" / CONFIG).read_text())
        edit(meta)
        (dest / "adapter" / CONFIG).write_text(json.dumps(meta))
    if tensors is not None:
        (dest / "adapter" / TENSORS).write_bytes(tensors)
    return dest


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Every file the cases point at: data files, broken model folders, a run and broken copies."""
    need(STORIES)
    t = tmp_path_factory.mktemp("bad")
    problems = generate_problems(12, seed=1)
    w = SimpleNamespace(model=STORIES, tmp=t, rows=_jsonl(t / "rows.jsonl", problems))
    w.empty = t / "empty.jsonl"
    w.empty.write_text("")
    w.badline = t / "badline.jsonl"
    w.badline.write_text(json.dumps(problems[0]) + "\n{question: 1}\n")
    w.nocol = _jsonl(t / "nocol.jsonl", [{"q": p["question"], "answer": p["answer"]} for p in problems])
    w.null = t / "null.jsonl"
    w.null.write_text("".join(json.dumps(p) + "\n" for p in problems[:2]) + '{"question": "Why?", "answer": NaN}\n')
    w.blank = _jsonl(t / "blank.jsonl", [*problems[:3], {"question": "   ", "answer": "#### 1"}])
    w.txt = t / "rows.txt"
    w.txt.write_text(w.rows.read_text())
    (t / "nodata").mkdir()
    (t / "nodata" / "readme.md").write_text("no rows here")
    w.afile = t / "afile"
    w.afile.write_text("x")
    w.full = t / "full"
    w.full.mkdir()
    (w.full / "keep.txt").write_text("x")
    # Model folders.
    w.noconfig = t / "noconfig"
    w.noconfig.mkdir()
    w.notok = t / "notok"
    w.notok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(STORIES / name, w.notok)
    weights = (STORIES / "model.safetensors").read_bytes()
    for name, data in (("corrupt", b"not a safetensors file" * 4), ("truncated", weights[: len(weights) // 2])):
        folder = t / name
        shutil.copytree(STORIES, folder, ignore=shutil.ignore_patterns("original"), copy_function=shutil.copyfile)
        (folder / "model.safetensors").write_bytes(data)
        setattr(w, name, folder)
    # GPT-2 projections are transformers Conv1D, not nn.Linear: nothing to adapt but the head.
    w.gpt2 = _tiny(t / "gpt2", GPT2Config(vocab_size=512, n_embd=16, n_layer=1, n_head=2, n_positions=512))
    tiny = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    w.llama = _tiny(t / "llama", LlamaConfig(**tiny))
    w.nolimit = _tiny(t / "nolimit", LlamaConfig(**tiny), model_max_length=None)
    # A run as `qdora train` saves it (untrained adapter, rank 2), and broken copies of it.
    adapter = AdapterConfig(rank=2, compute_dtype="float32")
    model, _ = prepare_model(load_model(str(STORIES), torch.float32), adapter)
    run = t / "run"
    (run / "adapter").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trainable_state_dict(model).items()}, str(run / "adapter" / TENSORS))
    meta = {"step": 1, "adapter": dataclasses.asdict(adapter),
            "train": dataclasses.asdict(TrainConfig(model=str(STORIES), data=str(w.rows), eval_rows=2))}
    (run / "adapter" / CONFIG).write_text(json.dumps(meta))
    w.run = run
    tensors = (run / "adapter" / TENSORS).read_bytes()
    w.run_corrupt = _copy_run(run, t / "run_corrupt", tensors=b"garbage")
    w.run_truncated = _copy_run(run, t / "run_truncated", tensors=tensors[: len(tensors) // 2])
    w.run_badjson = _copy_run(run, t / "run_badjson")
    (w.run_badjson / "adapter" / CONFIG).write_text('{"step": 1, "train": ')
    w.run_other_model = _copy_run(run, t / "run_other_model", edit=lambda m: m["train"].update(model=str(w.llama)))
    w.run_other_method = _copy_run(run, t / "run_other_method", edit=lambda m: m["adapter"].update(method="qlora"))
    w.run_moved = _copy_run(run, t / "run_moved", edit=lambda m: m["train"].update(model=str(t / "gone")))
    w.run_noadapter = t / "run_noadapter"
    w.run_noadapter.mkdir()
    # A trained run with a checkpoint, to resume with a changed setting.
    w.ckrun = t / "ckrun"
    assert main(T("--steps=2", "--save_every=1", "--eval_rows=0", "--lr=0.001")(w, w.ckrun)) == 0
    return w


def T(*extra):
    """`qdora train` on stories260K and 12 rows, one step: bad flags come last and win."""
    return lambda w, o: ["train", f"--model={w.model}", f"--data={w.rows}", f"--out_dir={o}", "--steps=1",
                         "--batch_size=2", "--eval_rows=1", "--max_new_tokens=1", "--max_length=256",
                         *[e.format(w=w, o=o) for e in extra]]


def E(run, *extra):
    return lambda w, o: ["eval", f"--run={getattr(w, run)}", f"--out={o}/predictions.jsonl",
                         *[e.format(w=w, o=o) for e in extra]]


def C(*extra):
    return lambda w, o: ["compare", f"--model={w.model}", f"--data={w.rows}", f"--out_dir={o}", "--steps=1",
                         "--batch_size=2", "--eval_rows=1", "--max_new_tokens=1", "--max_length=256",
                         "--methods=qdora", *[e.format(w=w, o=o) for e in extra]]


def X(*extra):
    """`qdora export` of the untrained run."""
    return lambda w, o: ["export", f"--run={w.run}", f"--out_dir={o}", *[e.format(w=w, o=o) for e in extra]]


def A(*extra):
    """`qdora analyze` of stories260K against itself."""
    return lambda w, o: ["analyze", f"--base={w.model}", f"--tuned={w.model}", f"--out_dir={o}",
                         *[e.format(w=w, o=o) for e in extra]]


def M(*extra):
    return lambda w, o: ["memory", *[e.format(w=w, o=o) for e in extra]]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
# (id, argv builder, text the error line must contain, the error comes after a model was loaded)
CASES = [
    # The command line itself.
    ("unknown-command", lambda w, o: ["trian"], "unknown command 'trian'; did you mean train?", False),
    ("stray-argument", lambda w, o: ["train", "foo"], "unexpected argument 'foo'", False),
    ("unknown-flag", T("--bogus=1"), "unknown flag(s) --bogus", False),
    ("misspelt-flag", T("--step=3"), "did you mean --steps?", False),
    ("rank-not-a-number", T("--rank", "abc"), "--rank expects an integer, got 'abc'", False),
    ("steps-not-an-integer", T("--steps", "1.5"), "--steps expects an integer, got '1.5'", False),
    ("lr-not-a-number", T("--lr=fast"), "--lr expects a number, got 'fast'", False),
    ("numeric-flag-without-value", T("--batch_size"), "--batch_size needs a value", False),
    ("bool-flag-not-a-bool", T("--merge_for_eval=maybe"), "--merge_for_eval expects true or false", False),
    # Adapter settings.
    ("unknown-method", T("--method=lora"), "unknown method 'lora'", False),
    ("rank-zero", T("--rank=0"), "rank must be a positive integer, got 0", False),
    ("alpha-negative", T("--alpha=-1"), "alpha must be positive", False),
    ("dropout-out-of-range", T("--dropout=1.5"), "dropout must be in [0, 1)", False),
    ("target-not-a-regex", T("--targets=[q_proj"), "is not a valid regular expression", False),
    ("magnitude-only-on-qlora", T("--method=qlora", "--magnitude_only=v_proj"), "magnitude_only needs method=qdora",
     False),
    ("unknown-norm-mode", T("--norm_mode=approx"), "norm_mode 'approx' is not one of", False),
    ("unknown-blocksize", T("--blocksize=100"), "blocksize 100 is not one of", False),
    ("unknown-dtype", T("--compute_dtype=fp8"), "compute_dtype 'fp8' is not one of", False),
    ("target-matches-nothing", T("--targets=nope_proj"), "target pattern 'nope_proj' matches no linear layer", True),
    ("magnitude-only-matches-no-target", T("--targets=q_proj,v_proj", "--magnitude_only=k_proj"),
     "magnitude_only pattern 'k_proj' matches none of the target layers", True),
    # Training settings.
    ("lr-out-of-range", T("--lr=5"), "lr must be in (0, 1)", False),
    ("batch-size-zero", T("--batch_size=0"), "batch_size must be a positive integer", False),
    ("grad-accum-negative", T("--grad_accum=-1"), "grad_accum must be a positive integer", False),
    ("weight-decay-negative", T("--weight_decay=-1"), "weight_decay and grad_clip must be >= 0", False),
    ("unknown-device", T("--device=tpu"), "device must be auto, cpu or cuda", False),
    pytest.param("cuda-without-gpu", T("--device=cuda"), "no CUDA device is visible", False, marks=NO_CUDA),
    ("max-length-beyond-model", T("--max_length=4096"), "max_length=4096 is beyond the model's max_position_embeddings=512", False),
    # Models.
    ("model-path-missing", T("--model={w.tmp}/gone"), "does not exist or is not a directory", False),
    ("model-folder-without-config", T("--model={w.noconfig}"), "has no config.json", False),
    ("model-folder-without-tokenizer", T("--model={w.notok}"), "cannot load the tokenizer", False),
    ("model-weights-corrupt", T("--model={w.corrupt}"), "safetensors file is corrupt or truncated", False),
    ("model-weights-truncated", T("--model={w.truncated}"), "safetensors file is corrupt or truncated", False),
    ("model-hub-id-offline", T("--model=no-such-org/no-such-model"), "hub id that is cached or reachable", False),
    ("model-without-linear-layers", T("--model={w.gpt2}"), "has no linear layers to adapt", True),
    # Output folders.
    ("out-dir-not-empty", T("--out_dir={w.full}"), "is not empty", False),
    ("out-dir-is-a-file", T("--out_dir={w.afile}"), "is a file", False),
    ("out-dir-under-a-file", T("--out_dir={w.afile}/run"), "Not a directory", False),
    # Data.
    ("data-path-missing", T("--data={w.tmp}/gone.jsonl"), "does not exist; check the path", False),
    ("data-file-empty", T("--data={w.empty}"), "is empty (0 rows)", False),
    ("data-invalid-jsonl-line", T("--data={w.badline}"), "line 2 is not valid JSON", False),
    ("data-missing-column", T("--data={w.nocol}"), "has no column 'question'", False),
    ("data-nan-or-null-value", T("--data={w.null}"), "row 3 has no answer (null, NaN or missing)", False),
    ("data-empty-text", T("--data={w.blank}"), "row 4 has question='   '", False),
    ("data-unknown-extension", T("--data={w.txt}"), "unknown extension '.txt'", False),
    ("data-folder-without-files", T("--data={w.tmp}/nodata"), "holds no", False),
    ("data-hub-id-offline", T("--data=no-such-org/no-such-data"), "cannot load data 'no-such-org/no-such-data'",
     False),
    ("data-bad-builtin-count", T("--data=builtin:many"), "write builtin or builtin:N", False),
    ("unknown-dataset-preset", T("--preset=orca"), "unknown split preset 'orca'", False),
    ("eval-rows-beyond-data", T("--eval_rows=50"), "eval_rows=50 must be an integer in [0, 12)", False),
    ("zero-usable-rows", T("--max_length=8"), "rows are longer than max_length=8", False),
    # qdora eval.
    ("eval-run-missing", E("tmp", "--run={w.tmp}/gone"), "run folder", False),
    ("eval-run-without-adapter", E("run_noadapter"), "holds no qdora adapter", False),
    ("eval-adapter-corrupt", E("run_corrupt"), "the checkpoint is corrupt", True),
    ("eval-adapter-truncated", E("run_truncated"), "the checkpoint is corrupt", True),
    ("eval-config-not-json", E("run_badjson"), "is not valid JSON", False),
    ("eval-adapter-from-another-model", E("run_other_model"), "does not fit model", True),
    ("eval-adapter-from-another-method", E("run_other_method"), "with method qlora", True),
    ("eval-base-model-moved", E("run_moved"), "does not exist or is not a directory", False),
    ("eval-nf4-on-adapter-run", E("run", "--nf4"), "--nf4 quantizes a fully fine-tuned model", False),
    ("eval-unknown-preset", E("run", "--preset=orca"), "unknown split preset 'orca'", False),
    ("eval-rows-zero", E("run", "--eval_rows=0"), "eval_rows must be a positive integer", False),
    ("eval-rows-beyond-data", E("run", "--eval_rows=99"), "eval_rows=99 must be an integer in [0, 12)", False),
    ("eval-out-is-a-folder", E("run", "--out={w.tmp}"), "is a folder", False),
    ("eval-out-under-a-file", E("run", "--out={w.afile}/p.jsonl"), "cannot be written", False),
    pytest.param("eval-cuda-without-gpu", E("run", "--device=cuda"), "no CUDA device is visible", False,
                 marks=NO_CUDA),
    # qdora compare.
    ("compare-unknown-method", C("--methods=qdora,lora"), "must be a non-empty subset", False),
    ("compare-lr-out-of-range", C("--qdora_lr=2"), "qdora_lr must be a number in (0, 1)", False),
    ("compare-shared-lr-flag", C("--lr=0.1"), "unknown flag(s) --lr for `qdora compare`; did you mean --qdora_lr or",
     False),
    ("compare-out-dir-not-empty", C("--out_dir={w.full}"), "is not empty", False),
    ("compare-model-path-missing", C("--model={w.tmp}/gone"), "does not exist or is not a directory", False),
    ("compare-data-invalid", C("--data={w.badline}"), "line 2 is not valid JSON", False),
    # Non-finite losses and resume (qdora train).
    ("on-nonfinite-unknown", T("--on_nonfinite=ignore"), "on_nonfinite must be stop or skip, got 'ignore'", False),
    ("resume-path-missing", T("--resume={w.tmp}/gone"), "is neither a training checkpoint", False),
    ("resume-changed-setting", T("--out_dir={w.ckrun}", "--steps=2", "--resume=true", "--lr=0.002"),
     "lr was 0.001 there but is 0.002 now", False),
    # qdora export.
    ("export-run-missing", X("--run={w.tmp}/gone"), "does not exist; pass a `qdora train` output folder", False),
    ("export-run-without-adapter", X("--run={w.run_noadapter}"), "holds no qdora adapter", False),
    ("export-adapter-corrupt", X("--run={w.run_corrupt}"), "the checkpoint is corrupt", False),
    ("export-base-missing", X("--base={w.tmp}/gone"), "does not exist or is not a directory", False),
    ("export-out-dir-not-empty", X("--out_dir={w.full}"), "exists and is not an empty folder", False),
    ("export-unknown-dtype", X("--dtype=int8"), "dtype 'int8' is not one of", False),
    ("export-bad-shard-size", X("--max_shard_size=lots"), "max_shard_size 'lots' is not a size", False),
    ("export-unknown-format", X("--format=gguf"), "format 'gguf' is not one of", False),
    ("export-against-adapter-format", X("--format=peft", "--against=original"),
     "against='original' applies to --format=merged only", False),
    # qdora analyze.
    ("analyze-base-missing", A("--base={w.tmp}/gone"), "does not exist or is not a directory", False),
    ("analyze-tuned-missing", A("--tuned={w.tmp}/gone"), "does not exist or is not a directory", False),
    ("analyze-out-dir-not-empty", A("--out_dir={w.full}"), "exists and is not an empty folder", False),
    # qdora memory.
    ("memory-unknown-config", M("--config=nope"), "model config 'nope' is neither a shipped name", False),
    ("memory-world-size-zero", M("--world_size=0"), "world_size must be a positive integer, got 0", False),
    ("memory-seq-len-negative", M("--seq_len=-5"), "seq_len must be a positive integer, got -5", False),
    ("memory-unknown-method", M("--method=lora"), "unknown method 'lora'", False),
    ("memory-exact-norm", M("--norm_mode=exact"), "norm_mode='exact' is not modelled", False),
]


def _id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


def check_error(err: str, needle: str, after_model: bool) -> str:
    """The one error line; before it only progress bars (model loading) are allowed."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("qdora: error: "), err
    assert needle in lines[-1], lines[-1]
    if after_model:
        assert all("%|" in line for line in lines[:-1]), err
    else:
        assert len(lines) == 1, err
    return lines[-1]


def no_files(out: Path) -> None:
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], list(out.rglob("*"))


@pytest.mark.parametrize("name,argv,needle,after_model", CASES, ids=[_id(c) for c in CASES])
def test_bad_input(w, tmp_path, capsys, name, argv, needle, after_model):
    out = tmp_path / "out"
    assert main(argv(w, out)) == 2
    check_error(capsys.readouterr().err, needle, after_model)
    no_files(out)
    assert not list(w.tmp.rglob("predictions*"))


def test_catalogue_lists_every_case():
    """docs/bad_inputs.md has a row per case, with the case's id and the text of its message."""
    text = DOCS.read_text()
    for case in CASES:
        name, _, needle, _ = case.values if hasattr(case, "values") else case
        assert f"`{name}`" in text, name
        assert needle.replace("|", "\\|") in text, needle
    assert len(CASES) >= 30


@pytest.mark.skipif(ROOT, reason="root writes into read-only folders; out-dir-under-a-file covers unwritable paths")
def test_out_dir_not_writable(w, tmp_path, capsys):
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert main(T()(w, out)) == 2
        check_error(capsys.readouterr().err, "is not writable", False)
    finally:
        out.chmod(0o700)


def test_max_length_beyond_position_embeddings(w, tmp_path, capsys):
    """A model whose tokenizer states no limit: only the model config knows it (64 positions)."""
    out = tmp_path / "out"
    assert main(T("--model={w.nolimit}", "--max_length=128")(w, out)) == 2
    check_error(capsys.readouterr().err, "max_position_embeddings", True)
    no_files(out)


def test_debug_shows_the_traceback(w):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        main(["train", "--rank=0", "--debug"])


def test_compare_relays_a_training_error_as_its_one_line(w, tmp_path, capsys):
    """A failure inside compare's per-method process becomes compare's single error line."""
    out = tmp_path / "cmp"
    assert main(C("--targets=nope_proj")(w, out)) == 2
    line = check_error(capsys.readouterr().err, "training qdora failed: target pattern 'nope_proj'", True)
    assert line.count("qdora: error:") == 1
    assert not (out / "compare.md").exists() and not (out / "compare.png").exists()
    no_files(out)


def cli(*args, timeout=120):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-P", "-m", "qdora.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=Path(__file__).resolve().parents[1])


def test_real_process_exit_code_and_stderr(w, tmp_path):
    """A real `python -P -m qdora.cli` process under HF_HUB_OFFLINE=1: exit code 2, one stderr line,
    no hang on an unreachable hub id."""
    out = tmp_path / "out"
    proc = cli("train", "--model=no-such-org/no-such-model", f"--data={w.rows}", f"--out_dir={out}")
    assert proc.returncode == 2, proc.stderr
    check_error(proc.stderr, "hub id that is cached or reachable", False)
    no_files(out)


def test_normal_run_prints_no_library_warnings(w, tmp_path, capfd, caplog, recwarn):
    """A successful tiny train and eval show progress bars only: no log record at warning level or above, no
    user-visible Python warning, no other stderr line. (E.g. generate()'s max_new_tokens-and-
    max_length warning for a model whose generation config sets max_length, as stories260K's does.)"""
    out = tmp_path / "ok"
    caplog.set_level(logging.WARNING)
    assert main(T("--max_new_tokens=3", "--eval_rows=2")(w, out)) == 0
    assert (out / "summary.json").is_file()
    assert main(["eval", f"--run={w.run}", f"--out={tmp_path}/eval.jsonl", "--max_new_tokens=3"]) == 0
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    hidden = (DeprecationWarning, PendingDeprecationWarning)  # not shown to users by default
    assert not [str(x.message) for x in recwarn if not issubclass(x.category, hidden)]
    pieces = [p.strip() for p in re.split(r"[\r\n]", capfd.readouterr().err) if p.strip()]
    assert not [p for p in pieces if not re.search(r"\d+%\|", p)]


def test_good_flags_keep_their_types():
    """The pre-check passes good flags on unchanged in meaning: text stays text (a folder named 2024,
    comma lists and regular expressions), numbers stay numbers, true/false become booleans."""
    from fire.parser import DefaultParseValue

    from qdora.cli import _flag_values

    args = ["--targets=q_proj,v_proj", "--magnitude_only", r".*\.k_proj", "--out_dir", "2024", "--lr", "1e-3",
            "--merge_for_eval=FALSE", "--steps=3", "--steps=5", "--seed", "-1", "--trust_remote_code"]
    parsed = {a[2:].partition("=")[0]: DefaultParseValue(a.partition("=")[2]) for a in _flag_values("train", args)}
    assert parsed == {"targets": "q_proj,v_proj", "magnitude_only": r".*\.k_proj", "out_dir": "2024", "lr": 1e-3,
                      "merge_for_eval": False, "steps": 5, "seed": -1, "trust_remote_code": True}
    assert AdapterConfig(targets=parsed["targets"]).targets == ("q_proj", "v_proj")
