"""``paddler-agent register``: runs beside a llama-server and keeps it registered with a running agent.

Every heartbeat it sends the registration again (``PUT /api/v1/backends/{name}``), which is both the
heartbeat and, after the agent restarted and forgot it, the registration itself: the backend is back
within one heartbeat. On SIGTERM or Ctrl-C it deregisters (the backend leaves once its running requests
are over) and exits. Like Paddler's agents, it needs nothing but the agent's management address and token.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from types import FrameType

from agentcheck.top import agent_url
from fleet import AgentConfig, duration, parse_address, validate_model_name, validate_name, whole_number

PROG = "paddler-agent register"
DEFAULT_TOKEN_ENV = "PADDLER_OPERATOR_TOKEN"
parse_heartbeat = duration(0.1, 3600)
parse_slots = whole_number(1, 1024)
REQUEST_TIMEOUT = 5.0
log = logging.getLogger("paddler.register")


class Next(enum.Enum):
    KEEP = "keep"  # registered, or worth trying again at the next heartbeat
    GIVE_UP = "give up"  # the agent refuses this registration as such: retrying cannot help


def after_answer(status: int) -> Next:
    """What a registration's HTTP status means for the loop. A 409 can clear by itself (the maximum, a
    name whose old registration is still leaving), and so can 5xx or no answer: retried. A refused body or
    token (400, 401, 403, 413), or a URL that is not an agent's (404, 405), cannot."""
    return Next.GIVE_UP if status in (400, 401, 403, 404, 405, 413) else Next.KEEP


class Registration:
    def __init__(self, url: str, name: str, body: dict[str, object], token: str) -> None:
        self._url = f"{url}/api/v1/backends/{name}"
        self._body = json.dumps(body).encode()
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def send(self) -> tuple[int, str]:
        return self._request("PUT", self._body)

    def withdraw(self) -> tuple[int, str]:
        return self._request("DELETE", None)

    def _request(self, method: str, body: bytes | None) -> tuple[int, str]:
        """(HTTP status, the agent's message); status 0 when the agent could not be reached."""
        request = urllib.request.Request(self._url, data=body, method=method, headers=self._headers)
        try:
            with self._opener.open(request, timeout=REQUEST_TIMEOUT) as response:
                return response.status, ""
        except urllib.error.HTTPError as exc:
            return exc.code, _message(exc.read(4096))
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return 0, f"cannot reach the agent: {getattr(reason, 'strerror', None) or reason}"


def _message(body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, TypeError, KeyError):
        return body[:200].decode("utf-8", "replace")
    return str(message)


def run(registration: Registration, heartbeat: float, stop: threading.Event,
        on_state: Callable[[str], None] = log.info) -> int:
    """Heartbeat until ``stop``, then deregister. Logs each change of state once, not every beat."""
    said = ""
    while not stop.is_set():
        status, message = registration.send()
        state = {201: "registered", 200: "registered"}.get(status, f"HTTP {status}: {message}" if status
                                                            else message)
        if state != said:
            on_state(state if status != 201 or not said else "registered again (the agent had forgotten it)")
            said = state
        if after_answer(status) is Next.GIVE_UP:
            return 2
        stop.wait(heartbeat)
    status, message = registration.withdraw()
    on_state("deregistered: it leaves once its running requests are over" if status == 202
             else f"could not deregister (HTTP {status}: {message}); it leaves when its heartbeat times out")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Register a llama-server with a running paddler-agent "
                                     "and keep it registered; deregister on SIGTERM or Ctrl-C.")
    parser.add_argument("--agent", metavar="URL", default=f"http://{AgentConfig().management}",
                        help="the agent's management address (default %(default)s)")
    parser.add_argument("--name", required=True, help="the backend's name in the fleet")
    parser.add_argument("--address", required=True, metavar="HOST:PORT", help="where the llama-server listens")
    parser.add_argument("--slots", help="its slot count, if known (the agent reads it from the server anyway)")
    parser.add_argument("--model", action="append", dest="models", metavar="NAME",
                        help="a model it serves, repeatable (default: what the agent discovers from the server)")
    parser.add_argument("--heartbeat", metavar="DURATION", default="2s",
                        help="how often to register again, shorter than the agent's registration_timeout "
                             "(default %(default)s)")
    parser.add_argument("--token-env", default=DEFAULT_TOKEN_ENV, metavar="VAR",
                        help="environment variable holding the agent's operator token (default %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    body: dict[str, object] = {}
    try:
        url = agent_url(args.agent)
        name = validate_name(args.name)
        body["address"] = str(parse_address(args.address))
        if args.slots is not None:
            body["slots"] = parse_slots(args.slots)
        if args.models:
            body["models"] = [validate_model_name(model) for model in args.models]
        heartbeat = parse_heartbeat(args.heartbeat)
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    token = os.environ.get(args.token_env, "")
    if not token:
        print(f"{PROG}: environment variable {args.token_env} (the agent's operator token) is not set",
              file=sys.stderr)
        return 2
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return run(Registration(url, name, body, token), heartbeat, stop,
               on_state=lambda state: log.info("%s (%s at %s): %s", name, body["address"], url, state))
