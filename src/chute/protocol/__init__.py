"""The native protocol, sans-I/O: bytes in, events out; events in, bytes out. No sockets, no asyncio.

The server (`chute.server`) and the client (`chute.client`) share this package, so both ends speak the same
frames by construction. The specification is docs/protocol.md; its golden bytes are checked by the tests.
"""

from chute.protocol.connection import Connection, Frame
from chute.protocol.frames import PROTOCOL_VERSIONS, Op

__all__ = ["PROTOCOL_VERSIONS", "Connection", "Frame", "Op"]
