"""The file-system shim: the ONE place where the file store touches the disk.

Every open, write, fsync, rename, directory fsync, unlink and truncate of `FileStore` goes through an `Fs`, so
tests can inject faults (EIO, ENOSPC) and power cuts without touching the real disk:
- `OsFs` does the real calls. Its `fsync` of a file is `fdatasync`: the data and the size, which is all the
  store relies on (a file's times are never read).
- `MemoryFs` keeps files in memory and models what survives a power cut: a file's bytes survive up to its last
  fsync; a created, renamed or unlinked name survives once its directory was fsynced. `crash()` applies that.
  It models `preallocate` with at most PREALLOCATED_MODEL_BYTES of zeros past a file's data (enough for recovery
  to meet zeros after the last frame, without a 64 MiB buffer per segment in tests).
- `fail(op, errno, times)` on either arms a fault: the next `times` calls of `op` ("write", "fsync",
  "preallocate") raise OSError(errno) instead of doing anything.

Invariant: paths are absolute strings; methods are safe to call from the store's single writer thread while its
reader thread reads (`pread`).
"""

from __future__ import annotations

import errno as errno_codes
import os
import threading
import time

PREALLOCATED_MODEL_BYTES = 4096  # the zeros MemoryFs puts past a file's data for `preallocate` (see above)
# A lock is a flock: held while any copy of its descriptor is open. A child this process forks (a checkpoint's
# snapshot) has a copy from its fork until its first step closes it, so a store of this process that releases the
# lock and takes it again at once (a restart within the process) may find it held for that moment: `lock` tries
# again for LOCK_WAIT_S before it reports the directory in use.
LOCK_WAIT_S = 0.5


class Fs:
    """The operations the file store needs. Subclasses implement the `_x` methods."""

    def __init__(self) -> None:
        self._faults: dict[str, list[int]] = {}

    def fail(self, op: str, errno: int = errno_codes.EIO, times: int = 1) -> None:
        """Make the next `times` calls of `op` ("write" or "fsync") raise OSError(errno)."""
        self._faults.setdefault(op, []).extend([errno] * times)

    def _check(self, op: str, path: str) -> None:
        armed = self._faults.get(op)
        if armed:
            code = armed.pop(0)
            raise OSError(code, os.strerror(code), path)

    def append(self, path: str, data: bytes | bytearray | memoryview) -> None:
        """Append bytes to a file, creating it if needed."""
        self._check("write", path)
        self._append(path, data)

    def write_at(self, path: str, pos: int, data: bytes | bytearray | memoryview) -> None:
        """Write bytes at position `pos` of a file (over its preallocated zeros, or past its end), creating it if
        needed."""
        self._check("write", path)
        self._write_at(path, pos, data)

    def preallocate(self, path: str, size: int) -> None:
        """Reserve space for a file up to `size` bytes (zeros past its data): writes there later change neither
        its size nor its allocation, so their sync costs the disk less. Creates the file if needed."""
        self._check("preallocate", path)
        self._preallocate(path, size)

    def fsync(self, path: str) -> None:
        """Make a file's bytes (and its size) durable."""
        self._check("fsync", path)
        self._fsync(path)

    def write_file(self, path: str, data: bytes) -> None:
        """Create or truncate a file and write `data` (not yet durable: fsync it)."""
        self._check("write", path)
        self._write_file(path, data)

    def fsync_dir(self, path: str) -> None:
        """Make the names in a directory (creations, renames, unlinks) durable."""
        self._check("fsync", path)
        self._fsync_dir(path)


class OsFs(Fs):
    """The real file system."""

    def __init__(self) -> None:
        super().__init__()
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._locks: dict[str, int] = {}

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # (not O_APPEND: it would move every pwrite)
                    self._fds[path] = fd
        return fd

    def _append(self, path, data) -> None:
        fd = self._fd(path)
        self._write_at(path, os.lseek(fd, 0, os.SEEK_END), data)

    def _write_at(self, path, pos, data) -> None:
        fd = self._fd(path)
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, pos)
            view = view[written:]
            pos += written

    def _preallocate(self, path, size) -> None:
        fd = self._fd(path)
        have = os.fstat(fd).st_size
        if have < size:
            os.posix_fallocate(fd, have, size - have)  # the file's size becomes `size`; the space reads as zeros

    def _fsync(self, path) -> None:
        # the written records reach stable storage; without it a power cut could drop confirmed writes. fdatasync
        # makes the data and the file's size durable, which is all a reader after a power cut needs.
        os.fdatasync(self._fd(path))

    def _write_file(self, path, data) -> None:
        self.close_file(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def _fsync_dir(self, path) -> None:
        # directory fsync: a new, renamed or removed file name survives a power cut only after this.
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def pread(self, path: str, pos: int, size: int) -> bytes:
        return os.pread(self._fd(path), size, pos)

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        # rename is atomic: readers see the old checkpoint or the new one, never a half-written file.
        self.close_file(src)
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        self.close_file(path)
        os.unlink(path)

    def truncate(self, path: str, size: int) -> None:
        os.truncate(path, size)

    def close_file(self, path: str) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def lock(self, path: str) -> bool:
        """Take an exclusive lock on the file `path`; False if another process (or store) holds it."""
        import fcntl

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)  # (in the store's thread: the store is not open yet)
                    continue
                os.close(fd)
                return False
            except OSError:
                os.close(fd)
                return False
        self._locks[path] = fd
        return True

    def unlock(self, path: str) -> None:
        fd = self._locks.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for path in list(self._fds):
            self.close_file(path)


class MemoryFs(Fs):
    """Files in memory, with a model of what a power cut keeps (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, bytearray] = {}  # what the running system sees
        self.durable: dict[str, bytes] = {}  # file bytes as of their last fsync, by file identity
        self.durable_names: dict[str, str] = {}  # name -> file identity, as of the last directory fsync
        self.names: dict[str, str] = {}  # name -> file identity, now
        self.dirs: set[str] = set()
        self.locked: set[str] = set()
        self._ids = 0
        self._mutex = threading.Lock()

    def _identity(self, path: str, create: bool) -> str:
        identity = self.names.get(path)
        if identity is None and create:
            self._ids += 1
            identity = f"#{self._ids}"
            self.names[path] = identity
            self.files[identity] = bytearray()
        return identity

    def _append(self, path, data) -> None:
        with self._mutex:
            self.files[self._identity(path, True)].extend(data)

    def _write_at(self, path, pos, data) -> None:
        with self._mutex:
            buffer = self.files[self._identity(path, True)]
            if len(buffer) < pos:
                buffer.extend(bytes(pos - len(buffer)))
            buffer[pos : pos + len(data)] = data

    def _preallocate(self, path, size) -> None:
        with self._mutex:
            buffer = self.files[self._identity(path, True)]
            buffer.extend(bytes(max(0, min(size, len(buffer) + PREALLOCATED_MODEL_BYTES) - len(buffer))))

    def _fsync(self, path) -> None:
        with self._mutex:
            identity = self._identity(path, False)
            if identity is not None:
                self.durable[identity] = bytes(self.files[identity])

    def _write_file(self, path, data) -> None:
        with self._mutex:
            identity = self._identity(path, True)
            self.files[identity] = bytearray(data)

    def _fsync_dir(self, path) -> None:
        with self._mutex:
            prefix = path.rstrip("/") + "/"
            for name in [n for n in self.durable_names if n.startswith(prefix)]:
                del self.durable_names[name]
            for name, identity in self.names.items():
                if name.startswith(prefix):
                    self.durable_names[name] = identity

    def crash(self) -> None:
        """A power cut: every file reverts to its fsynced bytes, every directory to its fsynced names."""
        with self._mutex:
            self.names = dict(self.durable_names)
            self.files = {identity: bytearray(self.durable.get(identity, b"")) for identity in self.names.values()}
            self.locked.clear()
            self._faults.clear()

    def pread(self, path: str, pos: int, size: int) -> bytes:
        identity = self.names.get(path)
        if identity is None:
            raise FileNotFoundError(errno_codes.ENOENT, "no such file", path)
        return bytes(self.files[identity][pos : pos + size])

    def read_file(self, path: str) -> bytes:
        return self.pread(path, 0, 1 << 62)

    def size(self, path: str) -> int:
        return len(self.files[self.names[path]])

    def exists(self, path: str) -> bool:
        return path in self.names or path in self.dirs

    def listdir(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted(n[len(prefix) :] for n in self.names if n.startswith(prefix) and "/" not in n[len(prefix) :])

    def makedirs(self, path: str) -> None:
        self.dirs.add(path.rstrip("/"))

    def rename(self, src: str, dst: str) -> None:
        with self._mutex:
            self.names[dst] = self.names.pop(src)

    def unlink(self, path: str) -> None:
        with self._mutex:
            del self.names[path]

    def truncate(self, path: str, size: int) -> None:
        with self._mutex:
            del self.files[self.names[path]][size:]

    def close_file(self, path: str) -> None:
        pass

    def lock(self, path: str) -> bool:
        if path in self.locked:
            return False
        self.locked.add(path)
        return True

    def unlock(self, path: str) -> None:
        self.locked.discard(path)

    def close(self) -> None:
        pass
