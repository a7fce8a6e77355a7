"""The PostgreSQL store: each broker (node) keeps its log stream and checkpoint in a shared PostgreSQL database,
with an ownership epoch checked in every write (docs/cluster.md). Needs asyncpg: `pip install 'chute[postgres]'`.

Modules: `store.py` (PostgresStore: refs, chunks, cache, group commit, checkpoints), `db.py` (the only module
that talks to PostgreSQL: its thread, connections and SQL), `schema.py` (tables and versioned migrations),
`url.py` (URLs in messages, without passwords).
"""

from chute.storage.postgres.schema import SCHEMA_VERSION
from chute.storage.postgres.store import PostgresStore

__all__ = ["SCHEMA_VERSION", "PostgresStore"]
