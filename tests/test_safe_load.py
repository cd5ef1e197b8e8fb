"""Loading a training checkpoint never runs code: DCP's pickled metadata goes through an unpickler
that admits only DCP's own classes."""

import dataclasses
import io
import os
import pickle
import re
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from qdora.distributed import load_state, safe_reader


def _save(path, state):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process": it is
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def _load(path, state):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        load_state(state, str(path))  # what checkpoint.load_checkpoint calls


def test_safe_reader_loads_what_dcp_saved(tmp_path):
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 5)).sum().backward()
    opt.step()
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optim": opt.state_dict(),
             "extra": {"step": 3, "dtype": torch.bfloat16}}
    _save(tmp_path / "ck", saved)
    got = {"model": {k: torch.zeros_like(v) for k, v in saved["model"].items()},
           "optim": {"state": {k: {n: torch.zeros_like(t) for n, t in v.items()}
                               for k, v in saved["optim"]["state"].items()},
                     "param_groups": saved["optim"]["param_groups"]},
           "extra": {"step": 0, "dtype": torch.float32}}
    _load(tmp_path / "ck", got)
    for k, v in saved["model"].items():
        assert torch.equal(got["model"][k], v)
    for k, v in saved["optim"]["state"].items():
        for n, t in v.items():
            assert torch.equal(got["optim"]["state"][k][n], t)
    assert got["extra"] == {"step": 3, "dtype": torch.bfloat16}


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_safe_reader_refuses_a_metadata_pickle_that_runs_code(tmp_path):
    model = torch.nn.Linear(5, 3)
    _save(tmp_path / "ck", {"model": model.state_dict()})
    marker = tmp_path / "pwned"
    with open(tmp_path / "ck" / ".metadata", "wb") as f:
        pickle.dump(_Exploit(str(marker)), f)
    with pytest.raises(ValueError, match=r"names posix\.makedirs|names os\.makedirs"):
        _load(tmp_path / "ck", {"model": model.state_dict()})
    assert not marker.exists()


def test_safe_reader_names_a_truncated_metadata_file(tmp_path):
    model = torch.nn.Linear(5, 3)
    _save(tmp_path / "ck", {"model": model.state_dict()})
    meta = tmp_path / "ck" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:40])
    with pytest.raises(ValueError, match="checkpoint is corrupt"):
        _load(tmp_path / "ck", {"model": model.state_dict()})


def _trained():
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 5)).sum().backward()
    opt.step()
    return model, opt


def test_a_byte_payload_that_runs_code_is_refused(tmp_path):
    """Non-tensor entries (the optimizer's param_groups) are torch.save'd pickles inside the .distcp
    file; DCP's default planner reads them with weights_only=False. Ours must not."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    model, opt = _trained()
    _save(tmp_path / "ck", {"optim": opt.state_dict()})
    meta = safe_reader(str(tmp_path / "ck")).read_metadata()
    name = next(k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    info = next(v for k, v in meta.storage_data.items() if k.fqn == name)
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(_Exploit(str(marker)), buf)
    data = (tmp_path / "ck" / info.relative_path).read_bytes()
    # Append the payload and point the entry at it (metadata rewritten as DCP writes it).
    (tmp_path / "ck" / info.relative_path).write_bytes(data + buf.getvalue())
    for k in list(meta.storage_data):
        if k.fqn == name:
            meta.storage_data[k] = dataclasses.replace(meta.storage_data[k], offset=len(data),
                                                       length=len(buf.getvalue()))
    meta.storage_meta = None
    with open(tmp_path / "ck" / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    with pytest.raises(ValueError, match=f"checkpoint entry '{re.escape(name)}' is not plain data"):
        _load(tmp_path / "ck", {"optim": opt.state_dict()})
    assert not marker.exists()
    # The untampered entries of the same kind still load through the same path.
    _save(tmp_path / "ok", {"optim": opt.state_dict()})
    _, fresh = _trained()
    state = {"optim": fresh.state_dict()}
    _load(tmp_path / "ok", state)
    assert state["optim"]["param_groups"][0]["lr"] == 1e-3


def test_a_safetensors_index_cannot_point_outside_the_model_folder(tmp_path):
    from qdora.streaming import safetensors_index

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(
        '{"weight_map": {"lm_head.weight": "../elsewhere/model.safetensors"}}')
    with pytest.raises(ValueError, match="maps lm_head.weight to .*outside the model folder"):
        safetensors_index(str(folder))
