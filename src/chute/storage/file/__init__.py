"""The file store: a segmented append-only log with group commit, checkpoints and recovery."""

from chute.storage.file.fs import Fs, MemoryFs, OsFs
from chute.storage.file.log import FileStore

__all__ = ["FileStore", "Fs", "MemoryFs", "OsFs"]
