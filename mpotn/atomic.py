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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: The file in which [atomic_dir][mpotn.atomic.atomic_dir] lists what it wrote.
MANIFEST_NAME = "mpotn_files.json"
#: Random part of a temporary name, as [tempfile][] makes it.
_RANDOM = r"[a-z0-9_]{8}"
#: Any hidden name of the kinds [temp_path][mpotn.atomic.temp_path] and
#: [atomic_dir][mpotn.atomic.atomic_dir] make (not counted as the user's files).
_ANY_TEMP = re.compile(r"\..+\.(new\.)?" + _RANDOM + r"(\.[^.]*)?|\..+\.old")


def _temp_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(re.escape(f".{path.name}.") + _RANDOM + re.escape(path.suffix))


def _dir_temp_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(re.escape(f".{path.name}.new.") + _RANDOM + "|" + re.escape(
        f".{path.name}.old"))


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
    return {name for name in names if isinstance(name, str) and Path(name).name == name}


def foreign_files(directory: str | os.PathLike) -> list[str]:
    """Entries of ``directory`` mpotn cannot prove it wrote, sorted.

    Those are every entry except the manifest, the files it lists and
    hidden names of mpotn's temporary kind; a missing directory has none.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    own = written_files(directory) | {MANIFEST_NAME}
    return sorted(entry.name for entry in directory.iterdir()
                  if entry.name not in own and not _ANY_TEMP.fullmatch(entry.name))


def check_writable(directory: str | os.PathLike, overwrite: bool = False) -> list[str]:
    """Refuse to write into ``directory`` when it is a file, or when it holds files mpotn
    did not write ([foreign_files][mpotn.atomic.foreign_files]) and ``overwrite`` is false.

    Returns those foreign files (empty unless ``overwrite``); mpotn never deletes them.

    Raises
    ------
    ValueError
        Naming the folder, up to five of its files, and ``overwrite``.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory; choose a folder")
    foreign = foreign_files(directory)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                          else "")
        raise ValueError(
            f"{directory} holds files mpotn did not write ({shown}); write into a new or "
            "empty folder, or pass overwrite=True (--overwrite) to write beside them "
            "(mpotn never deletes files it did not write)")
    return foreign


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; put what it holds in place on success.

    The manifest ([MANIFEST_NAME][mpotn.atomic.MANIFEST_NAME]) of the new
    directory lists every entry written into it. When ``path`` holds only
    files mpotn wrote (or does not exist), the whole directory is swapped: an
    existing ``path`` is renamed aside, the new directory renamed into place,
    then the old one removed; a failure while writing leaves ``path`` as it
    was, and at every moment ``path`` or its ``.old`` twin holds a complete
    directory. When it holds other files,
    [check_writable][mpotn.atomic.check_writable] refuses unless
    ``overwrite``; with it those files stay where they are: each new entry is
    renamed into ``path`` (replacing one of the same name), the entries the old
    manifest lists and the new one does not are removed, and the manifest
    comes last.

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
    foreign = check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new."))
    old = path.parent / f".{path.name}.old"
    try:
        yield tmp
        names = sorted(entry.name for entry in tmp.iterdir() if entry.name != MANIFEST_NAME)
        (tmp / MANIFEST_NAME).write_text(json.dumps({"files": names}, indent=2))
        if foreign:
            _merge(tmp, path, names)
        else:
            if old.exists():
                shutil.rmtree(old)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        remove_stale_temps(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge(new: Path, path: Path, names: list[str]) -> None:
    """Move ``names`` from ``new`` into ``path``, drop what only the old manifest lists, then
    move the manifest; nothing else in ``path`` is touched."""
    previous = written_files(path)
    for name in names:
        if (path / name).is_dir() and name in previous:
            shutil.rmtree(path / name)
        os.replace(new / name, path / name)
    for name in previous - set(names):
        stale = path / name
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink(missing_ok=True)
    os.replace(new / MANIFEST_NAME, path / MANIFEST_NAME)
