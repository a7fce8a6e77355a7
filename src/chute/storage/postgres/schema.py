"""The PostgreSQL store's tables, and the versioned migration that creates them on first open.

Every name starts with `chute_`, so Chute can share a database with other applications. Tables:

    chute_schema_version   one row: the schema version this database holds (refuse a newer one)
    chute_streams          one row per stream (a node's log): name, ownership epoch, who opened it, clean flag
    chute_records          the log: (stream_id, ref) -> kind, payload; ref = chunk << 32 | index in chunk
    chute_checkpoints      one row per stream: the position the snapshot covers, the chunk table (per chunk
                           before it: records and bytes), the snapshot's generation, size, parts and CRC-32
    chute_snapshot_parts   the snapshot of that generation in parts of at most SNAPSHOT_PART_BYTES

Version 2 adds the cluster's tables (src/chute/cluster, docs/cluster.md):

    chute_cluster          one row: the number of shards, fixed when the first node set the database up
    chute_nodes            one row per node name: advertised addresses, incarnation (which process runs it
                           now), started_at, heartbeat_at (the database's clock), its lease
    chute_shards           one row per shard: its owner (a node name or NULL) and lease_until (database clock)
    chute_placement        one row per queue or topic name (one namespace): the shard it lives in
                           (the same DDL as chute.cluster.placement.PLACEMENT_DDL, which may have created it)

Version 3 adds `chute_users` (one row: the users document every node signs clients in with; docs/security.md).

Version 4 adds `chute_consumers` (one row per AMQP consumer of any node, so exclusive consumers,
x-single-active-consumer and consumer counts hold across the cluster; chute.cluster.consumers).

Invariants:
- migrations run in one transaction under a transaction-level advisory lock, so two nodes starting together
  create the schema once; a database whose version is newer than SCHEMA_VERSION is refused untouched;
- a database holding Chute-looking tables (`chute_records`) without `chute_schema_version` is not Chute's, or
  is damaged: refused untouched, never "repaired".
"""

from __future__ import annotations

SCHEMA_VERSION = 4
MIGRATION_LOCK = 0x43487574  # pg_advisory_xact_lock key ("CHut"): serializes concurrent first opens

# Version 1. Records and snapshot parts are stored EXTERNAL (out of line, not compressed): message bodies are
# the users' bytes, often compressed already, and PostgreSQL's pglz would cost CPU on every insert.
SCHEMA_V1 = """
CREATE TABLE chute_schema_version (
    version integer NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE chute_streams (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE,
    epoch bigint NOT NULL,
    owner text NOT NULL,
    opened_at timestamptz NOT NULL DEFAULT now(),
    clean boolean NOT NULL DEFAULT false
);
CREATE TABLE chute_records (
    stream_id bigint NOT NULL,
    ref bigint NOT NULL,
    kind smallint NOT NULL,
    payload bytea NOT NULL,
    PRIMARY KEY (stream_id, ref)
);
ALTER TABLE chute_records ALTER COLUMN payload SET STORAGE EXTERNAL;
CREATE TABLE chute_checkpoints (
    stream_id bigint PRIMARY KEY,
    generation bigint NOT NULL,
    position bigint NOT NULL,
    chunk_table bytea NOT NULL,
    snapshot_bytes bigint NOT NULL,
    snapshot_parts integer NOT NULL,
    snapshot_crc32 bigint NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE chute_snapshot_parts (
    stream_id bigint NOT NULL,
    generation bigint NOT NULL,
    part integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (stream_id, generation, part)
);
ALTER TABLE chute_snapshot_parts ALTER COLUMN data SET STORAGE EXTERNAL;
"""

# Version 2: the cluster. Times are the database's (`now()`), never a node's clock. A shard's stream is
# `shard-<n>` in chute_streams; its epoch there is the fencing, these rows only say who should hold it.
SCHEMA_V2 = """
CREATE TABLE chute_cluster (
    id smallint PRIMARY KEY CHECK (id = 1),
    shards integer NOT NULL CHECK (shards > 0),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE chute_nodes (
    name text PRIMARY KEY,
    incarnation text NOT NULL,
    host text NOT NULL,
    port integer,
    http_port integer,
    amqp_port integer,
    lease_s double precision NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped boolean NOT NULL DEFAULT false
);
CREATE TABLE chute_shards (
    shard integer PRIMARY KEY,
    owner text,
    lease_until timestamptz,
    changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS chute_placement (
    name text PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('queue', 'topic')),
    shard integer NOT NULL CHECK (shard >= 0),
    placed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS chute_placement_shard ON chute_placement (shard);
"""

# Version 3: the cluster's users (passwords, API tokens, SQS access keys), shared by every node: one row holding
# the users file's JSON document (chute.server.users_table), its version bumped by each edit.
SCHEMA_V3 = """
CREATE TABLE chute_users (
    id smallint PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL,
    document bytea NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);
"""

# Version 4: the AMQP consumers of every node (chute.cluster.consumers). A row counts while the process named by
# (node, incarnation) is alive in chute_nodes; `id` orders registrations (x-single-active-consumer's "first").
SCHEMA_V4 = """
CREATE TABLE chute_consumers (
    id bigserial PRIMARY KEY,
    queue text NOT NULL,
    node text NOT NULL,
    incarnation text NOT NULL,
    exclusive boolean NOT NULL DEFAULT false,
    priority integer NOT NULL DEFAULT 0,
    registered_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chute_consumers_queue ON chute_consumers (queue, id);
CREATE INDEX chute_consumers_node ON chute_consumers (node, incarnation);
"""

# version -> the DDL that brings version - 1 to it
MIGRATIONS = {1: SCHEMA_V1, 2: SCHEMA_V2, 3: SCHEMA_V3, 4: SCHEMA_V4}


class SchemaError(Exception):
    """The database is not one this Chute can use (newer schema, or not Chute's); the message says why."""


async def migrate(connection) -> int:
    """Bring the database's Chute tables to SCHEMA_VERSION (creating them on first open); return the version
    found before. Raises SchemaError, having changed nothing, for a newer or foreign schema."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        present = {
            row["tablename"]
            for row in await connection.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE 'chute\\_%'"
            )
        }
        found = 0
        if "chute_schema_version" in present:
            found = await connection.fetchval("SELECT max(version) FROM chute_schema_version") or 0
        elif present:
            raise SchemaError(
                f"the database has tables {', '.join(sorted(present))} but no chute_schema_version: it is not a "
                "Chute database (or it is damaged); use another database"
            )
        if found > SCHEMA_VERSION:
            raise SchemaError(
                f"the database's Chute schema is version {found}, newer than this Chute understands "
                f"({SCHEMA_VERSION}): upgrade Chute"
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            await connection.execute(MIGRATIONS[version])
            await connection.execute("INSERT INTO chute_schema_version (version) VALUES ($1)", version)
        return found
