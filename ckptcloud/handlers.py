"""The local ``DiskSaver`` and the one atomic file writer; the save-handler contract is in
:mod:`ckptcloud.contract` (re-exported here).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

from ckptcloud import distributed, serialization
from ckptcloud._ignite import register_with_ignite
from ckptcloud.contract import (  # re-exported: the contract's names, as before
    BaseSaveHandler,
    ObjectInfo,
    check_filename,
    is_save_handler,
    is_valid_name,
    metadata_mode,
)
from ckptcloud.download import LocalWriteError, local_write_error

logger = logging.getLogger("ckptcloud")
T = TypeVar("T")


def atomic_write(dest: Path, fill: Callable[[IO[bytes]], T]) -> T:
    """``fill`` a temporary file next to ``dest``, sync it, then rename it into place; nothing is left on failure.

    The file gets the permissions a plain ``open()`` would give it (``0o666`` less the umask), not ``mkstemp``'s
    ``0o600`` nor a forced ``0o644``: with ``umask 077`` checkpoints stay private.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> dest = Path(tempfile.mkdtemp()) / "a.bin"
        >>> atomic_write(dest, lambda file: file.write(b"abc"))
        3
    """
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w+b") as file:
            result = fill(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
        return result
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` sets it to read it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class DiskSaver(BaseSaveHandler):
    """Save checkpoints as files in a local folder, atomically (temp file in the same folder, then ``os.replace``).

    Args:
        dirname: folder for the checkpoints.
        atomic: write to a temp file and rename it into place, so a crash never leaves a partial file.
        create_dir: create ``dirname`` if it does not exist.
        require_empty: refuse a folder that already holds ``*.pt`` files.
        save_on_rank: the rank that writes and removes.
        **torch_save_kwargs: passed to ``torch.save`` (e.g. ``pickle_protocol``).

    A save that runs out of room (a full disk, a quota, a file-size limit) raises
    :class:`~ckptcloud.download.LocalWriteError`, an ``OSError`` with the original ``errno`` that names the file,
    the folder and the size the checkpoint needs; with ``atomic=True`` nothing is left behind. Other write failures
    are raised as themselves, never as torch's "unexpected pos ..." ``RuntimeError``.

    Example:
        >>> import tempfile, torch
        >>> saver = DiskSaver(tempfile.mkdtemp())
        >>> saver({"w": torch.ones(2)}, "model_1.pt")
        >>> sorted(p.name for p in saver.dirname.iterdir())
        ['model_1.pt']
    """

    def __init__(
        self,
        dirname: str | Path,
        atomic: bool = True,
        create_dir: bool = True,
        require_empty: bool = True,
        save_on_rank: int = 0,
        **torch_save_kwargs: Any,
    ) -> None:
        if not isinstance(dirname, (str, Path)):
            raise TypeError(f"Argument `dirname` should be a str or Path, but given {type(dirname)}")
        self.dirname = Path(dirname).expanduser()
        self._atomic = atomic
        self.save_on_rank = save_on_rank
        self.kwargs = torch_save_kwargs
        if distributed.get_rank() == save_on_rank:
            self._check_and_setup(self.dirname, create_dir, require_empty)

    @staticmethod
    def _check_and_setup(dirname: Path, create_dir: bool, require_empty: bool) -> None:
        if create_dir:
            dirname.mkdir(parents=True, exist_ok=True)
        if not dirname.exists():
            raise ValueError(f"Directory path '{dirname}' is not found")
        if require_empty:
            matched = sorted(name for name in os.listdir(dirname) if name.endswith(".pt"))
            if matched:
                raise ValueError(
                    f"Files {matched} with extension '.pt' are already present in the directory {dirname}. "
                    "If you want to use this directory anyway, pass `require_empty=False`."
                )

    def __repr__(self) -> str:
        return f"DiskSaver(dirname={str(self.dirname)!r}, save_on_rank={self.save_on_rank})"

    def _path(self, filename: str) -> Path:
        """The file for ``filename``: a checked name, and on Windows (where ckptcloud does not import) no ``:``."""
        check_filename(filename)
        if _WINDOWS and ":" in filename:  # "C:x.pt" is drive-relative, "a:b" an NTFS alternate data stream
            raise ValueError(
                f"Argument `filename` should not contain ':' for a DiskSaver on Windows, but given {filename!r}"
            )
        return self.dirname / filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        path = self._path(filename)
        distributed.sync_xla(checkpoint)  # every rank; then only the writer copies anything to the host
        distributed.run_on_rank(
            self.save_on_rank, lambda: self._write(distributed.xla_to_cpu(checkpoint), path), f"saving {path}"
        )

    def _write(self, checkpoint: Mapping, path: Path) -> None:
        """Write ``checkpoint`` to ``path``; a full disk or a size limit raises :class:`LocalWriteError`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        written = 0

        def fill(file: IO[bytes]) -> int:
            nonlocal written
            try:
                return serialization.save(checkpoint, file, **self.kwargs)
            except OSError:
                written = os.fstat(file.fileno()).st_size
                raise

        try:
            if not self._atomic:
                with open(path, "wb") as file:
                    fill(file)
                return
            atomic_write(path, fill)
        except LocalWriteError:
            raise
        except OSError as err:
            if err.errno not in _SPACE_ERRNOS:
                raise
            raise _space_error(err, checkpoint, path, written, self._atomic) from err

    def remove(self, filename: str) -> None:
        path = self._path(filename)
        distributed.run_on_rank(self.save_on_rank, lambda: path.unlink(missing_ok=True), f"removing {path}")

    def load(self, filename: str, *, map_location: Any = "cpu", weights_only: bool = True, mmap: bool = False) -> Any:
        """Load the checkpoint stored under ``filename`` (``torch.load`` with ``weights_only=True`` by default).

        ``mmap=True`` maps the tensors onto the file instead of reading them into new memory. That is safe only
        because files are replaced by rename and removed by unlink, never rewritten in place, so it is refused for
        ``DiskSaver(atomic=False)``, which rewrites files in place.
        """
        path = self._path(filename)
        if mmap and not self._atomic:
            raise ValueError(
                "Argument `mmap=True` cannot be used with DiskSaver(atomic=False): that saver rewrites files in "
                "place, which would change (or crash, SIGBUS) tensors mapped from them. Pass mmap=False"
            )
        return serialization.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)

    def list(self) -> list[str]:
        """Names of the ``*.pt`` checkpoints in the folder, sorted."""
        return sorted(p.name for p in self.dirname.glob("*.pt") if p.is_file() and is_valid_name(p.name))

    def cleanup_incomplete(self, older_than: float = 3600.0) -> list[str]:
        """Delete temporary files a killed process left (``.NAME.*.tmp``); returns their names.

        Args:
            older_than: only files last written at least this many seconds ago (default one hour, so that running
                saves of other processes are left alone).
        """
        if distributed.get_rank() != self.save_on_rank:
            return []
        now = time.time()
        removed = []
        for path in sorted(self.dirname.glob(".*.pt.*.tmp")):
            if now - path.stat().st_mtime >= older_than:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed

    def describe(self) -> dict[str, ObjectInfo]:
        """Each checkpoint in the folder with its size and time; files carry no metadata (resumes read the names)."""
        out = {}
        for name in self.list():
            stat = (self.dirname / name).stat()
            out[name] = ObjectInfo(name, stat.st_size, stat.st_mtime, {})
        return out

    def url(self, filename: str) -> str:
        """``file://`` URL of ``filename``."""
        return self._path(filename).resolve().as_uri()


_WINDOWS = sys.platform == "win32"
_SPACE_ERRNOS = frozenset(code for code in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", 0)) if code)


def _space_error(err: OSError, checkpoint: Mapping, path: Path, written: int, atomic: bool) -> LocalWriteError:
    """The :class:`LocalWriteError` for a save to ``path`` that ran out of room after ``written`` bytes."""
    from ckptcloud.remote import _estimate_nbytes  # the tensors' size, as remote saves estimate it

    needed = _estimate_nbytes(checkpoint)
    left = "nothing was left behind and the previous file, if any, is untouched" if atomic else "it is incomplete"
    hint = (
        f"the checkpoint needs about {needed} bytes for its tensors and the write stopped after {written} bytes; "
        f"{left}. Free space there, or save to a folder with room"
    )
    return local_write_error(err, path.name, str(path.parent), hint)


# ignite's Checkpoint then treats it as its own DiskSaver: full-path last_checkpoint, and reload_objects works.
register_with_ignite(DiskSaver, "DiskSaver")


__all__ = [
    "BaseSaveHandler",
    "DiskSaver",
    "ObjectInfo",
    "atomic_write",
    "check_filename",
    "is_save_handler",
    "is_valid_name",
    "metadata_mode",
]
