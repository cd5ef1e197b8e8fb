"""Process groups and FSDP2 sharding: what changes when `train()` runs under torchrun.

Rank, world size and backend come from the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT): NCCL on CUDA, gloo on CPU. A run without WORLD_SIZE > 1 and without
an initialized process group is a plain single process and none of this is used.

Sharding (`shard_model`): one `fully_shard` unit per decoder block, then the root (embeddings,
final norm, head). Every parameter is sharded by its first dimension, the NF4 payload included:
`NF4Weight.packed` (uint8, out x in_pad/2) and `NF4Weight.absmax` (uint8 or float32,
out x blocks) are plain row-major Parameters, so each rank holds about 1/N of the 4-bit model.
Mixed precision is qdora's own (autocast plus frozen weights stored in the compute dtype, adapters
cast inside their forward), so the FSDP2 policy leaves param_dtype unset: FSDP2 skips integer
parameters but would cast a float32 absmax (double_quant=False) to bf16 in the all-gather, losing
scale bits. Gradients are reduced in float32 and summed, not averaged, because each rank's loss
is already divided by the global answer-token count.
"""

from __future__ import annotations

import os
import pickle
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """True under torchrun with several ranks, or when a process group is already initialized."""
    return (dist.is_available() and dist.is_initialized()) or env_world_size() > 1


def init_from_env(device: str = "auto", timeout_s: float = 600.0) -> torch.device:
    """Initialize the default process group from torchrun's environment (no-op if done already)
    and return this rank's device: cuda:LOCAL_RANK with NCCL when CUDA is visible (and `device` is
    auto or cuda), else CPU with gloo."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device != "cpu"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if cuda else None)
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(value: float, device: torch.device) -> float:
    """Sum a Python float over ranks (the value itself in a single process)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks (Hugging Face's `_no_split_modules` classes), in model order."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        blocks = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no recognizable decoder blocks to shard")
    return blocks


class Root(nn.Module):
    """The FSDP2 root around a model: `root(fn, *args)` runs `fn(model, *args)` inside the root's
    forward, so the root's parameters (embeddings, final norm, head) are gathered for code that
    calls the model's parts directly (the chunked loss calls the decoder, then the head) or calls
    it many times (generation)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def _policies(device: torch.device, cpu_offload: bool) -> dict:
    """fully_shard's arguments. The mesh is explicit (FSDP2 would default to CUDA whenever it is
    visible, even for a gloo run on the CPU); fully_shard moves each unit's parameters and buffers
    to its device (parameter shards stay on the CPU with cpu_offload), so the caller never moves
    the whole model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    key = (device.type, world_size())
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device.type, (world_size(),))
    return {"mesh": _MESHES[key],
            "mp_policy": MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32),
            "offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload
            else OffloadPolicy()}


_MESHES: dict = {}


def _sum_gradients(unit) -> None:
    # Each rank's loss is a share of the global sum: sum the gradient shards instead of averaging.
    unit.set_gradient_divide_factor(1.0)
    unit.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


def shard_block(block: nn.Module, device: torch.device, cpu_offload: bool = False) -> None:
    """Make one decoder block an FSDP2 unit (its parameters become this rank's row shards on `device`)."""
    from torch.distributed.fsdp import fully_shard

    _sum_gradients(fully_shard(block, **_policies(device, cpu_offload)))


def shard_root(model: nn.Module, device: torch.device, cpu_offload: bool = False) -> Root:
    """The FSDP2 root unit over what the blocks left (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    root = fully_shard(Root(model), **_policies(device, cpu_offload))
    _sum_gradients(root)
    return root


def shard_model(model: nn.Module, device: torch.device, cpu_offload: bool = False) -> Root:
    """FSDP2: one unit per decoder block plus the root; shards `model` in place (its parameter
    names do not change) and returns the Root to call it through."""
    for block in decoder_blocks(model):
        shard_block(block, device, cpu_offload)
    return shard_root(model, device, cpu_offload)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) parameter."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every rank when sharded (a collective: call on all ranks)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers this rank holds."""
    return sum(local_tensor(t).numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def nf4_payload_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes this rank holds, bytes in all) of the NF4 payload: packed codes and block scales (the
    small replicated double-quantization constants are not counted)."""
    from .nf4 import NF4Weight

    tensors = [t for m in model.modules() if isinstance(m, NF4Weight) for t in (m.packed, m.absmax)]
    return (sum(local_tensor(t).numel() * t.element_size() for t in tensors),
            sum(t.numel() * t.element_size() for t in tensors))


# What a DCP `.metadata` pickle may name: its own dataclasses, torch.Size, dtypes and layouts, a path.
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                               "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                               "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _DCP_GLOBALS.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise ValueError(f"checkpoint metadata names {module}.{name}, which a torch.distributed.checkpoint "
                         f"never writes; refusing to unpickle it (the file is corrupt or not from qdora)")


def safe_reader(path: str):
    """A DCP FileSystemReader whose `.metadata` (a pickle in torch's format) is read by an unpickler
    that admits only DCP's own metadata classes. The metadata is read once here, so a bad file raises
    a one-line ValueError before dcp.load starts. Use with `safe_planner()`: DCP's default planner
    unpickles the non-tensor payloads (the optimizer's param_groups) with weights_only=False."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata_path = self._get_metadata_path(kwargs.get("rank"))
            try:
                with self.fs.create_stream(metadata_path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError) as exc:
                raise ValueError(f"checkpoint metadata {str(metadata_path)!r} cannot be read ({exc}); "
                                 f"the checkpoint is corrupt: resume from an earlier one") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    reader = SafeReader(path)
    reader.read_metadata()  # fail here with our one-line error, not inside dcp.load's per-rank wrapping
    return reader


def safe_planner():
    """DCP's default load planner, except that non-tensor payloads are read with
    torch.load(weights_only=True): plain Python values load, pickled code does not run."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:  # DefaultLoadPlanner's, with weights_only=True
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise ValueError(f"checkpoint entry {read_item.dest_index.fqn!r} is not plain data "
                                 f"({str(exc).splitlines()[0]}); refusing to unpickle it: the checkpoint is "
                                 f"corrupt or not from qdora") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


def load_state(state: dict, path: str) -> None:
    """dcp.load into `state` from folder `path`, never unpickling code (see safe_reader, safe_planner);
    any failure becomes one ValueError line."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=safe_reader(path), planner=safe_planner(), no_dist=world_size() == 1)
    except CheckpointException as exc:
        inner = [getattr(f, "exception", f) for f in exc.failures.values()]
        first = next((e for e in inner if isinstance(e, ValueError)), inner[0] if inner else exc)
        raise ValueError(str(first).splitlines()[0] if isinstance(first, ValueError) else
                         f"checkpoint {path!r} cannot be loaded ({type(first).__name__}: "
                         f"{str(first).splitlines()[0] if str(first) else ''}); it is corrupt: resume from an "
                         f"earlier one") from None
