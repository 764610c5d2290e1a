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
import stat
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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying the one line that tells the user how to continue."""


class UnsafePathError(PermissionError):
    """A file moe-sieve writes into is a symbolic link, a hard link or not a regular file: writing through it
    could change a file outside the run directory, so it is refused."""


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
    """mkstemp/mkdtemp (and safetensors' writer) create 0600/0700; artifacts get the permissions a plain
    open()/mkdir() would give. A symbolic link is never followed."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fchmod(fd, (0o777 if directory else 0o666) & ~_umask())
    finally:
        os.close(fd)


def honour_umask_tree(root: Path) -> None:
    """``honour_umask`` for everything inside a staging directory (files other writers created 0600 too)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                honour_umask(path, directory=False)
        for name in dirnames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                honour_umask(path, directory=True)


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
    try:
        yield tmp_path
        honour_umask(tmp_path, directory=False)  # after the writer: safetensors creates its file 0600
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


def atomic_write_safetensors(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """A ``.safetensors`` file (torch or numpy tensors) written like every other artifact: atomically, with
    the umask's permissions."""
    first = next(iter(tensors.values()), None)
    if first is not None and type(first).__module__ == "numpy":
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


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


def read_json_object(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file is missing, unreadable, not JSON or not an object (a run
    directory's records are optional, and a half-written one reads as absent)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_csv_rows(path: str | os.PathLike) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A CSV table's columns and its ``(line, row)`` pairs, read strictly: binary or non-UTF-8 content, an empty
    file and a row with more or fewer fields than the header are errors naming the file (and line)."""
    import csv
    import io

    path = Path(path)
    raw = path.read_bytes()
    if b"\0" in raw:
        raise ValueError(f"{path}: not a CSV text file (it holds NUL bytes)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start + 1})") from None
    if not text.strip():
        raise ValueError(f"{path}: empty file (expected a header row and one row per run)")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = list(reader.fieldnames or [])
    rows = []
    for row in reader:
        extra, missing = row.pop(None, None) or [], [key for key, value in row.items() if value is None]
        if extra or missing:
            found = len(columns) + len(extra) - len(missing)
            raise ValueError(f"{path}:{reader.line_num}: {found} fields, but the header has {len(columns)}")
        rows.append((reader.line_num, row))
    return columns, rows


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
        honour_umask_tree(tmp)  # before the kept files are linked in: those keep their own permissions
        if keep_others and path.is_dir():
            for entry in path.iterdir():
                if not (tmp / entry.name).exists():
                    link_or_copy(entry, tmp / entry.name)
        fault_point("atomic-dir-swap")
        swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def link_or_copy(src: Path, dst: Path) -> None:
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


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def open_in_run(path: str | os.PathLike, flags: int) -> int:
    """``os.open`` of a file moe-sieve writes in place (not by rename): never through a symbolic link, and only
    a regular file with no other hard link, so a planted link cannot redirect the write outside the run."""
    path = Path(path)
    try:
        fd = os.open(path, flags | _NOFOLLOW, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW on a symbolic link
            raise UnsafePathError(
                f"{path} is a symbolic link (to {os.readlink(path)}); moe-sieve never writes through one. "
                "Remove it and run again"
            ) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(info.st_mode) else f"one of {info.st_nlink} hard links"
        raise UnsafePathError(f"{path} is {what}; moe-sieve does not write into it. Remove it and run again")
    os.set_blocking(fd, True)
    return fd


def open_log(path: str | os.PathLike):
    """A log file opened for appending (binary), never through a symbolic or hard link."""
    return os.fdopen(open_in_run(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab")


_PID_LINE = re.compile(rb"^\d*\n?$")


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Advisory exclusive lock on ``directory/.lock`` for the block; a second holder fails at once.

    The lock file is opened without following links and holds only the holder's pid: anything else there
    (a link, a file with other content) is refused, never truncated. A block that fails leaves no trace of
    the lock: a directory this lock created, or a lock file it created, is removed again if nothing else
    was written beside it.
    """
    import fcntl

    directory = Path(directory)
    created_dirs = [p for p in (directory, *directory.parents) if not p.exists()]  # deepest first
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / ".lock"
    for _attempt in range(10):
        created = False
        try:
            fd = open_in_run(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            created = True
        except FileExistsError:
            fd = open_in_run(lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"{directory} is in use by another moe-sieve process (lock {lock_path}); wait for it to finish "
                "or choose another --out"
            ) from None
        if _same_file(fd, lock_path):
            break
        os.close(fd)  # the lock file was removed or replaced between open and flock: take the new one
    else:
        raise RunLockedError(f"{lock_path} keeps changing; another process is creating and removing it")
    try:
        content = os.pread(fd, 64, 0)
        if not _PID_LINE.match(content):
            raise UnsafePathError(
                f"{lock_path} is not a moe-sieve lock file (it holds other content); remove it and run again"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        ok = False
        try:
            yield lock_path
            ok = True
        finally:
            if not ok and created and _same_file(fd, lock_path) and _only_lock_in(directory):
                lock_path.unlink()
                with contextlib.suppress(OSError):  # stops at the first directory something else was put in
                    for folder in created_dirs:
                        folder.rmdir()
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _only_lock_in(directory: Path) -> bool:
    return all(entry.name == ".lock" for entry in directory.iterdir())
