"""The network server: asyncio adapters around `chute.Broker` (native TCP in session.py, HTTP in http.py),
assembled and run by `Server` in app.py. Protocol logic lives in `chute.protocol`; broker logic in `chute.core`.
"""

from chute.server.app import Server
from chute.server.config import ServerConfig, load_config

__all__ = ["Server", "ServerConfig", "load_config"]
