"""The I/O seam of ``td.save`` / ``td.load``: every file operation goes through one :class:`FileSystem`.

A save of ``<parent>/<name>`` writes a complete new copy beside its place and swaps it in with two
renames, under a lock that serialises writers of the same name::

    <parent>/.td-<h>.lock                        exists while a save of <name> runs
    <parent>/.td-<h>-<host>-<pid>-<rand>.tmp/    the new copy being written
    <parent>/.td-<h>-<host>-<pid>-<rand>.old/    the previous copy, between the swap's two renames

``h`` is a hash of ``<name>``: helper names stay short whatever the folder's name (a 250-character name
leaves room for them) and are found by exact comparison, never by glob patterns, so names such as
``exp[1]`` or ``c*`` cannot match other folders' helpers. A reader opens the folder once (a directory
descriptor) and every file in it once, so a save that swaps the folder meanwhile cannot mix two copies;
if the folder vanishes under a reader (it was swapped and the old copy deleted), the reader is told with
:class:`FolderChanged` and starts again.

Tests inject faults by subclassing :class:`FileSystem` (override :meth:`FileSystem.before`, called before
every operation that changes the disk, or any primitive) and installing it with :func:`use`.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import os
import re
import secrets
import socket
import stat
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ..errors import CheckpointError

try:  # POSIX advisory locks; without them (Windows) concurrent writers are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = [
    "FileSystem",
    "Folder",
    "FolderChanged",
    "NoCheckpoint",
    "current",
    "open_folder",
    "resolve",
    "use",
    "write_folder",
]

_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_HELPER = re.compile(r"^\.td-([0-9a-f]{16})-([0-9a-f]{4})-([0-9]{1,10})-[0-9a-f]{4}\.(tmp|old)$")
_MAX_NAME_BYTES = 255


class FolderChanged(CheckpointError):
    """The folder being read was swapped by a concurrent save; reading it again gives a consistent copy."""


class NoCheckpoint(CheckpointError):
    """There is no checkpoint at the path (nor a previous copy beside it). Any other CheckpointError means
    something is there but cannot be read: a resume must not start afresh over it."""


def _fs_error(what: str, path: object, exc: OSError) -> CheckpointError:
    return CheckpointError(f"{what} {path} failed: {exc.strerror or exc} (errno {exc.errno}).")


class FileSystem:
    """The file operations of td.save / td.load, relative to directory descriptors.

    Attributes:
        lock_timeout: seconds a save waits for another process saving to the same folder before it
            raises :class:`~torch_dendrites.CheckpointError`.
    """

    lock_timeout: float = 600.0
    lock_poll: float = 0.02

    def before(self, op: str, name: str) -> None:
        """Called before every operation that changes the disk (fault-injection tests override it)."""

    # ------------------------------------------------------------------ reading
    def open_dir(self, path: Union[str, Path], dir_fd: Optional[int] = None, follow: bool = True) -> int:
        flags = os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC | (0 if follow else _O_NOFOLLOW)
        return os.open(path, flags, dir_fd=dir_fd)

    def list_dir(self, dir_fd: int) -> List[str]:
        return os.listdir(dir_fd)

    def lstat(self, name: str, dir_fd: int) -> os.stat_result:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)

    def open_file(self, name: str, dir_fd: int) -> int:
        """A read descriptor on a regular file; symbolic links are refused (``ELOOP``)."""
        fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise IsADirectoryError(errno.EISDIR, "not a regular file", name)
        return fd

    def read_at(self, fd: int, offset: int, size: int) -> bytearray:
        """Exactly ``size`` bytes at ``offset`` (fewer only at the end of the file)."""
        buf = bytearray(size)
        view, done = memoryview(buf), 0
        while done < size:
            chunk = os.pread(fd, min(size - done, 1 << 26), offset + done)
            if not chunk:
                del view
                return buf[:done]
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
        return buf

    # ------------------------------------------------------------------ writing
    def make_dir(self, name: str, dir_fd: int) -> None:
        self.before("mkdir", name)
        os.mkdir(name, 0o755, dir_fd=dir_fd)

    def write_file(self, name: str, data: Any, dir_fd: int) -> None:
        """Create ``name`` (never an existing file or link), write all of ``data`` and fsync it. ``data``: bytes,
        or an object whose ``chunks()`` yields the file's pieces (a large file is never joined in memory)."""
        self.before("write", name)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o644, dir_fd=dir_fd)
        try:
            for chunk in data.chunks() if hasattr(data, "chunks") else (data,):
                view = memoryview(chunk).cast("B")
                while view:
                    view = view[os.write(fd, view[: 1 << 30]) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str, dir_fd: int) -> None:
        self.before("rename", f"{src} -> {dst}")
        os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def remove_file(self, name: str, dir_fd: int) -> None:
        self.before("unlink", name)
        os.unlink(name, dir_fd=dir_fd)

    def remove_dir(self, name: str, dir_fd: int) -> None:
        self.before("rmdir", name)
        os.rmdir(name, dir_fd=dir_fd)

    def sync_dir(self, fd: int) -> None:
        self.before("fsync", "")
        try:
            os.fsync(fd)
        except OSError as exc:  # some file systems cannot fsync a directory; the data files are synced
            if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
                raise

    # ------------------------------------------------------------------ locking
    def lock(self, name: str, dir_fd: int) -> Optional[int]:
        """Hold the lock file ``name``; returns its descriptor (None where locks do not exist)."""
        if fcntl is None:  # pragma: no cover
            return None
        deadline = time.monotonic() + self.lock_timeout
        while True:
            self.before("lock", name)
            fd = os.open(name, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o644, dir_fd=dir_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise CheckpointError(
                        f"another process has been saving to the same folder for {self.lock_timeout:.0f} s "
                        f"(it holds {name}); wait for it or save elsewhere."
                    ) from None
                time.sleep(self.lock_poll)
                continue
            # The holder before us may have removed the file after unlocking it: the lock only counts
            # if the name still refers to the file we locked.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def unlock(self, fd: Optional[int], name: str, dir_fd: int) -> None:
        if fd is None:  # pragma: no cover
            return
        try:
            self.before("unlink", name)
            os.unlink(name, dir_fd=dir_fd)  # removed while still held: no stale lock file stays behind
        except OSError:
            pass
        finally:
            os.close(fd)


_DEFAULT = FileSystem()
_CURRENT: contextvars.ContextVar = contextvars.ContextVar("torch_dendrites_filesystem")


def current() -> FileSystem:
    """The :class:`FileSystem` that td.save / td.load use in this context."""
    return _CURRENT.get(_DEFAULT)


@contextlib.contextmanager
def use(fs: FileSystem) -> Iterator[FileSystem]:
    """Run td.save / td.load inside the block through ``fs`` (for fault injection in tests)."""
    if not isinstance(fs, FileSystem):
        raise TypeError(f"fs must be a FileSystem, got {type(fs).__name__}")
    token = _CURRENT.set(fs)
    try:
        yield fs
    finally:
        _CURRENT.reset(token)


# ---------------------------------------------------------------------- names
def _token(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:4]


def _helper_name(name: str, kind: str) -> str:
    return f".td-{_token(name)}-{_host()}-{os.getpid()}-{secrets.token_hex(2)}.{kind}"


def _lock_name(name: str) -> str:
    return f".td-{_token(name)}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _helpers(entries: Sequence[str], name: str) -> List[Tuple[str, str, bool]]:
    """``(entry, kind, removable)`` for the helper folders of ``name``: removable when they belong to this
    process or to a dead process on this host (a live writer's folders are never touched)."""
    token, host, out = _token(name), _host(), []
    legacy = {f".{name}.tmp-": "tmp", f".{name}.old-": "old"}  # names of format-version-1 saves
    for entry in entries:
        m = _HELPER.match(entry)
        if m and m.group(1) == token:
            pid = int(m.group(3))
            out.append((entry, m.group(4), m.group(2) == host and (pid == os.getpid() or not _alive(pid))))
            continue
        for prefix, kind in legacy.items():
            rest = entry[len(prefix) :]
            if entry.startswith(prefix) and rest.isdigit() and len(rest) <= 10:
                out.append((entry, kind, int(rest) == os.getpid() or not _alive(int(rest))))
    return out


def check_name(path: Union[str, os.PathLike]) -> Path:
    """``path`` as a Path naming a folder, or a CheckpointError saying why it cannot be one."""
    try:
        raw = os.fspath(path)
    except TypeError:
        raise CheckpointError(f"path must be a str or os.PathLike, got {type(path).__name__}.") from None
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if "\x00" in raw:
        raise CheckpointError(f"path {raw!r} contains a NUL character; no file system accepts it.")
    p = Path(raw)
    if not raw or p.name in ("", ".", ".."):
        raise CheckpointError(
            f"path {raw!r} names no folder of its own (empty, '.', '..' or a root); give a folder path such as "
            "'runs/ckpt'."
        )
    size = len(p.name.encode("utf-8", "surrogateescape"))
    if size > _MAX_NAME_BYTES:
        raise CheckpointError(
            f"the folder name of {raw[:60]!r}... is {size} bytes long; file systems allow {_MAX_NAME_BYTES}."
        )
    return p


# ---------------------------------------------------------------------- writing a folder
def _remove_flat(fs: FileSystem, parent_fd: int, name: str) -> None:
    """Remove ``name``, a folder of plain files (a helper folder); best effort. A folder holding a
    sub-folder is no helper of ours and is left alone."""
    try:
        fd = fs.open_dir(name, parent_fd, follow=False)
    except OSError:
        return
    try:
        entries = fs.list_dir(fd)
        if any(stat.S_ISDIR(fs.lstat(e, fd).st_mode) for e in entries):
            return
        for e in entries:
            fs.remove_file(e, fd)
    except OSError:
        return
    finally:
        os.close(fd)
    try:
        fs.remove_dir(name, parent_fd)
    except OSError:
        pass


def _make_parents(fs: FileSystem, folder: Path) -> List[Path]:
    """Create ``folder`` and its missing parents; returns the ones created (deepest last)."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    created = []
    for p in reversed(missing):
        fs.before("mkdir", str(p))
        try:
            os.mkdir(p, 0o755)
        except FileExistsError:
            continue
        created.append(p)
    return created


def write_folder(
    path: Union[str, os.PathLike],
    files: Sequence[Tuple[str, bytes]],
    recognize: Callable[[FileSystem, int], Optional[str]],
    fs: Optional[FileSystem] = None,
) -> Path:
    """Write ``files`` (name, content; the last one marks the folder complete) as the folder ``path``.

    ``recognize(fs, dir_fd)`` says why an existing folder at ``path`` is not one td.save may replace
    (None: it may). On any failure the previous copy stays in place and nothing new is left behind.
    """
    fs = current() if fs is None else fs
    path = check_name(path)
    name = path.name
    created: List[Path] = []
    try:
        created = _make_parents(fs, path.parent)
        parent_fd = fs.open_dir(path.parent)
    except OSError as exc:
        _remove_created(created)
        raise _fs_error("creating the folder for", path, exc) from None
    ok = False
    try:
        lock_fd = fs.lock(_lock_name(name), parent_fd)
        try:
            _check_destination(fs, parent_fd, name, path, recognize)
            tmp = _helper_name(name, "tmp")
            fs.make_dir(tmp, parent_fd)
            try:
                tmp_fd = fs.open_dir(tmp, parent_fd, follow=False)
                try:
                    for fname, data in files:
                        fs.write_file(fname, data, tmp_fd)
                    fs.sync_dir(tmp_fd)
                finally:
                    os.close(tmp_fd)
                _swap(fs, parent_fd, tmp, name)
            except BaseException:
                _remove_flat(fs, parent_fd, tmp)
                raise
            ok = True
            _cleanup(fs, parent_fd, name)
        finally:
            fs.unlock(lock_fd, _lock_name(name), parent_fd)
    except OSError as exc:
        hint = " (the disk is full)" if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
        raise CheckpointError(
            f"saving {path} failed{hint}: {exc.strerror or exc} (errno {exc.errno}); "
            + ("the new copy is in place." if ok else "the previous copy, if any, is untouched.")
        ) from None
    finally:
        os.close(parent_fd)
        if not ok:
            _remove_created(created)
    return path


def _remove_created(created: List[Path]) -> None:
    for p in reversed(created):
        try:
            os.rmdir(p)
        except OSError:
            break


def _check_destination(fs: FileSystem, parent_fd: int, name: str, path: Path, recognize) -> None:
    try:
        st = fs.lstat(name, parent_fd)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(
            f"{path} is a symbolic link; td.save replaces only folders it wrote itself. Save to the link's "
            "target, or remove the link."
        )
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path} exists and is not a folder; td.save never overwrites other files.")
    fd = fs.open_dir(name, parent_fd, follow=False)
    try:
        why = recognize(fs, fd)
    finally:
        os.close(fd)
    if why is not None:
        raise CheckpointError(
            f"{path} exists and is not a checkpoint written by td.save ({why}); td.save does not overwrite "
            "it. Save elsewhere, or move it away first."
        )


def _swap(fs: FileSystem, parent_fd: int, tmp: str, name: str) -> None:
    old = None
    try:
        fs.lstat(name, parent_fd)
    except FileNotFoundError:
        pass
    else:
        # A crash between the two renames leaves the previous copy at `old`, which open_folder finds.
        old = _helper_name(name, "old")
        fs.rename(name, old, parent_fd)
    try:
        fs.rename(tmp, name, parent_fd)
    except BaseException:
        if old is not None:
            with contextlib.suppress(OSError):
                fs.rename(old, name, parent_fd)
        raise
    fs.sync_dir(parent_fd)
    if old is not None:
        _remove_flat(fs, parent_fd, old)


def _cleanup(fs: FileSystem, parent_fd: int, name: str) -> None:
    """Remove the helpers of ``name`` left by this process or by dead ones (earlier crashes)."""
    try:
        entries = fs.list_dir(parent_fd)
    except OSError:
        return
    for entry, _kind, removable in _helpers(entries, name):
        if removable:
            _remove_flat(fs, parent_fd, entry)


# ---------------------------------------------------------------------- reading a folder
class Folder:
    """A checkpoint folder opened for reading: one directory descriptor, and one descriptor per file,
    all opened at once (a save that swaps the folder afterwards cannot take the files away). Use as a
    context manager."""

    def __init__(self, fs: FileSystem, fd: int, path: Path, names: Sequence[str] = ()):
        self.fs, self.fd, self.path = fs, fd, path
        self._fds: Dict[str, int] = {}
        self._errors: Dict[str, int] = {}
        try:
            self.names = set(fs.list_dir(fd))
            for name in names:
                if name not in self.names:
                    continue
                try:
                    self._fds[name] = fs.open_file(name, fd)
                except FileNotFoundError:
                    raise FolderChanged(f"{path} changed while it was read (a save replaced it).") from None
                except OSError as exc:
                    self._errors[name] = exc.errno
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def open(self, name: str) -> int:
        """The read descriptor of the file ``name`` (one of the names the folder was opened with)."""
        if name not in self.names:
            raise CheckpointError(f"{self.path / name} is missing; is this a folder written by td.save?")
        code = self._errors.get(name)
        if code == errno.ELOOP:
            raise CheckpointError(f"{self.path / name} is a symbolic link; a checkpoint holds only its own files.")
        if code == errno.EISDIR:
            raise CheckpointError(f"{self.path / name} is not a regular file.")
        if code is not None:
            raise CheckpointError(f"opening {self.path / name} failed: {os.strerror(code)} (errno {code}).")
        return self._fds[name]

    def read(self, name: str, limit: int) -> bytes:
        """The whole file ``name``, refused if larger than ``limit`` bytes."""
        fd = self.open(name)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise CheckpointError(f"{self.path / name} is {size} bytes, more than {limit}; refusing to read it.")
            return bytes(self.fs.read_at(fd, 0, size))
        except OSError as exc:
            raise _fs_error("reading", self.path / name, exc) from None


def _previous_copy(fs: FileSystem, parent: Path, name: str) -> Optional[str]:
    """The newest previous copy of ``parent/name`` left by a save interrupted between its two renames."""
    try:
        pfd = fs.open_dir(parent)
    except OSError:
        return None
    try:
        best: Tuple[int, str] = (-1, "")
        for entry, kind, _ in _helpers(fs.list_dir(pfd), name):
            if kind != "old":
                continue
            try:
                efd = fs.open_dir(entry, pfd, follow=False)
            except OSError:
                continue
            try:
                mtime = fs.lstat("recipe.json", efd).st_mtime_ns
            except OSError:
                continue
            finally:
                os.close(efd)
            best = max(best, (mtime, entry))
        return best[1] or None
    except OSError:
        return None
    finally:
        os.close(pfd)


def _open_once(fs: FileSystem, path: Path, names: Sequence[str]) -> Optional[Folder]:
    for candidate in (path, None):
        if candidate is None:
            old = _previous_copy(fs, path.parent, path.name)
            if old is None:
                return None
            candidate = path.parent / old
        try:
            fd = fs.open_dir(candidate)
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            raise CheckpointError(f"{candidate} is not a folder; td.save writes folders.") from None
        except OSError as exc:
            raise _fs_error("opening", candidate, exc) from None
        try:
            return Folder(fs, fd, candidate, names)
        except OSError as exc:
            raise _fs_error("reading", candidate, exc) from None
    return None


def open_folder(
    path: Union[str, os.PathLike], names: Sequence[str] = (), fs: Optional[FileSystem] = None, attempts: int = 5
) -> Folder:
    """Open the checkpoint folder ``path`` (or the previous copy an interrupted save left beside it) and
    its files ``names``."""
    fs = current() if fs is None else fs
    p = check_name(path)
    for i in range(attempts):
        folder = _open_once(fs, p, names)
        if folder is not None:
            return folder
        # A concurrent save may be between its renames right now: look again shortly.
        time.sleep(0.002 * (i + 1))
    raise NoCheckpoint(f"{p} is not a folder written by td.save (nothing is there).")


def resolve(path: Union[str, os.PathLike]) -> Path:
    """Where the checkpoint ``path`` can be read now: ``path`` itself, or the previous copy that a save
    interrupted between its two renames left beside it.

    Raises:
        CheckpointError: there is neither.
    """
    with open_folder(path) as folder:
        return folder.path


def retrying(read: Callable[[], object], attempts: int = 10):
    """``read()`` again (up to ``attempts`` times) while a concurrent save swaps the folder under it."""
    for i in range(attempts):
        try:
            return read()
        except FolderChanged:
            if i == attempts - 1:
                raise
            time.sleep(0.002 * (i + 1))
    return None  # pragma: no cover


def names_in(fs: FileSystem, dir_fd: int) -> Dict[str, os.stat_result]:
    """Every entry of a folder with its lstat."""
    return {e: fs.lstat(e, dir_fd) for e in fs.list_dir(dir_fd)}
