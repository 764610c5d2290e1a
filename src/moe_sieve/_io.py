"""Atomic file writes, run-directory locks, fault injection and fingerprints shared by every stage."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FAULT_ENV = "MOE_SIEVE_FAULT"
_fault_hits: dict[str, int] = {}


class ArtifactExistsError(FileExistsError):
    """An output already exists and the caller did not ask to overwrite it."""


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock."""


def fault_point(name: str) -> None:
    """Test hook: ``MOE_SIEVE_FAULT=name`` (or ``name@N``, the N-th time) SIGKILLs this process here.

    The fault-injection tests use it to prove that a kill at any of these points loses no finished result
    and leaves nothing partial that loads. Without the variable it costs one dict lookup.
    """
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(nth or 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700; artifacts get the permissions a plain open()/mkdir() would give."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files and staging directories of ``path`` left by killed processes.

    Every temporary name carries its writer's pid (``.NAME.PID.*``), so only leftovers of processes that
    no longer run are removed, never the work in progress of a live one.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.")
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def clean_stale_temps_in(directory: str | os.PathLike) -> list[Path]:
    """``clean_stale_temps`` for every artifact inside ``directory`` (a run directory)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = {m.group(1) for e in directory.iterdir() if (m := re.match(r"^\.(.+?)\.\d+\.", e.name))}
    return [p for name in sorted(names) for p in clean_stale_temps(directory / name)]


def temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash inside the block leaves ``path`` untouched, so a half-written artifact never loads.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    honour_umask(tmp_path, directory=False)
    try:
        yield tmp_path
        fault_point("atomic-rename")
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def ensure_writable(path: str | os.PathLike, overwrite: bool, *, directory: bool | None = None) -> Path:
    """Refuse to replace an existing result unless ``overwrite``; check up front that ``path`` can be written.

    ``directory`` says what kind of artifact ``path`` must be (a file where a directory is expected is an
    error even with ``overwrite``, and the other way round), so bad ``--out`` values fail before any work.
    """
    path = Path(path)
    if directory is True and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {path} is a file, not a directory")
    if directory is False and path.is_dir():
        raise IsADirectoryError(f"--out {path} is a directory, not a file")
    if path.exists() and not overwrite:
        raise ArtifactExistsError(f"{path} already exists; pass --overwrite to replace it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"--out {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {path}: {parent} is not writable")
    return path


def read_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """``safetensors.torch.load_file`` with errors (a truncated or corrupt file) that name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable safetensors file, truncated or corrupt? ({err})") from None


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-serialisable object."""
    payload = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(staged: Path, path: Path) -> None:
    """Put the finished ``staged`` directory at ``path``; the old ``path`` exists until the new one does."""
    if not path.exists():
        os.replace(staged, path)
        return
    if _exchange(staged, path):
        shutil.rmtree(staged, ignore_errors=True)  # now the old content
        return
    old = path.with_name(f"{temp_prefix(path)}old")
    os.replace(path, old)
    fault_point("swap-between-renames")
    os.replace(staged, path)
    shutil.rmtree(old, ignore_errors=True)


def make_staging_dir(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    honour_umask(tmp, directory=True)
    return tmp


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, *, keep_others: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` only when the block succeeds.

    An existing ``path`` is kept unless ``overwrite``; even then it is swapped out only after the new
    content is complete, so a crash never leaves a half-written artifact that loads. ``keep_others`` carries
    files of the old directory that the new content does not replace (e.g. selections a user keeps beside
    a profile) into the new one.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ArtifactExistsError(f"{path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a directory")
    tmp = make_staging_dir(path)
    try:
        yield tmp
        if keep_others and path.is_dir():
            for entry in path.iterdir():
                if not (tmp / entry.name).exists():
                    _link_or_copy(entry, tmp / entry.name)
        fault_point("atomic-dir-swap")
        swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_file)
    else:
        _link_file(src, dst)


def _link_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Advisory exclusive lock on ``directory/.lock`` for the block; a second holder fails at once."""
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / ".lock"
    handle = open(lock_path, "a+")  # noqa: SIM115 - held for the whole block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"{directory} is in use by another moe-sieve process (lock {lock_path}); wait for it to finish "
                "or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield lock_path
    finally:
        handle.close()
