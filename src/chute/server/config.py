"""`ServerConfig`: every setting of `chute serve`, from defaults, a TOML file and command-line flags.

The file uses the same names as the flags (with `_` for `-`), e.g.

    data_dir = "/var/lib/chute"
    port = 6160
    http_port = 6161
    amqp_port = 5672
    fsync = "always"
    token = "s3cret"
    tls_cert = "/etc/chute/cert.pem"
    tls_key = "/etc/chute/key.pem"

    [[users]]                       # same schema as an entry of <data_dir>/users.json (docs/security.md)
    name = "orders-app"
    password_hash = "scrypt$14$8$1$..."          # from `chute user hash-password`
    grants = [{allow = ["publish", "consume"], queues = "orders.*"}]

Invariant: a config that loads is valid — unknown keys, wrong types and out-of-range values are refused with
an error that names the key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from chute.core.state import DEFAULT_MAX_MESSAGE_BYTES
from chute.errors import InvalidArgument
from chute.protocol.frames import DEFAULT_HTTP_PORT, DEFAULT_MAX_FRAME_BYTES, DEFAULT_PORT
from chute.server.users import User, check_users

DEFAULT_HOST = "127.0.0.1"
DEFAULT_AMQP_PORT = 5672


class ServerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    data_dir: str = "./chute-data"
    """Where the log and checkpoints live (created if missing)."""
    host: str = DEFAULT_HOST
    """Address both listeners bind to; loopback by default."""
    port: int = DEFAULT_PORT
    """Native protocol port (0: any free port)."""
    http_port: int | None = DEFAULT_HTTP_PORT
    """HTTP port: the HTTP API, dashboard, /metrics, SQS API and /healthz (0: any free port; None: none)."""
    amqp_port: int | None = DEFAULT_AMQP_PORT
    """AMQP 0-9-1 port (docs/amqp.md; 0: any free port; None: none). If the default port is taken, the server
    starts without AMQP and logs a warning; a port given explicitly must be free."""
    store: str | None = None
    """A `postgresql://` URL: keep the broker's log and checkpoints in that PostgreSQL database (a stream named
    `node_name`) instead of `data_dir`, which then holds only the users file (docs/cluster.md)."""
    node_name: str | None = None
    """With `store`: this node's name in the cluster (a process starting under a running name takes it over).
    None: this machine's host name, plus `-<port>` when the native port is neither the default nor 0, so that
    nodes on one machine listening on their own ports get their own names (chute.cluster.node.default_node_name)."""
    shards: int | None = None
    """With `store`: the cluster's number of shards, fixed when the first node sets the database up (None: the
    stored number, or 16 for a new cluster); a node given another number than the stored one refuses to start."""
    cluster_lease_s: float = 5.0
    """With `store`: a node whose heartbeat is older than this is dead; the others take its shards over."""
    cluster_heartbeat_s: float = 1.0
    """With `store`: how often a node renews its heartbeat and its shards' leases (less than cluster_lease_s)."""
    advertise: str | None = None
    """With `store`: the host other nodes reach this one at (default: `host`, or this machine's name when `host`
    is a wildcard address such as 0.0.0.0)."""
    fsync: Literal["always", "interval", "never"] = "always"
    """`always`: confirm after fsync (default); `interval`: fsync every 100 ms; `never`: leave it to the OS."""
    token: str | None = None
    """A superuser token: clients presenting it may do everything (auth is on when this is set or users exist)."""
    users: list[User] = []
    """Static users (read-only; `chute user` edits the users file in the data directory instead)."""
    allow_anonymous: bool = False
    """Allow listening on a non-loopback address without auth (otherwise the server refuses to start)."""
    tls_cert: str | None = None
    """PEM certificate chain: both listeners speak TLS (1.2 or later) when this and `tls_key` are set."""
    tls_key: str | None = None
    """PEM private key of `tls_cert`."""
    failed_login_limit: int = 5
    """Wrong passwords in a row for one user name before further attempts for that name are spaced out (1 s, then
    doubling up to 60 s, with no password check meanwhile); 0 turns the limit off. docs/security.md."""
    max_connections: int = 10_000
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    memory_high_water_bytes: int = 256 * 2**20
    """Above this many bytes of unconfirmed publishes, the server stops reading from publishers until it falls
    below half of it (backpressure instead of running out of memory)."""
    amqp_consumer_timeout_s: float = 1800.0
    """AMQP: a delivery left unacknowledged this long closes its channel with 406 PRECONDITION_FAILED and goes
    back to its queue (RabbitMQ's `consumer_timeout`, 30 minutes by default; docs/amqp.md)."""
    heartbeat_s: float = 10.0
    """Heartbeat interval offered to clients; a peer silent for 3 intervals is considered dead."""
    shutdown_grace_s: float = 10.0
    """On SIGTERM, how long in-flight requests may take to finish."""

    def validate(self) -> ServerConfig:
        for key, low, high in (
            ("port", 0, 65535), ("max_connections", 1, 1_000_000), ("max_frame_bytes", 65536, 2**30),
            ("max_message_bytes", 1, 2**30), ("memory_high_water_bytes", 2**20, 2**40),
            ("heartbeat_s", 0.05, 3600), ("shutdown_grace_s", 0, 3600), ("failed_login_limit", 0, 1_000_000),
            ("amqp_consumer_timeout_s", 0.1, 43_200),
        ):  # fmt: skip
            value = getattr(self, key)
            if not low <= value <= high:
                raise InvalidArgument(f"{key} must be between {low} and {high}, got {value!r}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise InvalidArgument(f"http_port must be between 0 and 65535, got {self.http_port!r}")
        if self.amqp_port is not None and not 0 <= self.amqp_port <= 65535:
            raise InvalidArgument(f"amqp_port must be between 0 and 65535, got {self.amqp_port!r}")
        if self.max_message_bytes + 64 * 1024 > self.max_frame_bytes:
            raise InvalidArgument("max_frame_bytes must exceed max_message_bytes by at least 64 KiB")
        if self.token is not None and not self.token:
            raise InvalidArgument("token must not be empty")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("tls_cert and tls_key go together: give both or neither")
        check_users(self.users, "config users")
        if self.store is not None and not self.store.startswith(("postgresql://", "postgres://")):
            raise InvalidArgument("store must be a postgresql:// URL (without it, data_dir holds the log)")
        if self.shards is not None and not 1 <= self.shards <= 4096:
            raise InvalidArgument(f"shards must be between 1 and 4096, got {self.shards!r}")
        if not 0.5 <= self.cluster_lease_s <= 3600:
            raise InvalidArgument(f"cluster_lease_s must be between 0.5 and 3600, got {self.cluster_lease_s!r}")
        if not 0.05 <= self.cluster_heartbeat_s < self.cluster_lease_s:
            raise InvalidArgument(f"cluster_heartbeat_s must be at least 0.05 and less than cluster_lease_s "
                                  f"({self.cluster_lease_s}), got {self.cluster_heartbeat_s!r}")  # fmt: skip
        if self.advertise is not None and (not self.advertise or not self.advertise.isprintable()):
            raise InvalidArgument("advertise must be a host name or address")
        if self.node_name is not None and (not self.node_name or len(self.node_name) > 200
                                           or not self.node_name.isprintable()):  # fmt: skip
            raise InvalidArgument("node_name must be 1 to 200 printable characters")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def load_config(path: str | Path | None = None, **overrides) -> ServerConfig:
    """Defaults, then the TOML file at `path` (if given), then `overrides` that are not None."""
    values: dict = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise InvalidArgument(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"config file {path} is not valid TOML: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = msgspec.convert(values, ServerConfig)
    except msgspec.ValidationError as exc:
        where = f"config file {path}" if path else "config"
        raise InvalidArgument(f"{where}: {exc}") from None
    return config.validate()
