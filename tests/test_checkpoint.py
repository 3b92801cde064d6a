import os

import pytest
import torch

from mt.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint
from mt.errors import CheckpointError


def state():
    return {"model": {"w": torch.arange(4.0)}, "config": {"a": 1}, "tokenizer": {"src_model": b"xx"}, "step": 3}


def test_round_trip_and_no_temp_files(tmp_path):
    path = save_checkpoint(state(), tmp_path / "ck" / "last.pt")
    loaded = load_checkpoint(path)
    assert loaded["step"] == 3 and loaded["tokenizer"]["src_model"] == b"xx"
    torch.testing.assert_close(loaded["model"]["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_missing_corrupt_and_foreign(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    path = save_checkpoint(state(), tmp_path / "last.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"just": "a dict"}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an mt checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"format": "mt-checkpoint", "version": 1, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(tmp_path / "evil.pt")


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(state(), tmp_path / "last.pt")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint({**state(), "step": 4}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-links-copy"])
def test_copy_checkpoint_survives_the_next_save(tmp_path, monkeypatch, links):
    """best.pt made from last.pt keeps its content when last.pt is saved again, and replaces an
    older best.pt; without hard links it is a copy."""
    if not links:
        def no_link(*a, **k):
            raise OSError("hard links not supported")

        monkeypatch.setattr(os, "link", no_link)
    save_checkpoint({**state(), "step": 1}, tmp_path / "best.pt")
    last = save_checkpoint({**state(), "step": 5}, tmp_path / "last.pt")
    best = copy_checkpoint(last, tmp_path / "best.pt")
    assert load_checkpoint(best)["step"] == 5
    assert os.path.samefile(best, last) == links
    save_checkpoint({**state(), "step": 6}, last)
    assert load_checkpoint(best)["step"] == 5 and load_checkpoint(last)["step"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_copy_checkpoint_onto_the_same_file_leaves_nothing_behind(tmp_path):
    last = save_checkpoint(state(), tmp_path / "last.pt")
    best = copy_checkpoint(last, tmp_path / "best.pt")
    copy_checkpoint(last, best)  # already the same file: the rename does nothing
    copy_checkpoint(last, last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    assert load_checkpoint(best)["step"] == 3


def test_copy_checkpoint_of_a_missing_file_keeps_the_old_one(tmp_path):
    best = save_checkpoint({**state(), "step": 2}, tmp_path / "best.pt")
    with pytest.raises(OSError):
        copy_checkpoint(tmp_path / "last.pt", best)
    assert load_checkpoint(best)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]
