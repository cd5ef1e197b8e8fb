from pathlib import Path

import pytest
import torch

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
