"""`qdora` on the command line: each command maps its flags onto the config dataclasses."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import sys

import fire
import fire.parser

from .analyze import AnalyzeConfig, analyze
from .compare import PER_METHOD, CompareConfig, compare
from .evaluate import EvalConfig, eval_run
from .memory import MemoryConfig, memory
from .export import ExportConfig, export
from .model import AdapterConfig
from .train import TrainConfig, train

# OSError covers missing files, unwritable folders and full disks (FileNotFoundError, PermissionError, ...).
_ERRORS = (ValueError, OSError, FloatingPointError, RuntimeError)


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


def _flag_values(name: str, args: list[str]) -> list[str]:
    """`qdora NAME` arguments checked against the command's flags and types, as --flag=value.

    Runs before fire, which would run a command first and complain about a stray argument only
    afterwards, and would pass `--rank abc` or `--model 123` on with the wrong type."""
    params = COMMANDS[name].__signature__.parameters
    given = [a[2:].partition("=")[0].replace("-", "_") for a in args if a.startswith("--") and a != "--help"]
    unknown = [f for f in dict.fromkeys(given) if f not in params]
    if unknown:
        near = (difflib.get_close_matches(unknown[0], params, n=1)
                or [f for f in params if f.endswith("_" + unknown[0])])  # --lr in compare: --qdora_lr, ...
        hint = f"did you mean {' or '.join('--' + f for f in near)}? " if near else ""
        raise ValueError(f"unknown flag(s) {', '.join('--' + f for f in unknown)} for `qdora {name}`; {hint}"
                         f"see `qdora {name} --help`")
    out, flags, i = [], {}, 0
    while i < len(args):
        arg, i = args[i], i + 1
        if arg in ("--help", "-h"):
            out.append(arg)
            continue
        if not arg.startswith("--") or arg == "--":
            raise ValueError(f"unexpected argument {arg!r} for `qdora {name}`; flags are written --name=value "
                             f"(see `qdora {name} --help`)")
        flag, eq, raw = arg[2:].partition("=")
        flag = flag.replace("-", "_")
        if not eq and i < len(args) and not args[i].startswith("--"):
            raw, i = args[i], i + 1
        elif not eq:
            raw = None  # a bare --flag: fire's True
        flags[flag] = _typed(flag, raw, params[flag])  # a flag given twice: the last one counts
    return out + list(flags.values())


def _typed(flag: str, raw: str | None, param: inspect.Parameter) -> str:
    """One flag as --flag=value with the value checked against the field's annotation; strings are
    passed quoted, so fire keeps --out_dir=2024 or --model=123 as text."""
    kind = param.annotation if isinstance(param.annotation, str) else getattr(param.annotation, "__name__",
                                                                              str(param.annotation))
    kind = kind.replace(" ", "")
    example = f" (e.g. --{flag}={param.default})" if param.default not in (inspect.Parameter.empty, None) else ""
    if kind == "bool":
        if raw is None or raw.lower() in ("true", "false"):
            return f"--{flag}={raw is None or raw.lower() == 'true'}"
        raise ValueError(f"--{flag} expects true or false, got {raw!r}")
    if raw is None:
        if kind in ("int", "float", "int|None", "float|None"):
            raise ValueError(f"--{flag} needs a value{example}")
        return f"--{flag}"
    if kind in ("str", "str|None", "tuple[str,...]") and not (kind == "str|None" and raw == "None"):
        return f"--{flag}={raw!r}"
    if kind in ("int", "float", "int|None", "float|None"):
        value = fire.parser.DefaultParseValue(raw)
        want = int if kind.startswith("int") else (int, float)
        if not (isinstance(value, want) and not isinstance(value, bool) or kind.endswith("None") and value is None):
            what = "an integer" if kind.startswith("int") else "a number"
            raise ValueError(f"--{flag} expects {what}, got {raw!r}{example}")
    return f"--{flag}={raw}"


def _message(exc: BaseException) -> str:
    """The error as one line; an operating-system error names the path and what to check."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename!r}; check the path and its permissions"
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qdora` console script. Errors print one line; --debug shows the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        if argv and not argv[0].startswith("-"):
            if argv[0] not in COMMANDS:
                near = difflib.get_close_matches(argv[0], COMMANDS, n=1)
                raise ValueError(f"unknown command {argv[0]!r}; " + (f"did you mean {near[0]}? " if near else "")
                                 + f"commands: {', '.join(COMMANDS)} (see `qdora --help`)")
            if hasattr(COMMANDS[argv[0]], "__signature__"):
                argv = [argv[0], *_flag_values(argv[0], argv[1:])]
        fire.Fire(COMMANDS, command=argv, name="qdora")
    except _ERRORS as exc:
        if debug:
            raise
        print(f"qdora: error: {_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qdora: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
