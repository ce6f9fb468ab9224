"""The OpenAI-compatible HTTP gateway of a peer, and its local control endpoint.

``p2pinfer peer --gateway 127.0.0.1:8080`` serves OpenAI's API from the peer's own trio process (hypercorn's
trio worker), sending requests into the network through the peer's node. See ``docs/gateway.md``.

Importing this package imports hypercorn and prometheus-client; the CLI does so only when a peer starts.
"""

from .app import Gateway, GatewayApp
from .http import GatewayConfigError, is_loopback, parse_bind, serve_tcp, serve_unix
from .openai_api import ApiError

__all__ = ["ApiError", "Gateway", "GatewayApp", "GatewayConfigError", "is_loopback", "parse_bind", "serve_tcp",
           "serve_unix"]
