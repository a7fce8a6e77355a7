"""Storage: the durable log behind the broker core (see api.py for the contract)."""

from chute.storage.api import Recovered, RecoveryReport, Store, StoreStats
from chute.storage.file import FileStore, MemoryFs, OsFs
from chute.storage.memory import MemoryStore

__all__ = ["FileStore", "MemoryFs", "MemoryStore", "OsFs", "Recovered", "RecoveryReport", "Store", "StoreStats"]
