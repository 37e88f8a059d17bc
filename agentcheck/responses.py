"""The JSON bodies clients get from the balancer itself, identical on the HAProxy and Envoy paths.

They follow llama.cpp's own error shape ({"error": {"code", "type", "message"}}), so clients
that parse llama.cpp errors parse these too. Both bodies for 503 carry ``Retry-After: 1``.
"""

from __future__ import annotations

import json

RETRY_AFTER_SECONDS = 1


def _error(code: int, kind: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "type": kind, "message": message}}, separators=(",", ":"))


BUFFER_FULL = _error(503, "buffer_full", "all llama.cpp slots are busy and the request buffer is full")
BUFFER_TIMEOUT = _error(503, "buffer_timeout", "no llama.cpp slot became free within buffered_request_timeout")
SLOTS_FORBIDDEN = _error(403, "forbidden", "/slots is not exposed through the balancer")
ADMIN_FORBIDDEN = _error(403, "forbidden", "admin endpoints are not exposed through the balancer")
