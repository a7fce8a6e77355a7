"""`chute user ...`: manage the users file of a broker's data directory (a running broker picks changes up within
about a second; no restart).

    chute user add NAME [--superuser] [--no-password | --password-stdin]   (prompts for the password otherwise)
    chute user list | show NAME | delete NAME | passwd NAME
    chute user grant NAME --allow publish,consume --queues 'orders.*'   (or --topics PATTERN)
    chute user revoke NAME [--allow ...] (--queues P | --topics P)
    chute user token add NAME [--label L] | token list NAME | token revoke NAME ID
    chute user key add NAME | key revoke NAME ID           (access keys for the SQS API: id and secret)
    chute user hash-password                               (a password_hash for [[users]] in a config file)

The directory is `--data-dir`, else the `data_dir` of `--config`, else ./chute-data. Users of the config file's
[[users]] are read-only here. Secrets (tokens, access key secrets) are printed once, when made.

Invariant: like every command, a failure is one line on stderr and exit 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import msgspec

from chute.cli.common import one_line_errors, print_json, stdout_console
from chute.errors import InvalidArgument
from chute.server.config import ServerConfig, load_config
from chute.server.users import (
    Grant,
    User,
    UsersFile,
    find,
    hash_password,
    new_access_key,
    new_token,
)
from chute.server.users_table import UsersTable

PERMISSION_CHOICES = ("publish", "consume", "manage")


def _users_file(data_dir: str | None, config_file: str | None, store: str | None = None) -> UsersFile | UsersTable:
    """The users of a cluster (`--store`, or the config's `store`) or of one broker's data directory."""
    config = load_config(config_file) if config_file else None
    store = store or (config.store if config is not None else None)
    if store:
        if not store.startswith(("postgresql://", "postgres://")):
            raise InvalidArgument("--store is a PostgreSQL URL (postgresql://user@host/db)")
        return UsersTable(store)
    if data_dir is None:
        data_dir = config.data_dir if config is not None else ServerConfig().data_dir
    return UsersFile(Path(data_dir))


def _store_options(command):
    command = click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True), default=None,
                           help="The broker's TOML config (for its data_dir or store).")(command)  # fmt: skip
    command = click.option("--store", envvar="CHUTE_STORE", default=None, metavar="URL",
                           help="A cluster's PostgreSQL (or $CHUTE_STORE): its users, shared by every node.",
                           )(command)  # fmt: skip
    return click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                        help="The broker's data directory.  [default: the config's, else ./chute-data]",
                        )(command)  # fmt: skip


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)
    if not password:
        raise InvalidArgument("the password must not be empty")
    return password


def _permissions(ctx, param, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [part.strip() for part in value.split(",") if part.strip()]
    bad = [name for name in names if name not in PERMISSION_CHOICES]
    if bad or not names:
        raise click.BadParameter(f"expected a comma-separated list of {', '.join(PERMISSION_CHOICES)}", ctx, param)
    return names


def _pattern(queues: str | None, topics: str | None) -> tuple[str | None, str | None]:
    if (queues is None) == (topics is None):
        raise click.UsageError("give exactly one of --queues PATTERN or --topics PATTERN")
    return queues, topics


@click.group()
def user() -> None:
    """Manage users, their passwords, API tokens and permissions (docs/security.md)."""


@user.command("add")
@click.argument("name")
@click.option("--superuser", is_flag=True, help="May do everything (users, connections, metrics included).")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@click.option("--no-password", is_flag=True, help="No password: the user signs in with API tokens only.")
@_store_options
def add(name, superuser, password_stdin, no_password, data_dir, config_file, store) -> None:
    """Add a user (asks for a password unless --no-password or --password-stdin)."""
    with one_line_errors():
        store = _users_file(data_dir, config_file, store)
        password_hash = None if no_password else hash_password(_read_password(password_stdin))
        with store.edit() as users:
            if any(each.name == name for each in users):
                raise InvalidArgument(f"user {name!r} exists already")
            users.append(User(name=name, password_hash=password_hash, superuser=superuser).check("user"))
        click.echo(f"added user {name}", err=True)


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_store_options
def list_users(as_json, data_dir, config_file, store) -> None:
    """List the users of the users file."""
    with one_line_errors():
        users = _users_file(data_dir, config_file, store).load()
        if as_json:
            print_json([_public(each) for each in users])
            return
        from rich.table import Table

        table = Table("name", "superuser", "password", "grants", "tokens", "access keys")
        for each in users:
            table.add_row(each.name, "yes" if each.superuser else "", "yes" if each.password_hash else "",
                          "; ".join(_grant_text(g) for g in each.grants), str(len(each.tokens)),
                          str(len(each.access_keys)))  # fmt: skip
        stdout_console().print(table)


def _grant_text(grant: Grant) -> str:
    where = f"queues {grant.queues}" if grant.queues is not None else f"topics {grant.topics}"
    return f"{','.join(grant.allow)} on {where}"


def _public(each: User) -> dict:
    """What may be shown of a user: no hashes, no secrets."""
    return {
        "name": each.name, "superuser": each.superuser, "password": each.password_hash is not None,
        "grants": msgspec.to_builtins(each.grants),
        "tokens": [{"id": t.id, "label": t.label, "created_at": t.created_at} for t in each.tokens],
        "access_keys": [{"id": k.id, "created_at": k.created_at} for k in each.access_keys],
    }  # fmt: skip


@user.command("show")
@click.argument("name")
@_store_options
def show(name, data_dir, config_file, store) -> None:
    """Show one user (as JSON, without secrets)."""
    with one_line_errors():
        print_json(_public(find(_users_file(data_dir, config_file, store).load(), name)))


@user.command("delete")
@click.argument("name")
@_store_options
def delete(name, data_dir, config_file, store) -> None:
    """Delete a user, with its tokens and access keys."""
    with one_line_errors():
        with _users_file(data_dir, config_file, store).edit() as users:
            users.remove(find(users, name))
        click.echo(f"deleted user {name}", err=True)


@user.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@_store_options
def passwd(name, password_stdin, data_dir, config_file, store) -> None:
    """Set a user's password."""
    with one_line_errors():
        store = _users_file(data_dir, config_file, store)
        find(store.load(), name)  # fail before asking for a password
        password_hash = hash_password(_read_password(password_stdin))
        with store.edit() as users:
            find(users, name).password_hash = password_hash
        click.echo(f"password of {name} changed", err=True)


@user.command("grant")
@click.argument("name")
@click.option("--allow", required=True, callback=_permissions, help="publish, consume, manage (comma-separated).")
@click.option("--queues", default=None, metavar="PATTERN", help="Queue name pattern (glob; * matches dots too).")
@click.option("--topics", default=None, metavar="PATTERN", help="Topic name pattern (glob; * matches dots too).")
@_store_options
def grant(name, allow, queues, topics, data_dir, config_file, store) -> None:
    """Allow a user some permissions on queues or topics matching a pattern."""
    queues, topics = _pattern(queues, topics)
    with one_line_errors():
        with _users_file(data_dir, config_file, store).edit() as users:
            each = find(users, name)
            for existing in each.grants:
                if existing.queues == queues and existing.topics == topics:
                    existing.allow = [p for p in PERMISSION_CHOICES if p in existing.allow or p in allow]
                    break
            else:
                each.grants.append(Grant(allow=allow, queues=queues, topics=topics).check())
        click.echo(f"granted {','.join(allow)} on {'queues ' + queues if queues else 'topics ' + topics} to {name}",
                   err=True)  # fmt: skip


@user.command("revoke")
@click.argument("name")
@click.option("--allow", default=None, callback=_permissions, help="Permissions to take away.  [default: all]")
@click.option("--queues", default=None, metavar="PATTERN", help="The queue pattern of the grant.")
@click.option("--topics", default=None, metavar="PATTERN", help="The topic pattern of the grant.")
@_store_options
def revoke(name, allow, queues, topics, data_dir, config_file, store) -> None:
    """Take permissions away from the grant with exactly this pattern."""
    queues, topics = _pattern(queues, topics)
    with one_line_errors():
        with _users_file(data_dir, config_file, store).edit() as users:
            each = find(users, name)
            matching = [g for g in each.grants if g.queues == queues and g.topics == topics]
            if not matching:
                raise InvalidArgument(f"user {name!r} has no grant on {'queues' if queues else 'topics'} "
                                      f"{queues or topics!r}")  # fmt: skip
            for existing in matching:
                existing.allow = [p for p in existing.allow if allow is not None and p not in allow]
            each.grants = [g for g in each.grants if g.allow]
        click.echo(f"revoked from {name}", err=True)


@user.group("token")
def token() -> None:
    """API tokens (for `Authorization: Bearer` and chute://TOKEN@host)."""


@token.command("add")
@click.argument("name")
@click.option("--label", default="", help="What the token is for (shown in lists).")
@_store_options
def token_add(name, label, data_dir, config_file, store) -> None:
    """Make a token for a user and print it (only now: it is stored hashed)."""
    with one_line_errors():
        secret, record = new_token(label)
        with _users_file(data_dir, config_file, store).edit() as users:
            find(users, name).tokens.append(record)
        click.echo(secret)
        click.echo(f"token {record.id} for {name}: keep it now, it cannot be shown again", err=True)


@token.command("list")
@click.argument("name")
@_store_options
def token_list(name, data_dir, config_file, store) -> None:
    """List a user's tokens (ids and labels)."""
    with one_line_errors():
        for record in find(_users_file(data_dir, config_file, store).load(), name).tokens:
            click.echo(f"{record.id}\t{record.label}")


@token.command("revoke")
@click.argument("name")
@click.argument("token_id")
@_store_options
def token_revoke(name, token_id, data_dir, config_file, store) -> None:
    """Revoke a token by its id."""
    _revoke(name, "tokens", "token", token_id, data_dir, config_file, store)


@user.group("key")
def key() -> None:
    """Access keys for the SQS API (AWS SigV4): the secret is stored as is, since signatures need it."""


@key.command("add")
@click.argument("name")
@_store_options
def key_add(name, data_dir, config_file, store) -> None:
    """Make an access key for a user; prints `ID SECRET`."""
    with one_line_errors():
        record = new_access_key()
        with _users_file(data_dir, config_file, store).edit() as users:
            find(users, name).access_keys.append(record)
        click.echo(f"{record.id} {record.secret}")


@key.command("revoke")
@click.argument("name")
@click.argument("key_id")
@_store_options
def key_revoke(name, key_id, data_dir, config_file, store) -> None:
    """Revoke an access key by its id."""
    _revoke(name, "access_keys", "access key", key_id, data_dir, config_file, store)


def _revoke(name: str, field: str, what: str, record_id: str, data_dir, config_file, store) -> None:
    """Remove the record with id `record_id` from the user's `field` list (tokens or access keys)."""
    with one_line_errors():
        with _users_file(data_dir, config_file, store).edit() as users:
            each = find(users, name)
            records = getattr(each, field)
            kept = [record for record in records if record.id != record_id]
            if len(kept) == len(records):
                raise InvalidArgument(f"user {name!r} has no {what} {record_id!r}")
            setattr(each, field, kept)
        click.echo(f"revoked {what} {record_id} of {name}", err=True)


@user.command("hash-password")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
def hash_password_command(password_stdin) -> None:
    """Print a password_hash for a [[users]] entry of a config file."""
    with one_line_errors():
        click.echo(hash_password(_read_password(password_stdin)))
