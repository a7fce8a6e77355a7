"""The AMQP handshake's credentials: connection.start-ok's PLAIN or AMQPLAIN response, checked against Chute's
users (server/auth.py) like a native HELLO: a user name and password (scrypt, off the event loop), or an empty
user name and an API token as the password.
"""

from __future__ import annotations

from pamqp import decode

from chute.amqp.errors import ACCESS_REFUSED, connection_error
from chute.errors import ChuteError
from chute.protocol.messages import Hello
from chute.server.auth import ANONYMOUS, Authenticator, Principal


def credential(auth: Authenticator, method) -> tuple:
    """What a connection authenticated with (for `Authenticator.still_valid` when the users change)."""
    user, password = _credentials(method)
    hello = Hello(versions=[1], user=user or None, password=password if user else None,
                  token=None if user else password)  # fmt: skip
    return auth.credential(hello)


def login_name(auth: Authenticator, method, principal: Principal) -> str:
    """The user a connection is, which a published message's `user_id` property must name (as RabbitMQ
    checks it): the authenticated user; with auth off, the user name start-ok gave (`guest` for most clients)."""
    return principal.name if auth.enabled else _credentials(method)[0]


async def authenticate(auth: Authenticator, method) -> Principal:
    """The principal of connection.start-ok's credentials; 403 ACCESS_REFUSED (a connection exception) if they
    are wrong. With auth off every connection is the anonymous superuser, whatever it sent (guest/guest too)."""
    user, password = _credentials(method)
    await auth.refresh()
    if not auth.enabled:
        return ANONYMOUS  # auth off: any user (guest/guest too) is the anonymous superuser, as natively
    try:
        if user:
            return await auth.by_password(user, password)
        return await auth.by_token(password)  # an empty user name: the password is an API token
    except ChuteError as exc:
        raise connection_error(ACCESS_REFUSED, f"Login was refused using authentication mechanism "
                               f"{method.mechanism}: {exc.message}") from None  # fmt: skip


def _credentials(method) -> tuple[str, str]:
    """(user, password) of start-ok's PLAIN or AMQPLAIN response; 403 for other mechanisms or a bad response."""
    response = method.response
    if isinstance(response, str):
        response = response.encode("utf-8", "surrogateescape")
    response = response or b""
    if method.mechanism == "PLAIN":
        parts = response.split(b"\x00")
        if len(parts) != 3:
            raise connection_error(ACCESS_REFUSED, "malformed PLAIN response")
        return parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace")
    if method.mechanism == "AMQPLAIN":
        try:
            table = decode.field_table(len(response).to_bytes(4, "big") + response)[1]
        except Exception:
            raise connection_error(ACCESS_REFUSED, "malformed AMQPLAIN response") from None
        return str(table.get("LOGIN", "")), str(table.get("PASSWORD", ""))
    raise connection_error(ACCESS_REFUSED, f"unsupported authentication mechanism {method.mechanism!r}")
