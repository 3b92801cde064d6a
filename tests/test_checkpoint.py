import os

import pytest
import torch

from mt.checkpoint import CheckpointWriter, copy_checkpoint, load_checkpoint, save_checkpoint
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


def test_writer_saves_a_snapshot_in_the_background(tmp_path):
    """What is saved is the state at save(): training goes on changing the tensors meanwhile."""
    w = torch.arange(4.0)
    st = {**state(), "model": {"w": w}, "metrics": {"bleu": 1.0}, "rng": [torch.tensor([1, 2])]}
    writer = CheckpointWriter()
    writer.save(st, tmp_path / "best.pt", also=tmp_path / "last.pt")
    w.add_(100.0)  # the next training step
    st["metrics"]["bleu"] = 2.0
    st["rng"][0].zero_()
    writer.wait()
    for name in ("best.pt", "last.pt"):
        loaded = load_checkpoint(tmp_path / name)
        torch.testing.assert_close(loaded["model"]["w"], torch.arange(4.0))
        assert loaded["metrics"]["bleu"] == 1.0 and loaded["rng"][0].tolist() == [1, 2]
    assert os.path.samefile(tmp_path / "best.pt", tmp_path / "last.pt")
    writer.save({**state(), "step": 9}, tmp_path / "last.pt")  # waits for nothing, then writes
    writer.wait()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 9 and load_checkpoint(tmp_path / "best.pt")["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_writer_hands_a_failed_write_to_the_next_call(tmp_path, monkeypatch, caplog):
    path = save_checkpoint(state(), tmp_path / "last.pt")
    before = path.read_bytes()
    writer = CheckpointWriter()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    writer.save({**state(), "step": 4}, path)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*last.pt: disk full"):
        writer.wait()
    writer.wait()  # raised once
    assert path.read_bytes() == before
    writer.save({**state(), "step": 5}, path)
    with caplog.at_level("WARNING", logger="mt.checkpoint"):
        writer.wait(raise_error=False)  # a run that is already failing keeps its own error ...
    assert "could not write checkpoint" in caplog.text  # ... and the write's is logged
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_writer_runs_before_write_on_the_snapshot_first(tmp_path):
    """before_write completes the snapshot on the thread (mt.train's validation report adds
    chrF there); the caller's state is not touched; its error is raised as it is, by the next
    call, and the checkpoint is written all the same."""
    import threading

    st = {**state(), "metrics": {"bleu": 1.0}}
    seen = []

    def report(snap):
        seen.append(threading.current_thread().name)
        snap["metrics"]["chrf"] = 42.0

    writer = CheckpointWriter()
    writer.save(st, tmp_path / "last.pt", before_write=report)
    writer.wait()
    assert seen == ["checkpoint-writer"] and st["metrics"] == {"bleu": 1.0}
    assert load_checkpoint(tmp_path / "last.pt")["metrics"] == {"bleu": 1.0, "chrf": 42.0}

    def broken(snap):
        snap["metrics"]["chrf"] = 7.0
        raise ValueError("no fonts")

    writer.save({**st, "step": 4}, tmp_path / "last.pt", before_write=broken)
    with pytest.raises(ValueError, match="no fonts"):
        writer.save({**st, "step": 5}, tmp_path / "best.pt")  # the next call raises it; nothing of its own is saved
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["step"] == 4 and ck["metrics"]["chrf"] == 7.0
    assert not (tmp_path / "best.pt").exists()


def test_writer_raises_the_failed_write_over_a_failed_before_write(tmp_path, caplog):
    """Both failed: the missing checkpoint is the error; the hook's is logged, not lost."""

    def broken(snap):
        raise ValueError("no fonts")

    writer = CheckpointWriter()
    (tmp_path / "file").write_text("x")
    writer.save(state(), tmp_path / "file" / "last.pt", before_write=broken)  # a file where a folder should be
    with caplog.at_level("WARNING", logger="mt.checkpoint"), pytest.raises(CheckpointError, match="could not write"):
        writer.wait()
    assert "no fonts" in caplog.text


def test_writer_reuses_its_buffers_and_keeps_tied_tensors_tied(tmp_path):
    w = torch.randn(3, 4)
    st = {**state(), "model": {"emb": w, "out": w.detach(), "bias": torch.zeros(4)}}
    writer = CheckpointWriter()
    writer.save(st, tmp_path / "last.pt")
    writer.wait()
    first = list(writer._buffers)
    assert len(first) == 2  # the tied pair is one buffer
    loaded = load_checkpoint(tmp_path / "last.pt")["model"]
    assert loaded["emb"].data_ptr() == loaded["out"].data_ptr()
    torch.testing.assert_close(loaded["out"], w)
    w.mul_(2.0)
    writer.save(st, tmp_path / "last.pt")
    writer.wait()
    assert all(a is b for a, b in zip(writer._buffers, first))  # the same memory, refilled
    torch.testing.assert_close(load_checkpoint(tmp_path / "last.pt")["model"]["emb"], w)


def test_writer_keeps_the_state_dict_versions(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    writer = CheckpointWriter()
    writer.save({**state(), "model": model.state_dict()}, tmp_path / "last.pt")
    writer.wait()
    loaded = load_checkpoint(tmp_path / "last.pt")["model"]
    assert loaded._metadata == model.state_dict()._metadata and loaded._metadata["1"]["version"] == 2
