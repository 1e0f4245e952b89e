"""Checkpoints: atomic writes, weights_only reads, and clear errors for damaged or mismatched files
that leave the user's files as they were."""

import hashlib
import json
import os
import pickle

import pytest
import torch

from fastnvp.training import checkpoint as ckpt
from fastnvp.training.train import TrainConfig, load_run, train

TINY = dict(layers=2, hidden=8, steps=2, batch=16, n_train=64, n_test=32, eval_every=2)


def snapshot(directory):
    """Name -> SHA-256 of every file under ``directory``."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(**TINY), out, progress=False)
    return out


def payload_of(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def test_save_load_round_trip_with_digest(tmp_path):
    payload = {"format": "x/1", "w": torch.randn(3, 4), "nested": {"n": [1, 2.5, None, "s"]}}
    ckpt.save(tmp_path / "a.pt", payload)
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    assert raw[ckpt.DIGEST_KEY] == ckpt.digest(payload)
    loaded = ckpt.load(tmp_path / "a.pt", expected_format="x/1")
    assert torch.equal(loaded["w"], payload["w"]) and loaded["nested"] == payload["nested"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left behind


def test_digest_sees_every_value():
    base = {"w": torch.zeros(4), "k": 1, "s": "a"}
    changed = [
        {**base, "w": torch.tensor([0.0, 0.0, 1e-30, 0.0])},
        {**base, "w": torch.zeros(4, dtype=torch.float64)},
        {**base, "w": torch.zeros(2, 2)},
        {**base, "k": 2},
        {**base, "k": 1.0},
        {**base, "s": "b"},
        {**base, "extra": None},
    ]
    digests = {ckpt.digest(p) for p in changed} | {ckpt.digest(base)}
    assert len(digests) == len(changed) + 1


def test_flipped_byte_in_tensor_data_is_reported(run_dir, tmp_path):
    path = tmp_path / "checkpoint.pt"
    data = bytearray((run_dir / "checkpoint.pt").read_bytes())
    # Flip one byte of the weights; torch's zip container does not notice, the digest does.
    state = payload_of(run_dir)["model"]
    weight = next(v for k, v in state.items() if k.endswith("weight"))
    needle = weight.flatten()[:4].numpy().tobytes()
    offset = bytes(data).find(needle)
    assert offset > 0
    data[offset + 1] ^= 0x40
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # loads "fine" on its own...
    with pytest.raises(ckpt.CheckpointError, match="corrupted.*SHA-256"):
        load_run(path)


@pytest.mark.parametrize("keep", [0, 10, 0.5, -1], ids=["empty", "10B", "half", "last-byte"])
def test_truncated_file(run_dir, tmp_path, keep):
    data = (run_dir / "checkpoint.pt").read_bytes()
    cut = {0: 0, 10: 10, 0.5: len(data) // 2, -1: len(data) - 1}[keep]
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(data[:cut])
    before = snapshot(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="truncated|not a plain tensor checkpoint"):
        load_run(tmp_path)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("text", ["this is not a checkpoint\n" * 20, "hello world"])
def test_a_text_file_is_refused_with_a_checkpoint_error(run_dir, tmp_path, text):
    # torch's weights_only unpickler raised a bare IndexError or KeyError on such bytes.
    (tmp_path / "checkpoint.pt").write_text(text)
    with pytest.raises(ckpt.CheckpointError, match="not a PyTorch checkpoint|not a plain tensor"):
        load_run(tmp_path)


class Payload:
    """Stands in for an arbitrary object a hostile pickle would rebuild and run."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_pickle_with_code_is_refused_not_run(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "fastnvp-run/1", "model": Payload()}, path)
    with pytest.raises(ckpt.CheckpointError, match="refusing to load") as info:
        load_run(tmp_path)
    # The message never suggests weights_only=False.
    assert "weights_only` set to `False`" not in str(info.value)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


def test_config_that_does_not_match_the_weights(run_dir, tmp_path):
    payload = payload_of(run_dir)
    payload.pop(ckpt.DIGEST_KEY)
    payload["config"]["hidden"] = 16  # the weights are for hidden=8
    ckpt.save(tmp_path / "checkpoint.pt", payload)
    (tmp_path / "config.json").write_text(json.dumps(payload["config"]))
    before = snapshot(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"hidden=16.*wrong shape.*\(8, 2\)"):
        load_run(tmp_path)
    # Resuming the run fails the same way, before writing anything.
    with pytest.raises(ckpt.CheckpointError, match="do not match"):
        train(TrainConfig(**TINY), tmp_path, resume=True, progress=False)
    assert snapshot(tmp_path) == before


def test_missing_and_unexpected_weights(run_dir, tmp_path):
    payload = payload_of(run_dir)
    payload.pop(ckpt.DIGEST_KEY)
    state = payload["model"]
    state["flow.extra"] = torch.zeros(1)
    del state[next(k for k in state if k.startswith("flow.s.1."))]
    ckpt.save(tmp_path / "checkpoint.pt", payload)
    with pytest.raises(ckpt.CheckpointError, match="missing: flow.s.1.*unexpected: flow.extra"):
        load_run(tmp_path)


def test_invalid_stored_config(run_dir, tmp_path):
    payload = payload_of(run_dir)
    payload.pop(ckpt.DIGEST_KEY)
    payload["config"]["layers"] = -3
    ckpt.save(tmp_path / "checkpoint.pt", payload)
    with pytest.raises(ckpt.CheckpointError, match="stored config is invalid.*layers"):
        load_run(tmp_path)


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "c.pt"
    ckpt.save(path, {"v": torch.ones(2)})
    before = snapshot(tmp_path)
    with pytest.raises(TypeError, match="unsupported"):
        ckpt.save(path, {"v": object()})
    with pytest.raises(TypeError, match="payload must be a dict"):
        ckpt.save(path, [1, 2])
    assert snapshot(tmp_path) == before


def test_load_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="path must be a str or Path"):
        ckpt.load(3)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint file"):
        ckpt.load(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ckpt.CheckpointError, match="holds a list"):
        ckpt.load(tmp_path / "list.pt")
    assert issubclass(ckpt.CheckpointError, ValueError)
