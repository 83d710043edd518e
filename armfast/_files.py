"""Writing files safely: atomic replacement, a writable-folder probe, stale temporaries.

Every file armfast writes is created by ``open()``, so its mode follows the umask (0644 under
the usual 022); the temporaries of an atomic write are ``.<name>.tmp-<pid>`` next to the target.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def _named(exc: OSError, path: Path, action: str) -> OSError:
    """The same OSError kind (errno kept), its message naming `path`."""
    reason = exc.strerror or str(exc)
    return type(exc)(exc.errno, f"cannot {action} {path}: {reason}") if exc.errno else \
        OSError(f"cannot {action} {path}: {reason}")


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync it, rename over `path`, fsync
    the directory: a reader sees the old file or the new one, never a partial one. An OSError
    (full disk, read-only folder) names `path`."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _named(exc, path, "write") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Create folder `path` (and parents) and prove a file can be written in it; OSError
    naming `what` (e.g. ``--out``) and the folder otherwise. Run before any long work."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what}: {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tmp_name(path / "write-probe")
        with open(probe, "wb") as f:
            f.write(b"armfast")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise type(exc)(exc.errno, f"{what}: cannot write in {path}: {reason}") from exc
    return path


def ensure_writable_file(path: str | Path, what: str) -> Path:
    """The folder of output file `path` exists (created) and takes a file; OSError naming
    `what` otherwise. The file itself is written later."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{what}: {path} is a folder, expected a file name")
    ensure_writable_dir(path.parent, what)
    return path


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the ``.<name>.tmp-<pid>`` files an atomic write left when its process was
    killed (the pid is no longer running, or is this process); returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        m = _TMP.match(p.name)
        if m is None or not p.is_file():
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and _running(pid):
            continue  # another live process is writing it
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True
