"""torchrun entry point: `torchrun --nproc_per_node N launch/train.py [qdora train flags]`.

Initializes the process group from torchrun's environment (NCCL on CUDA, gloo on CPU), then runs
the same `qdora train` command, which shards the model with FSDP2 because a process group exists.
Exits non-zero if this rank fails; torchrun then stops the other ranks and reports the failure.
"""

import os
import sys

# Before bitsandbytes/triton are imported: the repository's kernels/ folder must not shadow the
# `kernels` package when this script is run from a source checkout (python puts launch/ on the path,
# not the root, so only the working directory matters).
if sys.path and os.path.abspath(sys.path[0]) == os.getcwd():
    sys.path.pop(0)
# tqdm reads TQDM_* once, at import: only rank 0 shows progress bars.
if os.environ.get("RANK", "0") != "0":
    os.environ["TQDM_DISABLE"] = "1"

import torch.distributed as dist  # noqa: E402

from qdora import distributed  # noqa: E402
from qdora.cli import main  # noqa: E402


def _device(argv: list[str]) -> str:
    """The value of --device (either `--device=cpu` or `--device cpu`), last one wins."""
    value = "auto"
    for i, arg in enumerate(argv):
        if arg.startswith("--device="):
            value = arg.split("=", 1)[1]
        elif arg == "--device" and i + 1 < len(argv):
            value = argv[i + 1]
    return "cpu" if value == "cpu" else "auto"


def run(argv: list[str]) -> int:
    distributed.init_from_env(_device(argv))
    try:
        code = main(["train", *argv])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
