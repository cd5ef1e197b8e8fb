"""`qdora` on the command line: each command maps its flags onto the config dataclasses."""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys

import fire

from .analyze import AnalyzeConfig, analyze
from .compare import PER_METHOD, CompareConfig, compare
from .evaluate import EvalConfig, eval_run
from .memory import MemoryConfig, memory
from .export import ExportConfig, export
from .model import AdapterConfig
from .train import TrainConfig, train

_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, NotADirectoryError, PermissionError, RuntimeError)


def _field_docs(cls) -> dict[str, str]:
    """Per-field help from a dataclass docstring's "Args:" section (or its free text)."""
    doc = inspect.getdoc(cls) or ""
    docs, current = {}, None
    for line in doc.splitlines():
        m = re.match(r"\s*(\w+):\s*(.*)", line)
        if m and m.group(1) in {f.name for f in dataclasses.fields(cls)}:
            current = m.group(1)
            docs[current] = m.group(2)
        elif current and line.startswith(" " * 8):
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def command(fn, summary: str, *configs, exclude: tuple[str, ...] = ()):
    """A fire-callable whose signature and --help list every field of `configs` with its default.
    Fields named in `exclude` are set by `fn` itself for configs after the first (no flag)."""
    fields = [(cls, f) for i, cls in enumerate(configs) for f in dataclasses.fields(cls)
              if i == 0 or f.name not in exclude]
    params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
                                default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
              for _, f in fields]
    lines = [summary, "", "Args:"]
    for cls in configs:
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            if cls is not configs[0] and f.name in exclude:
                continue
            lines.append(f"    {f.name}: {docs.get(f.name, '')}")

    def run(**flags):
        unknown = set(flags) - {f.name for _, f in fields}
        if unknown:
            raise ValueError(f"unknown flag(s) {sorted(unknown)}; see --help")
        built = [cls(**{f.name: flags[f.name] for c, f in fields if c is cls and f.name in flags})
                 for cls in configs]
        fn(*built)

    run.flags = {f.name for _, f in fields}
    run.__signature__ = inspect.Signature(params)
    run.__doc__ = "\n".join(lines)
    run.__name__ = fn.__name__
    return run


COMMANDS = {
    "train": command(train, "Fine-tune a model with QDoRA, QLoRA or full FT and score held-out exact match.",
                     TrainConfig, AdapterConfig),
    "compare": command(compare, "Train QDoRA, QLoRA and full FT on the same budget; write a table and a plot.",
                       CompareConfig, TrainConfig, AdapterConfig, exclude=PER_METHOD),
    "eval": command(eval_run, "Score a trained run's exact match on held-out problems (greedy, merged weights).",
                    EvalConfig),
    "export": command(export, "Write a merged Hugging Face checkpoint, a PEFT adapter, or import a PEFT adapter.",
                      ExportConfig),
    "memory": command(memory, "Predict the per-rank peak memory of a training step from a model config (no weights).",
                      MemoryConfig, AdapterConfig),
    "analyze": command(analyze, "DoRA paper weight-decomposition analysis (ΔM, ΔD per layer, scatter plot) of "
                       "fine-tuned models against their base.", AnalyzeConfig),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qdora` console script. Errors print one line; --debug shows the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        if argv and argv[0] in COMMANDS:
            # fire would run the command first and complain about unused flags afterwards.
            given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv[1:] if a.startswith("--")}
            unknown = sorted(given - COMMANDS[argv[0]].flags - {"help", ""})
            if unknown:
                raise ValueError(f"unknown flag(s) {', '.join('--' + u for u in unknown)} for "
                                 f"`qdora {argv[0]}`; see `qdora {argv[0]} --help`")
        fire.Fire(COMMANDS, command=argv, name="qdora")
    except _ERRORS as exc:
        if debug:
            raise
        print(f"qdora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qdora: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
