"""Writing files and folders so that a failure or a kill never leaves a half-written result and
never touches what the caller did not ask to replace.

* :func:`atomic_file`: a temporary file beside the target, renamed over it on success.
* :func:`atomic_folder`: a temporary folder beside the target, renamed into place on success
  (the target must not exist, or must be a folder this package owns, e.g. a cache entry).
* :func:`write_into_folder`: a user's output folder. Refuses a non-empty folder unless
  ``overwrite``; everything is written into a temporary folder first, then each file is renamed
  over its namesake, so the folder's other files stay and no file is ever half-written.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["atomic_file", "atomic_folder", "check_output_folder", "write_into_folder"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """``with atomic_file(path) as tmp:`` write ``tmp``; on success it replaces ``path`` (with
    the permissions a new file gets), on any exception it is removed and ``path`` is untouched."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_folder(folder) as tmp:`` fill ``tmp``; on success it is renamed to
    ``folder``. If ``folder`` appeared meanwhile (another process won the race) that one stays;
    on an exception ``tmp`` is removed."""
    target = Path(folder).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix="." + target.name + ".tmp."))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_folder(folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The absolute path of ``folder`` if :func:`write_into_folder` may write there: missing,
    empty, or ``overwrite``; else ``FileExistsError`` (``NotADirectoryError`` for a file)."""
    target = Path(folder).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{str(folder)!r} is a file, not a folder to save into")
    existing = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (", ..." if len(existing) > 5 else "")
        raise FileExistsError(f"{str(folder)!r} is not empty ({shown}); choose a new folder, or "
                              f"allow replacing the files this writes (--overwrite / "
                              f"overwrite=True: other files stay)")
    return target


def write_into_folder(folder: str | os.PathLike, write: Callable[[Path], None], *,
                      overwrite: bool = False) -> list[str]:
    """Run ``write(tmp)`` into a fresh temporary folder, then move what it wrote into ``folder``.

    ``folder`` may be missing or empty; a non-empty one raises ``FileExistsError`` unless
    ``overwrite``, and even then only the files ``write`` produced are replaced (one rename each),
    never the others. Returns the names written. On an exception nothing in ``folder`` changes.
    """
    target = check_output_folder(folder, overwrite=overwrite)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target, prefix=".writing-"))
    try:
        write(tmp)
        written = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
        for rel in written:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, target / rel)
        return [str(rel) for rel in written]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
