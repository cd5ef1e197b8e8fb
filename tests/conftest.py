import json
import os

# Triton kernels run in the interpreter unless asked otherwise (TRITON_INTERPRET=0 on a GPU). It must
# be set before anything imports triton, and bitsandbytes and transformers do, so here, first.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest
import torch

# The tests use tiny shapes, where two intra-op threads cost far more in synchronization than they
# save (a 64 x 172 linear: ~16 ms with 2 threads, < 1 ms with 1 on the 2-core CI machine).
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
STORIES = SHARED / "stories260K"
GSM8K = SHARED / "gsm8k"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def need(path: Path) -> Path:
    """Skip a test whose real data file is not beside the checkout."""
    if not path.exists():
        pytest.skip(f"{path} is not present (shared data lives in ../shared/data)")
    return path


def metrics(out: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def override(base: list[str], extra) -> list[str]:
    """`base` flags with those named in `extra` (--name=value) replaced by extra's, which come last."""
    names = {e.split("=")[0] for e in extra}
    return [f for f in base if f.split("=")[0] not in names] + list(extra)


def gsm8k_rows(folder: Path, n: int) -> Path:
    """The first n short GSM8K training rows (under 330 characters of JSON) as folder/rows.jsonl."""
    src = need(GSM8K / "train.jsonl")
    lines = [line for line in src.read_text().splitlines() if len(line) < 330][:n]
    path = folder / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
