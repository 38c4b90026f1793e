"""hift_ds.atomic: old or new content, never a torn file or folder, no temporary left behind."""
import os

import pytest
import torch

from hift_ds import atomic


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def _folder(files: dict):
    def write(d):
        os.makedirs(os.path.join(d, "sub"))
        for name, text in files.items():
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
    return write


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest"
    atomic.write_text(str(path), "step4")
    atomic.write_text(str(path), "step8 é")
    assert path.read_text(encoding="utf-8") == "step8 é" and _listing(tmp_path) == ["latest"]


def test_write_bytes_and_a_failing_writer_keep_the_old_content(tmp_path):
    path = tmp_path / "blob"
    atomic.write_bytes(str(path), b"\x00old")

    def torn(f):
        f.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic.write_file(str(path), torn)
    assert path.read_bytes() == b"\x00old" and _listing(tmp_path) == ["blob"]


def test_write_file_takes_a_writer_callback_such_as_torch_save(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    atomic.write_file(str(path), lambda f: torch.save(state, f))
    assert torch.equal(torch.load(path)["w"], state["w"]) and _listing(tmp_path) == ["pytorch_model.bin"]


def test_the_data_is_synced_before_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace, rename = os.fsync, os.replace, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), replace(a, b))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append("rename"), rename(a, b))[1])
    atomic.write_text(str(tmp_path / "metrics.json"), "{}")
    assert events == ["fsync", "rename"]
    events.clear()
    atomic.write_dir(str(tmp_path / "final"), _folder({"a": "1", "sub/b": "2"}))
    assert events == ["fsync", "fsync", "rename"]
    events.clear()
    atomic.write_text(str(tmp_path / "log"), "x", sync=False)
    assert events == ["rename"]


def test_write_dir_renames_a_complete_folder_into_place(tmp_path):
    out = tmp_path / "model"
    atomic.write_dir(str(out), _folder({"config.json": "{}", "sub/w": "1"}))
    assert (out / "config.json").read_text() == "{}" and (out / "sub" / "w").read_text() == "1"
    assert _listing(tmp_path) == ["model"]


def test_write_dir_does_not_replace_an_existing_folder_unless_asked(tmp_path):
    out = tmp_path / "model"
    atomic.write_dir(str(out), _folder({"config.json": "old"}))
    with pytest.raises(OSError):  # another writer got there first: its folder stays
        atomic.write_dir(str(out), _folder({"config.json": "new"}))
    assert (out / "config.json").read_text() == "old" and _listing(tmp_path) == ["model"]
    atomic.write_dir(str(out), _folder({"config.json": "new"}), replace=True)
    assert (out / "config.json").read_text() == "new" and _listing(tmp_path) == ["model"]


def test_write_dir_that_fails_leaves_the_old_folder_and_no_temporary(tmp_path):
    out = tmp_path / "model"
    atomic.write_dir(str(out), _folder({"config.json": "old"}))

    def fail(d):
        _folder({"config.json": "half"})(d)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.write_dir(str(out), fail, replace=True)
    assert (out / "config.json").read_text() == "old" and _listing(tmp_path) == ["model"]



@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "aside"])
def test_replace_swaps_the_folders_without_a_moment_with_none(tmp_path, monkeypatch, swap):
    """Every rename leaves a folder at the target: swapped in one step, or the old one renamed aside first."""
    out = tmp_path / "model"
    atomic.write_dir(str(out), _folder({"config.json": "old"}))
    if not swap:
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # a kernel or filesystem that cannot swap
    seen, rename = [], os.rename

    def watching(a, b):
        rename(a, b)
        seen.append(out.exists() or (tmp_path / f"model{atomic.ASIDE}").exists())
    monkeypatch.setattr(os, "rename", watching)
    atomic.write_dir(str(out), _folder({"config.json": "new"}), replace=True)
    assert (out / "config.json").read_text() == "new" and _listing(tmp_path) == ["model"]
    assert all(seen) and len(seen) == (0 if swap else 2)


def test_recover_dir_finishes_what_a_kill_interrupted(tmp_path):
    out, aside = tmp_path / "model", tmp_path / f"model{atomic.ASIDE}"
    _folder({"config.json": "old"})(str(aside))  # killed between renaming the old folder aside and the new one in
    _folder({"config.json": "new"})(str(tmp_path / "model.tmp999999999"))  # that writer's half-moved folder
    atomic.recover_dir(str(out))
    assert (out / "config.json").read_text() == "old" and _listing(tmp_path) == ["model"]
    _folder({"config.json": "older"})(str(aside))  # killed after the new folder moved in: the old one goes
    atomic.recover_dir(str(out))
    assert (out / "config.json").read_text() == "old" and _listing(tmp_path) == ["model"]
    mine = tmp_path / f"model.tmp{os.getpid()}"
    mine.mkdir()  # a live writer's temporary folder is left alone
    atomic.recover_dir(str(out))
    assert mine.exists()


def test_exchange_swaps_two_names_where_the_system_can(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.write_text("file")
    if not atomic.exchange(str(a), str(b)):
        pytest.skip("this kernel or filesystem cannot swap names (renameat2 RENAME_EXCHANGE)")
    assert a.read_text() == "file" and b.is_dir()
    with pytest.raises(FileNotFoundError):
        atomic.exchange(str(a), str(tmp_path / "missing"))
