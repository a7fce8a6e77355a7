"""What every `chute` command that talks to a broker shares: the `--url` / `--timeout` / `--json` options, the
`k=v` option parser, the client it connects with, the rich consoles and `run_command`, the one place where
failures become a one-line message.

Invariants:
- A failure exits 1 with exactly one line on stderr, `error: <message> (<error name>)`, never a traceback: a
  ChuteError (from the broker or the client, a refused connection included), an OSError, or, as a last resort,
  any other exception (its traceback only with CHUTE_DEBUG=1). Ctrl-C exits 130 with `error: interrupted`.
  A reader closing our stdout (`chute consume q | head`) exits 141 quietly, like any Unix tool killed by SIGPIPE.
- Bad flag values are click usage errors (exit 2), checked before anything is sent. Every usage error (a bad or
  missing value, an unknown option or command, a missing argument) is one line on stderr too, `error: <command>:
  <what is wrong> (try '<command> --help')`, naming the flag and what it allows: `ChuteGroup`, the `chute`
  group, turns them into `UsageLine` wherever they come from, so a new command gets this by being added to it.
  `--help`, and a group run without a command, print the help as click does.
- The client never reconnects: a command is one attempt, so a dead broker fails fast instead of retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import click
import msgspec
from rich.console import Console

from chute.client import AsyncClient
from chute.client.url import DEFAULT_URL, parse_url, resolve_url
from chute.errors import ChuteError

DEFAULT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0  # at most; a shorter --timeout shortens it too
NON_TTY_WIDTH = 1000  # tables written to a pipe or file never wrap (rich would assume 80 columns)


def _check_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    url = resolve_url(value)
    try:
        parse_url(url)
    except ChuteError as exc:
        raise click.BadParameter(exc.message, ctx, param) from None
    return url


def _set_tls_ca(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:  # the client reads it when the URL is chutes://
        os.environ["CHUTE_TLS_CA"] = value


def url_option(command: Callable) -> Callable:
    """`--url`: the broker to talk to (default $CHUTE_URL, then the local default); `--tls-ca`: the CA file that
    verifies a chutes:// broker (default $CHUTE_TLS_CA, then the system's CAs)."""
    command = click.option(
        "--tls-ca", type=click.Path(dir_okay=False, exists=True), default=None, callback=_set_tls_ca,
        expose_value=False, metavar="PEM", is_eager=True,
        help="CA certificate(s) that verify a chutes:// broker.  [default: $CHUTE_TLS_CA, else the system's]",
    )(command)  # fmt: skip
    return click.option(
        "--url", default=None, callback=_check_url, metavar="URL",
        help="Broker URL: chute[s]://[user:password@ | token@]host[:port] (chutes: TLS).  "
        f"[default: $CHUTE_URL, else {DEFAULT_URL}]",
    )(command)  # fmt: skip


def timeout_option(command: Callable) -> Callable:
    """`--timeout`: seconds each call to the broker may take."""
    return click.option(
        "--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True, max=86400), default=DEFAULT_TIMEOUT_S,
        show_default=True, metavar="S", help="Seconds to wait for the broker's reply to each call.",
    )(command)  # fmt: skip


def json_option(command: Callable) -> Callable:
    """`--json`: machine-readable output instead of a table."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(command)


def parse_pairs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str] | None:
    """Click callback: `k=v` values (repeatable option) to a dict; None when none were given."""
    pairs: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected NAME=VALUE, got {value!r}", ctx, param)
        pairs[key] = rest
    return pairs or None


@contextlib.asynccontextmanager
async def connect(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> AsyncIterator[AsyncClient]:
    """An open client for one command: no reconnects, `timeout_s` per call."""
    client = AsyncClient(url, timeout=timeout_s, connect_timeout=min(timeout_s, CONNECT_TIMEOUT_S), reconnect=False,
                         name="chute-cli")  # fmt: skip
    async with client:
        yield client


def plural(n: int, word: str) -> str:
    """`1 message`, `2 messages`."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def stdout_console() -> Console:
    """Console for tables on stdout: terminal width on a terminal, no wrapping into a pipe."""
    return Console(width=None if sys.stdout.isatty() else NON_TTY_WIDTH, highlight=False)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def print_json(value: Any) -> None:
    """One JSON document on stdout (msgspec Structs, bytes as base64)."""
    sys.stdout.buffer.write(msgspec.json.encode(value) + b"\n")
    sys.stdout.flush()


def fail(message: str, code: int = 1) -> None:
    """Write `error: message` on stderr, as one line, and exit with `code`."""
    click.echo("error: " + " ".join(message.splitlines()), err=True)
    sys.exit(code)


class CommandFailed(Exception):
    """Raised by a command body with its own one-line message (e.g. one that says how much was done)."""


def describe(error: BaseException) -> str:
    """The one-line description of a failure."""
    if isinstance(error, ChuteError):
        return f"{error.message} ({error.name})"
    if isinstance(error, OSError):
        return f"{error.strerror or error} ({type(error).__name__})"
    return f"unexpected {type(error).__name__}: {error} (set CHUTE_DEBUG=1 for the traceback)"


def _stdout_closed() -> None:
    """Our reader went away: point stdout at /dev/null so the interpreter's final flush cannot fail."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


@contextlib.contextmanager
def one_line_errors(*expected: type[Exception]) -> Iterator[None]:
    """Turn every failure inside into one line on stderr and a non-zero exit (a traceback only with
    CHUTE_DEBUG=1); `expected` exceptions are printed as their text, like CommandFailed."""
    try:
        yield
    except BrokenPipeError:
        _stdout_closed()
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except click.ClickException:
        raise
    except (CommandFailed, *expected) as exc:
        fail(str(exc))
    except (ChuteError, OSError) as exc:
        fail(describe(exc))
    except Exception as exc:
        if os.environ.get("CHUTE_DEBUG"):
            raise
        fail(describe(exc))


class UsageLine(click.UsageError):
    """A click usage error shown as one line (exit status 2)."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line

    def show(self, file: Any = None) -> None:
        click.echo(self.line, err=True)


def _allowed(param: click.Parameter | None) -> str | None:
    """What a parameter accepts, in words, if its type says (choices, a range), else None."""
    kind = getattr(param, "type", None)
    if isinstance(kind, click.Choice):
        return "one of " + ", ".join(str(choice) for choice in kind.choices)
    if isinstance(kind, click.IntRange | click.FloatRange):
        number = "an integer" if isinstance(kind, click.IntRange) else "a number"
        low, high = kind.min, kind.max
        if low is not None and high is not None and not kind.min_open and not kind.max_open:
            return f"{number} from {low:g} to {high:g}"
        bounds = [f"{'above' if kind.min_open else 'at least'} {low:g}" if low is not None else "",
                  f"{'below' if kind.max_open else 'at most'} {high:g}" if high is not None else ""]  # fmt: skip
        return f"{number}, {' and '.join(bound for bound in bounds if bound)}"
    return None


def _named_path(ctx: click.Context, words: list[str]) -> str:
    """The path of the deepest command named by `words`, the arguments left to `ctx` (`chute queue create`): for
    an error that the option parser raised without saying which command's options it was parsing."""
    path, command = ctx.command_path, ctx.command
    for word in words:
        sub = command.get_command(ctx, word) if isinstance(command, click.Group) else None
        if sub is None:
            break
        path, command = f"{path} {word}", sub
    return path


def usage_line(error: click.UsageError, outer: tuple[click.Context, list[str]] | None = None) -> str:
    """`error: chute publish: invalid value for '--priority': 10 is not in the range 0<=x<=9 (allowed: an integer
    from 0 to 9; try 'chute publish --help')`: one line that says which flag and what it allows. `outer`: the
    context the error passed through and its arguments, for errors that name no context."""
    ctx = error.ctx
    path = ctx.command_path if ctx is not None else _named_path(*outer) if outer is not None else "chute"
    message = " ".join(error.format_message().split()).rstrip(".")
    hints = []
    allowed = _allowed(getattr(error, "param", None)) if isinstance(error, click.BadParameter) else None
    if isinstance(error, click.NoSuchOption):
        message = f"No such option {error.option_name!r}"
        if error.possibilities:
            hints.append("did you mean " + " or ".join(sorted(error.possibilities)))
    elif allowed is not None:
        hints.append(f"allowed: {allowed}")
    elif ctx is not None and isinstance(ctx.command, click.Group) and message.startswith("No such command"):
        hints.append("commands: " + ", ".join(ctx.command.list_commands(ctx)))
    hints.append(f"try '{path} --help'")
    return f"error: {path}: {message[:1].lower()}{message[1:]} ({'; '.join(hints)})"


# a group run without a command shows its help (click 8.2+ raises this usage error for it; 8.1 exits 0)
_SHOWS_HELP = (click.exceptions.NoArgsIsHelpError,) if hasattr(click.exceptions, "NoArgsIsHelpError") else ()


@contextlib.contextmanager
def _one_line_click_errors(outer: tuple[click.Context, list[str]] | None = None) -> Iterator[None]:
    try:
        yield
    except (UsageLine, *_SHOWS_HELP):
        raise  # already one line; or a group run without a command, which shows its help
    except click.UsageError as exc:
        raise UsageLine(usage_line(exc, outer)) from None


class ChuteGroup(click.Group):
    """The `chute` group: usage errors of any command under it (parsing its own options, finding a command,
    parsing a subcommand's, or raised by a command's body) become one line on stderr, exit status 2."""

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        with _one_line_click_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        protected = getattr(ctx, "_protected_args", None)  # click 8.2+; 8.1 names it protected_args
        words = [*(protected if protected is not None else ctx.protected_args), *ctx.args]  # invoke empties them
        with _one_line_click_errors((ctx, words)):
            return super().invoke(ctx)


def run_command(main: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Decorate an async command body: run it with asyncio.run and turn every failure into one line."""

    @functools.wraps(main)
    def command(*args, **kwargs) -> None:
        with one_line_errors():
            asyncio.run(main(*args, **kwargs))

    return command
