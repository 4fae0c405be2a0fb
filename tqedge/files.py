"""Atomic writes and checksums: bad input never leaves a half-written file or bundle behind."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from tqedge.errors import TqedgeError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_writable_output(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check, before any work, that directory ``out`` can be created (or replaced).

    Probes the nearest existing ancestor by creating and removing a temp directory in it, so
    read-only file systems and permissions are caught for any user (root included).

    Returns:
        ``out`` resolved.

    Raises:
        TqedgeError: ``out`` exists (without ``overwrite``) or cannot be written.
    """
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise TqedgeError(f"output exists: {out} (pass overwrite / --force to replace it)")
    if out.exists() and not out.is_dir():
        raise TqedgeError(f"output {out} is a file, not a bundle directory")
    base = out.parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise TqedgeError(f"cannot write {out}: {base} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tqedge-probe.", dir=base))
    except OSError as e:
        raise TqedgeError(f"cannot write {out}: {base} is not writable ({e.strerror or e})") from None
    return out


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):  # another user's process (or not ours to ask)
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove ``.<name>.<pid>.*.partial`` siblings of ``out`` left by exports that died (their
    process is gone); partials of running exports are kept. Returns what was removed."""
    removed = []
    for p in out.parent.glob(f".{glob.escape(out.name)}.*.partial"):
        pid = p.name[len(out.name) + 2:].split(".", 1)[0]
        if p.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False):
    """Build a directory in a temp sibling and rename it into place only if the block succeeds.

    The temp sibling is ``.<name>.<pid>.<random>.partial``: if the process is killed, the next
    ``atomic_directory`` for the same ``out`` removes it (its pid is dead); a concurrent one
    (pid alive) is left alone.

    Args:
        out: the final directory path.
        overwrite: replace an existing ``out``; otherwise an existing ``out`` is an error.

    Yields:
        The temp directory (a ``Path``) to fill.
    """
    out = check_writable_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
