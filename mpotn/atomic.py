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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

#: The file in which [atomic_dir][mpotn.atomic.atomic_dir] lists what it wrote.
MANIFEST_NAME = "mpotn_files.json"
#: Random part of a temporary name, as [tempfile][] makes it.
_RANDOM = r"[a-z0-9_]{8}"


def _temp_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(re.escape(f".{path.name}.") + _RANDOM + re.escape(path.suffix))


def _dir_temp_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(re.escape(f".{path.name}.") + "(new|old)." + _RANDOM)


def _is_temp_of(entry: str, directory: Path, names: set[str]) -> bool:
    """Whether ``entry`` is a temporary file or folder of a write of one of ``names``."""
    return entry.startswith(".") and any(
        _temp_pattern(directory / name).fullmatch(entry)
        or _dir_temp_pattern(directory / name).fullmatch(entry) for name in names)


def _is_plain_name(name: object) -> bool:
    """A name of an entry directly inside a folder: no separator, not ``.`` or ``..``."""
    return (isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name
            and "/" not in name and "\\" not in name and "\0" not in name)


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
        yield Path(tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Give ``tmp`` the permissions of a new file and rename it over ``path`` (atomic on
    POSIX: readers see the old file or the new one, never a partial one)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; honour the umask
    os.replace(tmp, path)
    return Path(path)


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and directories that killed atomic writes of ``path``
    left beside it (named as [temp_path][mpotn.atomic.temp_path] and
    [atomic_dir][mpotn.atomic.atomic_dir] name them); return what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    files, dirs = _temp_pattern(path), _dir_temp_pattern(path)
    removed = []
    for entry in path.parent.iterdir():
        if entry.is_file() and not entry.is_symlink() and files.fullmatch(entry.name):
            entry.unlink(missing_ok=True)
        elif entry.is_dir() and not entry.is_symlink() and dirs.fullmatch(entry.name):
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
        tmp.write_text(text)
    return Path(path)


def written_files(directory: str | os.PathLike) -> set[str]:
    """Names the manifest of ``directory`` lists (empty without a readable manifest)."""
    try:
        names = json.loads((Path(directory) / MANIFEST_NAME).read_text())["files"]
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
    write_text(directory / MANIFEST_NAME, json.dumps({"files": sorted(own)}, indent=2))
    return own


def claim(directory: str | os.PathLike, names: Iterable[str]) -> set[str]:
    """The ``names`` mpotn may write in ``directory`` -- new ones and ones its manifest
    lists -- recorded in the manifest before they are written; the others, files of the
    same name mpotn did not write, are kept as they are, with a warning.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (out / "notes.md").write_text("mine")
    >>> sorted(claim(out, ["report.md"]))
    ['report.md']
    """
    directory = Path(directory)
    own = written_files(directory)
    names = set(names)
    kept = sorted(name for name in names - own
                  if (directory / name).exists() or (directory / name).is_symlink())
    mine = names - set(kept)
    if mine - own:
        directory.mkdir(parents=True, exist_ok=True)
        record_written(directory, mine)
    if kept:
        warnings.warn(f"{directory} already holds {', '.join(kept)}, which mpotn did not "
                      "write: kept as they are, and mpotn's own not written", stacklevel=4)
    return mine


def owned(path: str | os.PathLike) -> bool:
    """Whether mpotn may write the run output ``path``: claim its name in the manifest of its
    folder ([claim][mpotn.atomic.claim]); false, with a warning, for a file of the user's."""
    path = Path(path)
    return path.name in claim(path.parent, [path.name])


def write_output(path: str | os.PathLike, text: str) -> Path | None:
    """Write the run output ``path`` atomically and record it in its folder's manifest, unless
    a file of that name mpotn did not write is there (kept, with a warning; returns None).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> write_output(out / "metrics.json", "{}").name
    'metrics.json'
    >>> sorted(written_files(out))
    ['metrics.json']
    """
    return write_text(path, text) if owned(path) else None


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
    """Refuse to write into ``directory`` when it is a file or a symbolic link, or when it
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
def atomic_dir(path: str | os.PathLike, overwrite: bool = False,
               own: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; put what it holds in place on success.

    The manifest ([MANIFEST_NAME][mpotn.atomic.MANIFEST_NAME]) of the new
    directory lists every entry written into it. When ``path`` holds only
    files mpotn wrote (or does not exist), the whole directory is swapped: an
    existing ``path`` is renamed aside, the new directory renamed into place,
    then the old one removed; a failure while writing leaves ``path`` as it
    was, and at every moment ``path`` or its hidden ``.old`` twin holds a
    complete directory. When it holds other files,
    [check_writable][mpotn.atomic.check_writable] refuses unless
    ``overwrite``; with it those files stay where they are: each new entry is
    renamed into ``path``, replacing one of the same name only when mpotn
    wrote it (the old manifest or ``own``, names the caller proved mpotn
    wrote, list it; a file of the user's is kept, with a warning), the
    entries mpotn wrote that the new directory does not hold are removed, and
    the manifest comes last.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "model"
    >>> with atomic_dir(target) as tmp:
    ...     _ = (tmp / "weights.bin").write_bytes(b"1")
    >>> sorted(p.name for p in target.iterdir())
    ['mpotn_files.json', 'weights.bin']
    """
    path = Path(path)
    own = set(own)
    foreign = check_writable(path, overwrite, own)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new."))
    try:
        yield tmp
        names = sorted(entry.name for entry in tmp.iterdir() if entry.name != MANIFEST_NAME)
        if foreign:
            _merge(tmp, path, names, written_files(path) | own)
        else:
            (tmp / MANIFEST_NAME).write_text(json.dumps({"files": names}, indent=2))
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            if path.exists():
                os.replace(path, old)  # over the empty folder just made
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        remove_stale_temps(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(entry: Path) -> None:
    """Remove a file, a symbolic link (not what it points to) or a folder."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


def _merge(new: Path, path: Path, names: list[str], previous: set[str]) -> None:
    """Move ``names`` from ``new`` into ``path`` except over files mpotn did not write (not in
    ``previous``), drop what only ``previous`` lists, then write the manifest; nothing
    else in ``path`` is touched."""
    kept = [name for name in names if name not in previous
            and ((path / name).exists() or (path / name).is_symlink())]
    moved = [name for name in names if name not in kept]
    for name in moved:
        if name in previous:
            _remove(path / name)
        os.replace(new / name, path / name)
    for name in previous - set(names):
        _remove(path / name)
    write_text(path / MANIFEST_NAME, json.dumps({"files": moved}, indent=2))
    if kept:
        warnings.warn(f"{path} already holds {', '.join(kept)}, which mpotn did not write: "
                      "kept as they are, and the new ones not written", stacklevel=4)
