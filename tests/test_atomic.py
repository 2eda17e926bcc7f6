"""Writes that lose nothing: mpotn deletes and replaces only files its manifests list."""

import json

import pytest

from mpotn.atomic import (
    MANIFEST_NAME,
    atomic_dir,
    check_writable,
    foreign_files,
    write_output,
    written_files,
)
from mpotn.cli import main
from mpotn.compression.serialization import CONFIG_NAME


def names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("entry", ["..", ".", "", "a/b", "../sibling", "/etc"])
def test_a_manifest_entry_that_is_not_a_plain_name_is_ignored(tmp_path, entry):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "code.py").write_text("mine")
    (project / "sibling").write_text("mine")
    model = project / "model"
    model.mkdir()
    (model / MANIFEST_NAME).write_text(json.dumps({"files": [entry, "old.bin"]}))
    (model / "old.bin").write_text("written by mpotn")
    (model / "README.md").write_text("the user's")
    assert written_files(model) == {"old.bin"}
    with atomic_dir(model, overwrite=True) as tmp:
        (tmp / "new.bin").write_text("new")
    assert names(project) == ["model", "sibling", "src"]
    assert (project / "src" / "code.py").read_text() == "mine"
    assert names(model) == ["README.md", MANIFEST_NAME, "new.bin"]


def test_a_merge_keeps_a_users_file_of_the_same_name_and_warns(tmp_path):
    (tmp_path / "config.json").write_text("the user's")
    kept = r"already holds config\.json, which mpotn did not write: kept as they are"
    with pytest.warns(UserWarning, match=kept), atomic_dir(tmp_path, overwrite=True) as tmp:
        (tmp / "config.json").write_text("mpotn's")
        (tmp / "weights.bin").write_text("mpotn's")
    assert (tmp_path / "config.json").read_text() == "the user's"
    assert written_files(tmp_path) == {"weights.bin"}
    with atomic_dir(tmp_path, overwrite=True) as tmp:  # drops only what mpotn wrote
        (tmp / "other.bin").write_text("mpotn's")
    assert names(tmp_path) == ["config.json", MANIFEST_NAME, "other.bin"]


def test_a_symbolic_link_as_the_target_is_refused_and_left_alone(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "data.bin").write_text("kept")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ValueError, match=r"link is a symbolic link; write into the folder it "
                                         r"points to"), atomic_dir(link) as tmp:
        (tmp / "x").write_text("x")
    assert link.is_symlink() and names(real) == ["data.bin"]
    assert names(tmp_path) == ["link", "real"]


def test_a_users_hidden_folders_beside_the_target_survive_a_swap(tmp_path):
    for hidden in (".model.old", ".model.new", ".model.keep"):
        (tmp_path / hidden).mkdir()
    for _ in range(2):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights.bin").write_text("x")
    assert names(tmp_path) == [".model.keep", ".model.new", ".model.old", "model"]


@pytest.mark.parametrize("hidden", [".env.template", ".notes.20240101", ".settings.old"])
def test_a_users_hidden_file_is_foreign(tmp_path, hidden):
    (tmp_path / hidden).write_text("mine")
    (tmp_path / ".report.md.k1ll3d_a.md").write_text("left by a killed write of report.md")
    assert foreign_files(tmp_path) == sorted([hidden, ".report.md.k1ll3d_a.md"])
    write_output(tmp_path / "report.md", "# report")
    assert foreign_files(tmp_path) == [hidden]
    with pytest.raises(ValueError, match=f"did not write \\({hidden}\\)"):
        check_writable(tmp_path)


def test_run_outputs_keep_a_users_file_and_replace_their_own(tmp_path):
    (tmp_path / "metrics.json").write_text("the user's")
    with pytest.warns(UserWarning, match=r"already holds metrics\.json, which mpotn did not"):
        assert write_output(tmp_path / "metrics.json", "{}") is None
    assert (tmp_path / "metrics.json").read_text() == "the user's"
    assert write_output(tmp_path / "history.csv", "a") == tmp_path / "history.csv"
    assert write_output(tmp_path / "history.csv", "b") == tmp_path / "history.csv"
    assert (tmp_path / "history.csv").read_text() == "b"
    assert written_files(tmp_path) == {"history.csv"}


def test_a_compress_run_folder_lists_every_file_and_can_be_written_again(tiny_bert, tmp_path):
    out = tmp_path / "run"
    args = ["compress", str(tiny_bert), "--targets", "ffn", "--no-calibrate", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    own = written_files(out)
    weights = json.loads((out / CONFIG_NAME).read_text())["weights"]
    assert {CONFIG_NAME, weights, "config.json", "report.md", "report.json",
            "errors.png"} <= own
    assert foreign_files(out) == []
    assert main(args) == 0  # a second run replaces the first without --overwrite
    assert foreign_files(out) == []
    assert len(list(out.glob("model-*.safetensors"))) == 1


def test_a_file_as_the_target_folder_is_refused(tmp_path):
    (tmp_path / "model").write_text("a file")
    with pytest.raises(ValueError, match=r"model exists and is not a directory; choose a folder"):
        check_writable(tmp_path / "model")


def small_compressed(seed: int = 0):
    import torch
    from torch import nn

    from mpotn.compression import compress

    torch.manual_seed(seed)
    return compress(nn.Sequential(nn.Linear(8, 12)), targets=["0"], n=2, progress=False)


def test_a_resave_keeps_the_tokenizer_and_reports_beside_it_and_drops_its_old_weights(
        tmp_path):
    from mpotn.compression.models import load_tokenizer

    folder = tmp_path / "save"
    small_compressed(0).save_pretrained(folder, tokenizer=load_tokenizer())
    write_output(folder / "report.md", "# the report")
    small_compressed(1).save_pretrained(folder)  # no tokenizer this time
    assert (folder / "tokenizer_config.json").is_file()
    assert (folder / "report.md").read_text() == "# the report"
    assert len(list(folder.glob("model-*.safetensors"))) == 1
    assert foreign_files(folder) == []
    assert load_tokenizer(folder)("a film")["input_ids"] == [101, 1037, 2143, 102]


def test_a_save_has_the_permissions_of_a_new_folder(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        small_compressed().save_pretrained(tmp_path / "save")
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "save").iterdir()}
    assert stat.S_IMODE((tmp_path / "save").stat().st_mode) == 0o755
    assert set(modes.values()) == {0o644}


def test_a_save_written_before_manifests_listed_everything_is_written_over(tmp_path):
    from mpotn.atomic import MANIFEST_NAME

    folder = tmp_path / "save"
    small_compressed(0).save_pretrained(folder)
    (folder / MANIFEST_NAME).write_text(json.dumps({"files": ["config.json"]}))  # as before
    (folder / "report.md").write_text("# an older run's report")
    small_compressed(1).save_pretrained(folder)  # no overwrite needed: all of it was mpotn's
    assert foreign_files(folder) == [] and "report.md" in written_files(folder)
    assert write_output(folder / "report.md", "# new") == folder / "report.md"


def test_an_output_whose_writer_wrote_nothing_is_not_recorded(tmp_path):
    assert write_output(tmp_path / "heatmap.png", lambda path: None) is None
    assert written_files(tmp_path) == set()
    (tmp_path / "heatmap.png").write_text("the user's, later")
    with atomic_dir(tmp_path, overwrite=True) as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "heatmap.png").read_text() == "the user's, later"


def test_a_run_output_is_listed_while_it_is_written(tmp_path):
    """A run killed while writing ``report.md`` leaves it listed as mpotn's, so the next run
    replaces it instead of keeping it as the user's; a writer that fails unlists it."""
    listed = []

    def write(path):
        listed.append("report.md" in written_files(tmp_path))
        path.write_text("new")

    write_output(tmp_path / "report.md", write)
    assert listed == [True] and written_files(tmp_path) == {"report.md"}

    def fail(path):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_output(tmp_path / "errors.png", fail)
    assert written_files(tmp_path) == {"report.md"}


def test_saving_into_the_current_folder_writes_in_place(tmp_path, monkeypatch):
    folder = tmp_path / "here"
    folder.mkdir()
    monkeypatch.chdir(folder)
    for seed in (0, 1):
        small_compressed(seed).save_pretrained(".")
    assert folder.exists() and names(tmp_path) == ["here"]
    assert len(list(folder.glob("model-*.safetensors"))) == 1 and foreign_files(folder) == []


def test_a_killed_nested_save_leaves_nothing_after_the_next_one(tmp_path):
    (tmp_path / "..model.new.k1ll3d_a.new.k1ll3d_b").mkdir()
    (tmp_path / ".model.new.k1ll3d_a").mkdir()
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "x").write_text("x")
    assert names(tmp_path) == ["model"]


def test_a_merge_killed_midway_lists_every_file_that_may_be_mpotns(tmp_path, monkeypatch):
    import os

    (tmp_path / "notes.txt").write_text("the user's")
    with atomic_dir(tmp_path, overwrite=True) as tmp:
        (tmp / "a.json").write_text("1")
    moves = []

    def killed(source, target):
        if moves:
            raise OSError("killed")
        moves.append(target)
        os.rename(source, target)

    monkeypatch.setattr("mpotn.atomic.os.replace", killed)
    with pytest.raises(OSError, match="killed"), atomic_dir(tmp_path, overwrite=True) as tmp:
        (tmp / "b.json").write_text("2")
        (tmp / "c.json").write_text("3")
    assert written_files(tmp_path) >= {"a.json", "b.json", "c.json"}
    assert (tmp_path / "notes.txt").read_text() == "the user's"


def _unwritable(monkeypatch, folder):
    """``folder`` as a folder this process may not write, also for root, whom permissions
    do not stop: ``os.access`` says so and nothing can be made in it."""
    import os
    import tempfile

    access, mkdtemp, mkstemp = os.access, tempfile.mkdtemp, tempfile.mkstemp

    def refused(make):
        def made(*args, dir=None, **kwargs):
            if os.path.abspath(dir) == str(folder):
                raise PermissionError(13, "Permission denied", str(folder))
            return make(*args, dir=dir, **kwargs)
        return made

    monkeypatch.setattr("mpotn.atomic.os.access", lambda path, mode: os.path.abspath(path)
                        != str(folder) and access(path, mode))
    monkeypatch.setattr("mpotn.atomic.tempfile.mkdtemp", refused(mkdtemp))
    monkeypatch.setattr("mpotn.atomic.tempfile.mkstemp", refused(mkstemp))


@pytest.mark.parametrize("why", ["parent not writable", "mount point"])
def test_a_folder_that_cannot_be_renamed_is_written_in_place(tmp_path, monkeypatch, why):
    """A bind mount (``docker -v ...:/out``) or a folder in a read-only parent: the save is
    staged inside the folder and merged, the earlier one replaced."""
    from pathlib import Path

    from mpotn import load

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ".mpotn.new.k1ll3d_a").mkdir()  # left by a killed save staged here
    assert foreign_files(folder) == []
    if why == "mount point":  # renaming it fails with EBUSY
        import os

        replace = os.replace

        def busy(source, target):
            if Path(source) == folder:
                raise OSError(16, "Device or resource busy", str(folder))
            replace(source, target)

        monkeypatch.setattr(Path, "is_mount", lambda self: self == folder)
        monkeypatch.setattr("mpotn.atomic.os.replace", busy)
    else:
        _unwritable(monkeypatch, tmp_path)
    for seed in (0, 1):
        model = small_compressed(seed)
        model.save_pretrained(folder)
    assert names(tmp_path) == ["out"]  # nothing staged beside it
    assert len(list(folder.glob("model-*.safetensors"))) == 1
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
    assert foreign_files(folder) == []
    from torch import nn

    assert load(folder, model=nn.Sequential(nn.Linear(8, 12))).report() == model.report()


def test_a_new_folder_in_a_folder_that_may_not_be_written_is_refused_before_work(
        tmp_path, monkeypatch):
    _unwritable(monkeypatch, tmp_path)
    with pytest.raises(ValueError, match=f"cannot write into {tmp_path / 'new' / 'model'}: "
                                         f"{tmp_path} is not writable"):
        check_writable(tmp_path / "new" / "model")


def test_a_file_the_user_puts_in_the_folder_while_it_is_saved_survives(tmp_path):
    folder = tmp_path / "model"
    with atomic_dir(folder) as tmp:
        (tmp / "a.json").write_text("1")
    with atomic_dir(folder) as tmp:
        (tmp / "a.json").write_text("2")
        (folder / "notes.txt").write_text("the user's, meanwhile")
    assert (folder / "notes.txt").read_text() == "the user's, meanwhile"
    assert (folder / "a.json").read_text() == "2" and foreign_files(folder) == ["notes.txt"]


def test_text_is_written_as_utf8_whatever_the_locale(tmp_path):
    import os
    import subprocess
    import sys

    script = ("import sys, locale; from mpotn.atomic import write_text; "
              "print(locale.getpreferredencoding()); "
              "write_text(sys.argv[1], '\\u03c1 \\u2192 0.75 \\u00d7 #To')")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "report.md")],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ANSI" in result.stdout or "ascii" in result.stdout.lower()  # an ASCII locale
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == "ρ → 0.75 × #To"


def test_a_write_in_progress_keeps_its_temporary_file_when_another_write_finishes(tmp_path):
    from mpotn.atomic import atomic_path, write_text

    target = tmp_path / "report.json"
    with atomic_path(target) as slow:  # a second writer of the same file, still writing
        slow.write_text("slow")
        write_text(target, "fast")  # finishes first and sweeps what killed writes left
        assert slow.exists()
    assert target.read_text() == "slow"
    (tmp_path / ".report.json.k1ll3d_a.json").write_text("left by a killed write")
    write_text(target, "again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_save_in_progress_keeps_its_staging_folder_when_another_save_finishes(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as slow:
        (slow / "weights").write_text("slow")
        with atomic_dir(target, overwrite=True) as fast:
            (fast / "weights").write_text("fast")
        assert (slow / "weights").read_text() == "slow"
    assert (target / "weights").read_text() == "slow"
    assert names(tmp_path) == ["model"]


def test_a_write_and_a_save_reach_the_disk_before_their_renames(tmp_path, monkeypatch):
    import os

    from mpotn.atomic import write_text

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or replace(a, b))
    write_text(tmp_path / "report.md", "# report")
    assert events[:3] == ["fsync", "rename", "fsync"]  # the file, then its folder's entry
    events.clear()
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("w")
    renamed = [k for k, e in enumerate(events) if e == "rename"]
    assert events[renamed[-1] - 1] == "fsync"  # the staged folder was flushed first
    assert events.count("fsync") >= 3  # its file, the manifest and the folder
