"""Atomic file writes: a failed write never leaves a half-written file behind,
and mpotn never deletes a file it cannot prove it wrote.

Temporary files are hidden and named after their target (``.{name}.XXXXXXXX{suffix}``,
``XXXXXXXX`` as ``tempfile.mkstemp`` makes them); a write that was killed
leaves one behind, and the next successful write of the same target removes
it. A directory written by [atomic_dir][mpotn.atomic.atomic_dir] lists its
files in a manifest ([MANIFEST_NAME][mpotn.atomic.MANIFEST_NAME]): those are
the files a later write may replace or remove; any other file in it is the
user's.

Examples
--------
>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "report.json"
>>> write_text(path, "{}")
PosixPath('...report.json')
>>> path.read_text()
'{}'
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; every leftover counts as a killed write's
    fcntl = None  # type: ignore[assignment]

#: The file in which [atomic_dir][mpotn.atomic.atomic_dir] lists what it wrote.
MANIFEST_NAME = "mpotn_files.json"
#: Random part of a temporary name, as [tempfile][] makes it.
_RANDOM = r"[a-z0-9_]{8}"


def _temp_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(re.escape(f".{path.name}.") + _RANDOM + re.escape(path.suffix))


def _dir_temp_pattern(path: Path) -> re.Pattern[str]:
    """Folders [atomic_dir][mpotn.atomic.atomic_dir] makes beside ``path``, also those of a
    save nested in one (``..model.new.XXXXXXXX.new.YYYYYYYY``)."""
    step = r"\.(new|old)\." + _RANDOM
    return re.compile(r"\.+" + re.escape(path.name) + f"{step}({step})*")


#: The folder [atomic_dir][mpotn.atomic.atomic_dir] stages a save in inside the save's own
#: folder, when that folder cannot be renamed.
_STAGING = re.compile(r"\.mpotn\.new\." + _RANDOM)


def _is_temp_of(entry: str, directory: Path, names: set[str]) -> bool:
    """Whether ``entry`` is a temporary file or folder of a write of one of ``names``, or
    of a save staged inside ``directory``."""
    return entry.startswith(".") and (_STAGING.fullmatch(entry) is not None or any(
        _temp_pattern(directory / name).fullmatch(entry)
        or _dir_temp_pattern(directory / name).fullmatch(entry) for name in names))


def _is_plain_name(name: object) -> bool:
    """A name of an entry directly inside a folder: no separator, not ``.`` or ``..``."""
    return (isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name
            and "/" not in name and "\\" not in name and "\0" not in name)


@contextmanager
def _held(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (a file or a folder) while the body runs:
    [remove_stale_temps][mpotn.atomic.remove_stale_temps] then leaves it alone. The lock
    dies with its process, so a killed write's leftovers are free to remove."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and the lock with it


def _in_use(path: Path) -> bool:
    """Whether a live write holds ``path`` ([_held][mpotn.atomic._held])."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


@contextmanager
def temp_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new hidden temporary file beside ``path``, removed on exit unless moved away.

    Its name is ``.{name}.XXXXXXXX{suffix}`` for ``path``'s name and suffix, so
    that [remove_stale_temps][mpotn.atomic.remove_stale_temps] can tell it
    from the user's files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        with _held(tmp):  # another write of path does not take it for a killed one's
            yield Path(tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _chmod_new(path: str | os.PathLike, mode: int) -> None:
    """Give ``path`` the permissions a new file or folder of ``mode`` gets (the umask's)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _write_manifest(directory: Path, names: Iterable[str]) -> None:
    """Write the manifest of ``directory`` listing ``names`` (atomically)."""
    write_text(directory / MANIFEST_NAME, json.dumps({"files": sorted(names)}, indent=2))


def _flush_to_disk(path: str | os.PathLike) -> None:
    """``fsync`` the file or folder ``path``, so that its contents (a folder: its entries)
    survive a power loss once the call returns; a no-op where a folder cannot be opened
    (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def _flush_tree(folder: Path) -> None:
    """[_flush_to_disk][mpotn.atomic._flush_to_disk] every file and folder in ``folder``."""
    for root, _, files in os.walk(folder):
        for name in files:
            _flush_to_disk(Path(root) / name)
        _flush_to_disk(root)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Give ``tmp`` the permissions of a new file, write it to disk and rename it over
    ``path`` (atomic on POSIX: readers see the old file or the new one, never a partial
    one; after a power loss too, its folder being written to disk after the rename)."""
    _chmod_new(tmp, 0o666)  # mkstemp makes 0600 files
    _flush_to_disk(tmp)
    os.replace(tmp, path)
    _flush_to_disk(Path(path).parent)
    return Path(path)


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and directories that killed atomic writes of ``path``
    left beside it (named as [temp_path][mpotn.atomic.temp_path] and
    [atomic_dir][mpotn.atomic.atomic_dir] name them); return what was removed. Those a
    write still in progress holds (another process writing ``path`` meanwhile) stay."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    files, dirs = _temp_pattern(path), _dir_temp_pattern(path)
    removed = []
    for entry in path.parent.iterdir():
        if entry.is_symlink() or _in_use(entry):
            continue
        if entry.is_file() and files.fullmatch(entry.name):
            entry.unlink(missing_ok=True)
        elif entry.is_dir() and dirs.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            continue
        removed.append(entry)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    The rename is atomic on POSIX, so readers see the old file or the new
    one, never a partial one; on an exception the temporary file is removed
    and ``path`` is untouched. After a success, temporary files that killed
    writes of ``path`` left behind are removed too.
    """
    with temp_path(path) as tmp:
        yield tmp
        publish(tmp, path)
    remove_stale_temps(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # whatever the locale's encoding
    return Path(path)


def written_files(directory: str | os.PathLike) -> set[str]:
    """Names the manifest of ``directory`` lists (empty without a readable manifest)."""
    try:
        names = json.loads((Path(directory) / MANIFEST_NAME).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    if not isinstance(names, list):
        return set()
    return {name for name in names if _is_plain_name(name)}


def record_written(directory: str | os.PathLike, names: Iterable[str]) -> set[str]:
    """Add ``names`` to the manifest of ``directory`` (written atomically) and return all
    the names it lists now."""
    directory = Path(directory)
    names = set(names)
    if not all(_is_plain_name(name) for name in names):
        raise ValueError(f"not plain file names: {sorted(names)}")
    own = written_files(directory) | names
    _write_manifest(directory, own)
    return own


def write_output(path: str | os.PathLike, write: str | Callable[[Path], Any]) -> Any:
    """Write the run output ``path`` -- ``write`` is its text, or a function that writes it
    (a picture) -- recorded in its folder's manifest before it is written (and dropped
    from it if nothing was written); unless
    a file of that name mpotn did not write is there: it is kept, with a warning, and
    nothing is written (returns None).

    Returns what was written: the path for text, what ``write`` returned otherwise.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> write_output(out / "metrics.json", "{}").name
    'metrics.json'
    >>> sorted(written_files(out))
    ['metrics.json']
    """
    path = Path(path)
    own = written_files(path.parent)
    if path.name not in own and (path.exists() or path.is_symlink()):
        warnings.warn(f"{path.parent} already holds {path.name}, which mpotn did not write "
                      "(or an mpotn older than its manifests did): kept as it is, and this "
                      "run's not written; move it away, or write into another folder",
                      stacklevel=2)
        return None
    if path.name not in own:  # listed first: a run killed while writing still owns it
        record_written(path.parent, [path.name])
    try:
        written = write_text(path, write) if isinstance(write, str) else write(path)
    finally:
        if path.name not in own and not path.is_file():  # nothing written, or it failed
            _write_manifest(path.parent, written_files(path.parent) - {path.name})
    return written


def remove_written(directory: str | os.PathLike) -> list[str]:
    """Remove what mpotn wrote in ``directory`` (what its manifest lists, then the
    manifest), and the folder itself when nothing else is left; return the names left
    (files mpotn did not write, which it never deletes).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> with atomic_dir(out) as tmp:
    ...     _ = (tmp / "weights.bin").write_bytes(b"1")
    >>> _ = (out / "notes.txt").write_text("the user's")
    >>> remove_written(out)
    ['notes.txt']
    """
    directory = Path(directory)
    for name in written_files(directory):
        _remove(directory / name)
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    left = sorted(entry.name for entry in directory.iterdir())
    if not left:
        directory.rmdir()
    return left


def foreign_files(directory: str | os.PathLike, own: Iterable[str] = ()) -> list[str]:
    """Entries of ``directory`` mpotn cannot prove it wrote, sorted.

    Those are every entry except the manifest, the names it lists (and ``own``,
    names the caller proved mpotn wrote) and the hidden temporary files and
    folders of writes of those names; a missing directory has none.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    own = written_files(directory) | set(own) | {MANIFEST_NAME}
    return sorted(entry.name for entry in directory.iterdir()
                  if entry.name not in own and not _is_temp_of(entry.name, directory, own))


def check_writable(directory: str | os.PathLike, overwrite: bool = False,
                   own: Iterable[str] = ()) -> list[str]:
    """Refuse to write into ``directory`` when it is a file or a symbolic link, when it (or
    the nearest folder on the way to it that exists) may not be written, or when it
    holds files mpotn did not write ([foreign_files][mpotn.atomic.foreign_files], given
    ``own``) and ``overwrite`` is false.

    Returns those foreign files (empty unless ``overwrite``); mpotn never deletes them.

    Raises
    ------
    ValueError
        Naming the folder, up to five of its files, and ``overwrite``.
    """
    directory = Path(directory)
    if directory.is_symlink():
        raise ValueError(f"{directory} is a symbolic link; write into the folder it points to "
                         f"({directory.resolve()}) or into a new folder")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory; choose a folder")
    existing = Path(os.path.abspath(directory))
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write into {directory}: {existing} is not writable (no "
                         "permission); choose a folder you may write to")
    foreign = foreign_files(directory, own)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                          else "")
        raise ValueError(
            f"{directory} holds files mpotn did not write ({shown}); write into a new or "
            "empty folder, or pass overwrite=True (--overwrite) to write beside them "
            "(mpotn never deletes files it did not write)")
    return foreign


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, own: Iterable[str] = (),
               carry: Callable[[str], bool] | None = None, last: Iterable[str] = ()
               ) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; put what it holds in place on success.

    The manifest ([MANIFEST_NAME][mpotn.atomic.MANIFEST_NAME]) of the new
    directory lists every entry written into it. The entries of the earlier
    directory that mpotn wrote (its manifest or ``own``, names the caller
    proved mpotn wrote, list them) and the new one does not hold are removed,
    except those ``carry`` accepts (a save keeps the tokenizer and the reports
    beside it when it does not write new ones).

    When ``path`` holds only files mpotn wrote (or does not exist), the whole
    directory is swapped: the carried entries are linked into the new one, an
    existing ``path`` is renamed aside, the new directory renamed into place,
    then the old one removed; a failure while writing leaves ``path`` as it
    was, and at every moment ``path`` or its hidden ``.old`` twin holds a
    complete directory. When it holds other files,
    [check_writable][mpotn.atomic.check_writable] refuses unless
    ``overwrite``; with it those files stay where they are: each new entry is
    renamed into ``path`` (``last`` after the others), replacing one of the same
    name only when mpotn wrote it (a file of the user's is kept, with a
    warning), and the manifest lists what may be mpotn's throughout. The
    current directory (or one holding it) is written the same way, in place, and so is
    a folder that cannot be renamed (a mount point, or one whose parent mpotn may not
    write), staged inside itself in a hidden ``.mpotn.new.XXXXXXXX`` folder.
    The folder gets the permissions of a new folder (the umask's).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "model"
    >>> with atomic_dir(target) as tmp:
    ...     _ = (tmp / "weights.bin").write_bytes(b"1")
    >>> sorted(p.name for p in target.iterdir())
    ['mpotn_files.json', 'weights.bin']
    """
    path = Path(os.path.abspath(path))
    own = set(own)
    foreign = check_writable(path, overwrite, own)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a folder that cannot be renamed (a mount point, or in a folder we may not write) is
    # staged inside itself and merged
    inside = path.is_dir() and (path.is_mount() or not os.access(path.parent, os.W_OK | os.X_OK))
    if inside:
        for entry in path.iterdir():  # what killed saves staged here
            if (_STAGING.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink()
                    and not _in_use(entry)):
                shutil.rmtree(entry, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path, prefix=".mpotn.new.") if inside
               else tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new."))
    _chmod_new(tmp, 0o777)  # mkdtemp makes 0700 folders
    try:
        # held until it is renamed: another save of path does not take it for a killed one's
        with _held(tmp):
            yield tmp
            names = sorted(entry.name for entry in tmp.iterdir() if entry.name != MANIFEST_NAME)
            previous = written_files(path) | own if path.is_dir() else set()
            carried = sorted(name for name in previous - set(names)
                             if carry is not None and carry(name) and (path / name).exists())
            cwd = Path.cwd()
            foreign = foreign or foreign_files(path, own)  # also a file put there meanwhile
            if inside or foreign or path == cwd or path in cwd.parents:
                _merge(tmp, path, names, previous, carried, list(last))
            else:
                for name in carried:
                    _link(path / name, tmp / name)
                _write_manifest(tmp, [*names, *carried])
                _flush_tree(tmp)
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
                if path.exists():
                    os.replace(path, old)  # over the empty folder just made
                os.replace(tmp, path)
                _flush_to_disk(path.parent)
                shutil.rmtree(old, ignore_errors=True)
        remove_stale_temps(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link(source: Path, target: Path) -> None:
    """``target`` as a copy of ``source`` that costs no space: a hard link for a file, a
    copy of the folder (its files linked) for a folder."""
    if source.is_dir():
        shutil.copytree(source, target, copy_function=os.link)
    else:
        os.link(source, target)


def _remove(entry: Path) -> None:
    """Remove a file, a symbolic link (not what it points to) or a folder."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


def _merge(new: Path, path: Path, names: list[str], previous: set[str], carried: list[str],
           last: list[str]) -> None:
    """Move ``names`` from ``new`` into ``path`` (``last`` after the others) except over
    files mpotn did not write (not in ``previous``), then drop what only ``previous`` lists
    and ``carried`` does not keep; the manifest names every file that may be mpotn's at
    each moment. Nothing else in ``path`` is touched."""
    kept = [name for name in names if name not in previous
            and ((path / name).exists() or (path / name).is_symlink())]
    moved = sorted((name for name in names if name not in kept), key=lambda n: n in last)
    _flush_tree(new)
    _write_manifest(path, previous | set(moved))
    for name in moved:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # a file is replaced by the rename itself, atomically
        os.replace(new / name, target)
    _flush_to_disk(path)
    for name in previous - set(names) - set(carried):
        _remove(path / name)
    _write_manifest(path, {*moved, *carried})
    if kept:
        warnings.warn(f"{path} already holds {', '.join(kept)}, which mpotn did not write: "
                      "kept as they are, and the new ones not written", stacklevel=4)
