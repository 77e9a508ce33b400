"""Safe checkpoints: atomic writes, integrity, no code execution on load, untouched state on refusal."""
import os
import pickle

import pytest
import torch
from torch import nn

import hypergrad as H
from hypergrad import checkpoint as C


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = H.MADA(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def test_round_trip(tmp_path):
    model, opt = _setup()
    path = tmp_path / "ckpt.pt"
    C.save(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "iter": 3})
    payload = C.load(path)
    fresh, fresh_opt = _setup(seed=1)
    C.restore(fresh, fresh_opt, payload)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(torch.cat(opt._q), torch.cat(fresh_opt._q))
    assert payload["iter"] == 3


def test_plain_torch_load_reads_it(tmp_path):
    model, opt = _setup()
    path = tmp_path / "ckpt.pt"
    C.save(path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    data = torch.load(path, weights_only=True)
    assert data["format"] == C.FORMAT and set(data["payload"]) == {"model", "optimizer"}


def test_truncated_and_modified_files_are_refused(tmp_path):
    model, opt = _setup()
    path = tmp_path / "ckpt.pt"
    C.save(path, {"model": model.state_dict()})
    data = path.read_bytes()
    (tmp_path / "short.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(C.CheckpointError, match="corrupt"):
        C.load(tmp_path / "short.pt")
    # a flipped byte inside a tensor's data: torch.load alone would not notice
    raw = torch.load(path, weights_only=True)
    weight = raw["payload"]["model"]["0.weight"]
    needle = weight.reshape(-1)[:4].numpy().tobytes()
    pos = data.index(needle)
    flipped = bytearray(data)
    flipped[pos] ^= 0x01
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    with pytest.raises(C.CheckpointError, match="digest"):
        C.load(tmp_path / "flipped.pt")
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(C.CheckpointError, match="corrupt or not a checkpoint|refused"):
        C.load(tmp_path / "other.pt")
    torch.save({"model": model.state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(C.CheckpointError, match="not a hypergrad checkpoint"):
        C.load(tmp_path / "plain.pt")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_a_checkpoint_crafted_to_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": C.FORMAT, "sha256": "x", "payload": {"model": _Exploit()}}, tmp_path / "evil.pt")
    with pytest.raises(C.CheckpointError, match="refused"):
        C.load(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _setup()
    path = tmp_path / "ckpt.pt"
    C.save(path, {"model": model.state_dict(), "iter": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        C.save(path, {"model": model.state_dict(), "iter": 2})
    monkeypatch.undo()
    assert C.load(path)["iter"] == 1


def test_mismatched_checkpoints_leave_the_running_state_untouched(tmp_path):
    model, opt = _setup()
    path = tmp_path / "ckpt.pt"
    C.save(path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    payload = C.load(path)

    other = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))  # different head shape
    other_opt = H.MADA(other.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(C.CheckpointError, match="shapes"):
        C.restore(other, other_opt, payload)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))

    same, _ = _setup(seed=2)
    hyperadam = H.HyperAdam(same.parameters(), lr=1e-2)  # another family
    before = [p.detach().clone() for p in same.parameters()]
    with pytest.raises(C.CheckpointError, match="different optimizer"):
        C.restore(same, hyperadam, payload)
    assert all(torch.equal(a, b) for a, b in zip(before, same.parameters()))
