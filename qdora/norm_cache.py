"""When DoRALinear's cached norm and check on g are stale: stamps of the tensors they were computed
from, and a process-wide count of optimizer steps."""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def invalidate_norm_caches() -> None:
    """Make every DoRALinear recompute its norm and its check on g at the next forward, for writes
    to A, B or m that the caches cannot see (see stamp): in-place writes through `.data`
    (`p.data.copy_(t)`), and under FSDP2 in-place edits of the sharded parameters outside an
    optimizer step (the all-gather refills the same unsharded parameters without a version bump).
    load_state_dict drops a DoRALinear's caches itself; qdora's checkpoint loading calls this."""
    _count_optimizer_step(None, None, None)


# Fused AdamW updates parameters without bumping their version counters, so the norm cache is also
# keyed on a process-wide count of optimizer steps (any torch.optim optimizer).
register_optimizer_step_post_hook(_count_optimizer_step)


def stamp(tensors: tuple[torch.Tensor, ...], steps: bool) -> tuple:
    """What a cached value computed from `tensors` depends on, besides the tensors themselves: the
    optimizer-step count (fused AdamW bumps no version counter) when `steps`, and each tensor's
    version counter (in-place edits, load_state_dict) and storage object. FSDP2 refills the same
    storage before every forward, resized in place at a new address, so addresses are not used;
    `.data = t` brings another storage. The caches keep the tensors themselves too (compared by
    identity, and kept alive so that no other tensor can take their place): a replaced Parameter
    or torch.func.functional_call's tensors are other objects."""
    return (_optimizer_steps if steps else None,  # inference tensors keep no version (nor change outside it)
            *((None if t.is_inference() else t._version, t.untyped_storage()._cdata) for t in tensors))


def cache_hit(cache: tuple | None, tensors: tuple[torch.Tensor, ...], steps: bool) -> bool:
    """Whether `cache` = (stamp, tensors, value...) was made from these very, unchanged tensors."""
    return (cache is not None and len(cache[1]) == len(tensors) and all(a is b for a, b in zip(cache[1], tensors))
            and cache[0] == stamp(tensors, steps))
