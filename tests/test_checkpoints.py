import os
import pickle
import random

import numpy as np
import pytest
import torch

from simmim_cli import checkpoints
from simmim_cli.errors import SimmimError


class Exploit:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/simmim-pwned",))


def test_a_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": Exploit()}, path)
    if os.path.exists("/tmp/simmim-pwned"):
        os.remove("/tmp/simmim-pwned")
    with pytest.raises(SimmimError, match="could run code"):
        checkpoints.load_checkpoint(path)
    assert not os.path.exists("/tmp/simmim-pwned")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_and_missing_checkpoints_are_user_errors(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"model": {"w": torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(SimmimError, match="truncated or corrupt"):
        checkpoints.load_checkpoint(path)
    with pytest.raises(SimmimError, match="not found"):
        checkpoints.load_checkpoint(tmp_path / "none.pth")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(SimmimError):
        checkpoints.load_checkpoint(plain)


def test_save_is_atomic_and_keeps_the_newest(tmp_path):
    for step in (5, 10, 15, 20):
        checkpoints.save_checkpoint({"step": step, "model": {"w": torch.full((2,), float(step))}},
                                    tmp_path / checkpoints.checkpoint_name(step))
    assert not list(tmp_path.glob(".*tmp"))
    checkpoints.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == [
        "checkpoint-00000015.pth", "checkpoint-00000020.pth"]
    loaded = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(tmp_path))
    assert loaded["step"] == 20 and loaded["format_version"] == checkpoints.FORMAT_VERSION


def test_random_states_round_trip_through_a_safe_checkpoint(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    path = tmp_path / "rng.pth"
    checkpoints.save_checkpoint({"rng": checkpoints.rng_state()}, path)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    checkpoints.set_rng_state(checkpoints.load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_wrapper_prefixes_are_stripped():
    state = {"module._orig_mod.encoder.w": 1, "encoder._orig_mod.b": 2, "decoder.0.weight": 3}
    assert checkpoints.strip_prefixes(state) == {"encoder.w": 1, "encoder.b": 2, "decoder.0.weight": 3}


def test_a_saved_state_dict_keeps_its_type_and_module_versions(tmp_path):
    # save_checkpoint moves tensors to the CPU (a GPU run's checkpoint loads anywhere); the state_dict it rebuilds
    # stays an OrderedDict with the _metadata (module versions) that load_state_dict's version hooks read
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    checkpoints.save_checkpoint({"model": model.state_dict(), "pair": (1, [torch.ones(1)])}, tmp_path / "c.pth")
    saved = torch.load(tmp_path / "c.pth", weights_only=True)
    assert type(saved["model"]) is type(model.state_dict())
    assert saved["model"]._metadata == model.state_dict()._metadata
    assert saved["pair"][0] == 1 and torch.equal(saved["pair"][1][0], torch.ones(1))
    torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)).load_state_dict(saved["model"])
