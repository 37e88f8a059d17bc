"""What the agent, the generator and both Lua bridges must agree on, written down once.

* The JSON bodies clients get from the balancer itself, identical on the HAProxy and Envoy
  paths. They follow llama.cpp's own error shape (``{"error": {"code", "type", "message"}}``),
  so clients that parse llama.cpp errors parse these too. Both 503s carry ``Retry-After``.
* The names of the settings the generated configs hand to the Lua bridges. Each keeps the
  fleet file's name end to end; the Lua side refuses to load without them.
* The address rule for clients: a service listening on every address is reached on loopback.
"""

from __future__ import annotations

import json

from fleet.schema import Address

RETRY_AFTER_SECONDS = 1


def _error(code: int, kind: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "type": kind, "message": message}}, separators=(",", ":"))


BUFFER_FULL = _error(503, "buffer_full", "all llama.cpp slots are busy and the request buffer is full")
BUFFER_TIMEOUT = _error(503, "buffer_timeout", "no llama.cpp slot became free within buffered_request_timeout")
SLOTS_FORBIDDEN = _error(403, "forbidden", "/slots is not exposed through the balancer")
ADMIN_FORBIDDEN = _error(403, "forbidden", "admin endpoints are not exposed through the balancer")

# HAProxy: `setenv` lines in the global section, read by configs/haproxy/paddler.lua at load.
HAPROXY_LUA_ENV = {
    "backend": "PADDLER_BACKEND",
    "max_buffered_requests": "PADDLER_MAX_BUFFERED_REQUESTS",
    "buffered_request_timeout_ms": "PADDLER_BUFFERED_REQUEST_TIMEOUT_MS",
}

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def client_address(listen: Address) -> Address:
    """Where a co-located client reaches a service that listens on ``listen``.

    A wildcard address is not a destination: 0.0.0.0 is reached on 127.0.0.1, and :: on ::1
    (the same family, so it works whether or not the socket also accepts IPv4).
    """
    host = _WILDCARDS.get(listen.host)
    return listen if host is None else Address(host, listen.port)
