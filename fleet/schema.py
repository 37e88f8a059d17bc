"""The fleet file: which llama.cpp servers exist and how the agent and balancer treat them.

One schema for the agent and the generator, so both reject the same mistakes with the
same words. Every error names the file, the key path and the problem, because the
operator reading it is usually looking at a 200-line YAML file during an incident.

Names end up inside generated HAProxy/Envoy configs and in agent-check replies, so they
are restricted to a charset that cannot break a config line or a protocol line. Every number
has a range (in the table below, next to its key), and the file itself is bounded: at most
``MAX_FILE_BYTES``, nested at most ``MAX_DEPTH`` levels, and no anchors or aliases, so no
file, however crafted, makes the loader spin or overflow its stack.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# A model name reaches HAProxy backend names (`llama.<model>`), setenv lines and Envoy's metadata: the
# characters HAProxy allows in a proxy name. llama.cpp's own names (aliases, router-mode file names) fit.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_HOSTNAME_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_PATTERN = re.compile(rf"{_HOSTNAME_LABEL}(\.{_HOSTNAME_LABEL})*")
_IPV6_TEXT_PATTERN = re.compile(r"[0-9A-Fa-f:.]+")
_PORT_PATTERN = re.compile(r"[0-9]{1,5}")
_METRIC_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_SOCKET_PATH_PATTERN = re.compile(r"/[A-Za-z0-9_./-]{1,200}")
_ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DURATION_PATTERN = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_IPV4_TEXT_PATTERN = re.compile(r"[0-9.]+")
MAX_HOSTNAME_LENGTH = 253  # RFC 1035's limit on a name's text form
# A fleet file of 1,000 backends is about 50 KB. The pure-Python YAML parser (the one whose
# composer can be bounded, below) takes ~15 us per character of dense YAML such as "[1,1,1,...":
# 20 s for 1 MiB on a busy machine, 2 s for this limit, which still holds 2,500 backends.
MAX_FILE_BYTES = 128 * 1024
# A valid fleet is 3 levels deep (top, backends list, backend); 64 leaves room for any mistake
# worth a precise error while keeping the recursive composer far from Python's recursion limit.
MAX_DEPTH = 64
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
# HAProxy's pool of servers that registered backends fill at run time (balancer.spare_servers) is
# named with this prefix, so no backend's own name may start with it.
SPARE_SERVER_PREFIX = "paddler-spare-"


class FleetError(ValueError):
    """A fleet file (or equivalent command-line input) is invalid.

    Printed as one line, ``file: key.path: problem``: any character that is not printable (a
    line break inside a YAML key, say) is shown escaped, so nothing can split or forge a line.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = _one_line(source)
        self.key = _one_line(key)
        self.problem = _one_line(problem)
        super().__init__(f"{self.source}: {self.key}: {self.problem}")


def _one_line(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _show(value: Any, limit: int = 200) -> str:
    """``repr`` for an error message, cut short: a value may be a megabyte of text or digits."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        try:
            return f"a number of {len(str(abs(value)))} digits"
        except ValueError:  # past Python's int-to-str limit (sys.get_int_max_str_digits)
            return "a number of thousands of digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 5]}...{text[-1]}"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _seconds(value: Any) -> float | None:
    """Seconds from ``500ms``, ``10s``, ``2m``, ``1h`` or a bare number; None if it is none of those."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an int past 1e308
            return math.inf
    if isinstance(value, str) and (match := _DURATION_PATTERN.fullmatch(value.strip())):
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return None


def parse_duration(value: Any) -> float:
    """Seconds from ``500ms``, ``10s``, ``2m`` (or a bare number of seconds)."""
    seconds = _seconds(value)
    if seconds is None:
        raise ValueError(f"expected a duration like 500ms, 10s or 2m, got {_show(value)}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be positive and finite, got {_show(value)}")
    return seconds


def _duration_text(seconds: float) -> str:
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms"


def duration(low: float, high: float) -> Callable[[Any], float]:
    """A duration key's parse: the syntax of ``parse_duration``, and ``low <= seconds <= high``."""
    if not 0 < low <= high:
        raise ValueError(f"bad range {low}-{high}")
    bounds = f"{_duration_text(low)}-{_duration_text(high)}"

    def parse(value: Any) -> float:
        seconds = _seconds(value)
        if seconds is None:
            raise ValueError(f"expected a duration of {bounds} like 500ms, 10s or 2m, got {_show(value)}")
        if not low <= seconds <= high:  # also refuses nan
            raise ValueError(f"must be {bounds}, got {value.strip() if isinstance(value, str) else _show(value)}")
        return seconds

    return parse


def whole_number(low: int, high: int) -> Callable[[Any], int]:
    """A count key's parse: an integer (not a float, not a boolean) with ``low <= value <= high``."""
    if not low <= high:
        raise ValueError(f"bad range {low}-{high}")

    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number {low}-{high}, got {_show(value)}")
        if not low <= value <= high:
            raise ValueError(f"must be {low}-{high}, got {_show(value)}")
        return value

    return parse


def parse_address(value: Any) -> Address:
    """``host:port`` or ``[v6]:port``; hosts are IPs or DNS names, nothing that could break a config line."""
    if not isinstance(value, str):
        raise ValueError(f"expected host:port, got {_show(value)}")
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [ipv6]:port, got {_show(value)}")
        if not _IPV6_TEXT_PATTERN.fullmatch(host):  # also refuses %zone suffixes, which may hold anything
            raise ValueError(f"{_show(host)} is not an IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_show(host)} is not an IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port, got {_show(value)}")
        if _IPV4_TEXT_PATTERN.fullmatch(host):
            # All digits and dots is never a DNS name to a proxy: it must be a dotted quad.
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{_show(host)} is not an IPv4 address (four numbers 0-255, "
                                 "no leading zeros)") from None
        elif len(host) > MAX_HOSTNAME_LENGTH:
            raise ValueError(f"host name is {len(host)} characters long, at most {MAX_HOSTNAME_LENGTH} are allowed")
        elif not _HOSTNAME_PATTERN.fullmatch(host):
            raise ValueError(f"{_show(host)} is not a valid host name or IPv4 address")
    if not _PORT_PATTERN.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1-65535, got {_show(port_text)}")
    return Address(host, int(port_text))


def validate_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError(
            f"{_show(value)} is not allowed: "
            "use 1-63 characters from A-Z a-z 0-9 _ . - , starting with a letter or digit"
        )
    if value.startswith(SPARE_SERVER_PREFIX):
        raise ValueError(f"{_show(value)} is not allowed: names starting with {SPARE_SERVER_PREFIX!r} are "
                         "HAProxy's spare servers")
    return value


def validate_model_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a model name, got {_kind(value)}")
    if not MODEL_NAME_PATTERN.fullmatch(value):
        raise ValueError(f"{_show(value)} is not allowed as a model name: use 1-128 characters from "
                         "A-Z a-z 0-9 _ . : - , starting with a letter or digit")
    return value


def _model_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a list of at least one model name, got {_kind(value)}")
    if len(value) > MAX_MODELS:
        raise ValueError(f"at most {MAX_MODELS} models, got {len(value)}")
    names = tuple(validate_model_name(item) for item in value)
    if len(set(names)) != len(names):
        raise ValueError(f"lists a model twice: {_show(sorted(name for name in set(names) if names.count(name) > 1))}")
    return names


def _secret(value: Any) -> str:
    if not isinstance(value, str) or len(value) < 16 or not value.isprintable() or " " in value:
        raise ValueError("expected a single-word token of at least 16 characters")
    return value


def _api_key(value: Any) -> str:
    if not isinstance(value, str) or not value or not value.isprintable():
        raise ValueError("expected a non-empty single-line string")
    return value


def _env_name(value: Any) -> str:
    if not isinstance(value, str) or not _ENV_NAME_PATTERN.fullmatch(value):
        raise ValueError(f"expected an environment variable name, got {_show(value)}")
    return value


def _metric_prefix(value: Any) -> str:
    if not isinstance(value, str) or not _METRIC_PREFIX_PATTERN.fullmatch(value):
        raise ValueError(f"expected a StatsD prefix like paddler or prod.llm, got {_show(value)}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _socket_path(value: Any) -> str:
    """An absolute path that can sit unquoted on a haproxy.cfg line."""
    if not isinstance(value, str) or not _SOCKET_PATH_PATTERN.fullmatch(value):
        raise ValueError(f"expected an absolute path of A-Z a-z 0-9 _ . - / characters, got {_show(value)}")
    return value


def key(parse: Callable[[Any], Any], default: Any = MISSING) -> Any:
    """One key of a fleet section: how its value is checked, and its default (none: required).

    The dataclasses below are the schema: a section's keys are its fields, in this form, so a new
    key is one line, and the reader (``_read_section``) needs no change.
    """
    return field(default=default, metadata={"parse": parse})


@dataclass(frozen=True)
class Backend:
    """One llama.cpp server (or a downstream balancer that answers like one)."""

    name: str = key(validate_name)
    address: Address = key(parse_address)
    api_key: str | None = key(_api_key, None)
    api_key_env: str | None = key(_env_name, None)
    # llama-server's --parallel; HAProxy uses it as the server's maxconn, which it takes modulo
    # 2^32 (0 meaning unlimited), so it is bounded well below that. 1024 is far above any GPU's.
    slots: int | None = key(whole_number(1, 1024), None)
    # The models this server serves, overriding what the agent discovers (/v1/models, router mode's /models).
    models: tuple[str, ...] | None = key(_model_names, None)

    exclusive: ClassVar[tuple[tuple[str, str], ...]] = (("api_key", "api_key_env"),)

    def resolve_api_key(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The bearer token to send, read from the environment at start-up when so configured."""
        if self.api_key_env is None:
            return self.api_key
        return environ.get(self.api_key_env)


@dataclass(frozen=True)
class AgentConfig:
    listen: Address = key(parse_address, Address("127.0.0.1", 5555))
    management: Address = key(parse_address, Address("127.0.0.1", 8085))
    # Each interval the agent polls every backend's /slots and HAProxy sends an agent-check:
    # under 50ms that load is felt by llama-server; over 60s a dead server goes unnoticed too long.
    interval: float = key(duration(0.05, 60), 1.0)
    # Operator endpoints (drain/ready) need this bearer token; with neither set they are disabled.
    operator_token: str | None = key(_secret, None)
    operator_token_env: str | None = key(_env_name, None)
    picker_token_env: str | None = key(_env_name, None)
    # Backends registered at run time (POST/PUT /api/v1/backends, `paddler-agent register`): at most
    # this many, each leaving gracefully when no heartbeat came for registration_timeout.
    max_registered_backends: int = key(whole_number(0, 1024), 16)
    registration_timeout: float = key(duration(1, 3600), 10.0)

    exclusive: ClassVar[tuple[tuple[str, str], ...]] = (("operator_token", "operator_token_env"),)

    def resolve_operator_token(self, environ: Mapping[str, str] = os.environ) -> str | None:
        if self.operator_token_env is None:
            return self.operator_token
        return environ.get(self.operator_token_env) or None


@dataclass(frozen=True)
class StatsdConfig:
    address: Address = key(parse_address)
    prefix: str = key(_metric_prefix, "paddler")
    # Gauges are sent every interval: under 100ms is a UDP flood, over 10m no graph shows anything.
    interval: float = key(duration(0.1, 600), 1.0)

    exclusive: ClassVar[tuple[tuple[str, str], ...]] = ()


@dataclass(frozen=True)
class BalancerConfig:
    listen: Address = key(parse_address, Address("127.0.0.1", 8000))
    # Requests held while every slot is busy (HAProxy's queue, paddler.lua's counter in Envoy);
    # each one is an open client connection, and 100,000 is already past a proxy's fd budget.
    max_buffered_requests: int = key(whole_number(1, 100_000), 30)
    # HAProxy timers are milliseconds up to 2^31-1 (24.8 days) and Envoy's are protobuf durations;
    # both are bounded at 24h, which no client waits. A wait shorter than 100ms is shorter than
    # a poll, so it could never see a slot free; an idle limit under 1s cuts off a prompt still
    # being processed.
    buffered_request_timeout: float = key(duration(0.1, 86400), 10.0)
    # Inactivity limit on both sides of a request; bounds the worst time to first token.
    idle_timeout: float = key(duration(1, 86400), 300.0)
    # /slots shows prompts; admin endpoints (/metrics, POST /props, POST /lora-adapters) change or
    # reveal server state. Neither is reachable through the balancer unless turned on.
    expose_slots: bool = key(_boolean, False)
    expose_admin: bool = key(_boolean, False)
    stats_socket: str | None = key(_socket_path, None)
    # Where HAProxy serves its own Prometheus exporter; None renders no such frontend.
    metrics_listen: Address | None = key(parse_address, None)
    # Disabled `server` lines rendered for backends that register at run time, filled through the
    # runtime API (stats_socket) without a reload; each is a line in HAProxy's stats.
    spare_servers: int = key(whole_number(0, 256), 8)
    # With model-aware routing the balancer reads each request's body to find its model: a larger body gets
    # 413. HAProxy holds the whole body in one buffer (tune.bufsize is sized from this); Envoy buffers it.
    max_request_body: int = key(whole_number(16 * 1024, 16 * 1024 * 1024), 1024 * 1024)
    # Prompt-cache affinity (docs/affinity.md): a conversation's next turn goes to the server that served
    # the last one while that server has a slot free.
    affinity: bool = key(_boolean, False)
    # With affinity: how long a conversation's next turn waits for that server while another has a slot free,
    # instead of re-reading its history there (docs/affinity.md, "Waiting for the conversation's server").
    # Unset: it never waits. Worth it where prompt processing is slow against decoding (CPU, Apple silicon).
    affinity_wait: float | None = key(duration(0.01, 60), None)
    # Envoy only: requests its least_request fallback sends one llama-server at a time while the agent is away
    # (docs/envoy.md, "When the agent is down"). Unset: the fewest slots in the fleet, so no server is ever
    # overfilled. Higher serves more of an uneven fleet's slots, and llama.cpp then queues on smaller servers.
    envoy_fallback_per_server: int | None = key(whole_number(1, 1024), None)

    exclusive: ClassVar[tuple[tuple[str, str], ...]] = ()


@dataclass(frozen=True)
class ModelLimits:
    """One model's own request buffer (``models.<name>``); unset keys take the balancer's."""

    max_buffered_requests: int | None = key(whole_number(1, 100_000), None)
    buffered_request_timeout: float | None = key(duration(0.1, 86400), None)

    exclusive: ClassVar[tuple[tuple[str, str], ...]] = ()


@dataclass(frozen=True)
class Fleet:
    backends: tuple[Backend, ...]
    standby: tuple[Backend, ...] = ()
    agent: AgentConfig = field(default_factory=AgentConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    statsd: StatsdConfig | None = None
    source: str = "<fleet>"
    # Model-aware routing (docs/models.md): per-model limits, and the model of a request that names none.
    models: Mapping[str, ModelLimits] = field(default_factory=dict)
    default_model: str | None = None

    def all_backends(self) -> tuple[Backend, ...]:
        return self.backends + self.standby

    def model_names(self) -> tuple[str, ...]:
        """Every model the balancer routes, in the order the file first names them: ``models:`` keys,
        then each backend's ``models:``, then ``default_model``. Empty: a one-model fleet, routed as before."""
        names = dict.fromkeys(self.models)
        for backend in self.all_backends():
            names.update(dict.fromkeys(backend.models or ()))
        if self.default_model is not None:
            names[self.default_model] = None
        return tuple(names)

    def routes_by_model(self) -> bool:
        return bool(self.model_names())

    def request_default_model(self) -> str | None:
        """Where a request that names no model goes: ``default_model``, or the fleet's only model."""
        names = self.model_names()
        return self.default_model or (names[0] if len(names) == 1 else None)

    def limits(self, model: str) -> tuple[int, float]:
        """(max_buffered_requests, buffered_request_timeout) of one model's queue."""
        own = self.models.get(model, ModelLimits())
        return (own.max_buffered_requests or self.balancer.max_buffered_requests,
                own.buffered_request_timeout or self.balancer.buffered_request_timeout)


DEFAULT_FLEET_YAML = """\
# Embedded default: one llama-server on its own default address.
backends:
  - name: llama1
    address: 127.0.0.1:8080
"""

_TOP_LEVEL = ("backends", "standby", "agent", "balancer", "statsd", "models", "default_model")
# One HAProxy backend (a queue) per model: a bound on the generated config's size.
MAX_MODELS = 64


def default_fleet() -> Fleet:
    return parse_fleet(_load_yaml("<embedded default>", DEFAULT_FLEET_YAML), source="<embedded default>")


def load_fleet(path: str | Path) -> Fleet:
    source = str(path)
    try:
        with Path(path).open("rb") as file:  # one bounded read: the path may be /dev/zero or a FIFO
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise FleetError(source, "(file)", f"cannot read: {exc.strerror or exc}") from exc
    if len(raw) > MAX_FILE_BYTES:
        raise FleetError(source, "(file)", f"larger than {MAX_FILE_BYTES // 1024} KiB; "
                                           "a fleet file is a few kilobytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FleetError(source, "(file)", "not UTF-8 text") from exc
    return parse_fleet(_load_yaml(source, text), source=source)


class _Refused(Exception):
    def __init__(self, event: yaml.Event, problem: str) -> None:
        super().__init__(problem)
        self.line = event.start_mark.line + 1 if event.start_mark is not None else None
        self.problem = problem


class _FleetLoader(yaml.SafeLoader):
    """PyYAML's safe loader, minus what a fleet file never needs and an attacker would: anchors
    and aliases (a 500-byte "billion laughs" file expands to a billion nodes, a recursive one to
    a cycle), explicit tags, and unbounded nesting (the composer recurses once per level)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self.check_event()  # parses the next event into current_event, as compose_node will read it
        event: yaml.Event = self.current_event
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(event, "anchors and aliases are not allowed in a fleet file")
        if (tag := getattr(event, "tag", None)) is not None:
            # !!int '' or !!timestamp x would reach constructors that fail with any exception at all.
            tag = str(tag).replace("tag:yaml.org,2002:", "!!", 1)
            tag = tag if len(tag) <= 40 else f"{tag[:37]}..."
            raise _Refused(event, f"tags such as {tag} are not allowed in a fleet file (quote the value)")
        if not isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise _Refused(event, f"nested deeper than {MAX_DEPTH} levels")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _load_yaml(source: str, text: str) -> Any:
    """The YAML document in ``text``, or a one-line FleetError: never another exception."""
    try:
        loader = _FleetLoader(text)  # checks every character at once: a ReaderError
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _refuse_duplicate_keys(source, node, "")  # a FleetError, which the handlers below let through
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except FleetError:
        raise
    except _Refused as exc:
        where = f"line {exc.line}: " if exc.line is not None else ""
        raise FleetError(source, "(yaml)", f"{where}{exc.problem}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "cannot be parsed"
        raise FleetError(source, "(yaml)", f"not valid YAML{where}: {problem}") from None
    except yaml.reader.ReaderError as exc:
        raise FleetError(source, "(yaml)", f"not valid YAML at character {exc.position + 1}: {exc.reason}") from None
    except yaml.YAMLError as exc:
        raise FleetError(source, "(yaml)", f"not valid YAML: {exc}") from None
    except ValueError as exc:
        # A scalar YAML resolved but Python would not build: an integer of more than 4,300 digits,
        # a timestamp on the 13th month.
        raise FleetError(source, "(yaml)", f"a value cannot be read: {str(exc).partition(';')[0]}") from None


def parse_fleet(data: Any, source: str = "<fleet>") -> Fleet:
    """Validate already-decoded YAML data into a Fleet."""
    top = _mapping(source, data, "(top level)", allowed=_TOP_LEVEL)
    backends = _backend_list(source, top.get("backends"), "backends", required=True)
    standby = _backend_list(source, top.get("standby", []), "standby", required=False)
    seen: dict[str, str] = {}
    for group, items in (("backends", backends), ("standby", standby)):
        for index, backend in enumerate(items):
            name_key = f"{group}[{index}].name"
            if backend.name in seen:
                raise FleetError(source, name_key,
                                 f"duplicate name {backend.name!r} (first used at {seen[backend.name]})")
            seen[backend.name] = name_key
    fleet = Fleet(
        backends=tuple(backends),
        standby=tuple(standby),
        agent=_read_section(source, AgentConfig, top.get("agent", {}), "agent"),
        balancer=_read_section(source, BalancerConfig, top.get("balancer", {}), "balancer"),
        statsd=_read_section(source, StatsdConfig, top["statsd"], "statsd") if "statsd" in top else None,
        source=source,
        models=_model_limits(source, top.get("models", {})),
        default_model=_default_model(source, top.get("default_model")),
    )
    _refuse_shared_addresses(fleet)
    if fleet.balancer.affinity_wait is not None:
        if not fleet.balancer.affinity:
            raise FleetError(source, "balancer.affinity_wait", "needs balancer.affinity: true")
        shortest = min([fleet.balancer.buffered_request_timeout, *(fleet.limits(name)[1]
                                                                   for name in fleet.model_names())])
        if fleet.balancer.affinity_wait >= shortest:
            raise FleetError(source, "balancer.affinity_wait",
                             f"must be shorter than buffered_request_timeout ({_duration_text(shortest)}: the "
                             "longest any request waits)")
    if len(fleet.model_names()) > MAX_MODELS:
        raise FleetError(source, "models", f"at most {MAX_MODELS} models in a fleet, got {len(fleet.model_names())}")
    return fleet


def _model_limits(source: str, value: Any) -> dict[str, ModelLimits]:
    if not isinstance(value, dict):
        raise FleetError(source, "models", f"expected a mapping of model name to limits, got {_kind(value)}")
    limits = {}
    for name, section in value.items():
        try:
            validate_model_name(name)
        except ValueError as exc:
            raise FleetError(source, f"models.{name}", str(exc)) from None
        limits[name] = _read_section(source, ModelLimits, {} if section is None else section, f"models.{name}")
    return limits


def _default_model(source: str, value: Any) -> str | None:
    if value is None:
        return None
    try:
        return validate_model_name(value)
    except ValueError as exc:
        raise FleetError(source, "default_model", str(exc)) from None


def override_agent(fleet: Fleet, overrides: Mapping[str, tuple[str, str]]) -> Fleet:
    """The fleet with ``agent`` keys replaced from the command line (key -> (flag, text)), each
    checked by its key's own parse and the fleet's address rules, so a flag is no way around them."""
    if not overrides:
        return fleet
    parses = {item.name: item.metadata["parse"] for item in fields(AgentConfig) if "parse" in item.metadata}
    values = {}
    for name, (flag, text) in overrides.items():
        try:
            values[name] = parses[name](text)
        except ValueError as exc:
            raise FleetError("command line", flag, str(exc)) from None
    flags = ", ".join(flag for flag, _ in overrides.values())
    overridden = replace(fleet, agent=replace(fleet.agent, **values), source=f"{fleet.source} with {flags}")
    _refuse_shared_addresses(overridden)
    return overridden


def socket_key(address: Address) -> tuple[str, int]:
    """What two addresses must share to be one socket: the host as the resolver sees it (DNS names
    are case-blind, IPv6 has many spellings) and the port."""
    try:
        return ipaddress.ip_address(address.host).compressed, address.port
    except ValueError:
        return address.host.lower(), address.port


def _refuse_shared_addresses(fleet: Fleet) -> None:
    """One server listed twice would get twice its slots' worth of requests; two of our own
    listeners on one socket cannot both start, and a backend on one of them would loop."""
    listeners = [(f"{section}.{name}", address) for section, name, address in (
        ("agent", "listen", fleet.agent.listen),
        ("agent", "management", fleet.agent.management),
        ("balancer", "listen", fleet.balancer.listen),
        ("balancer", "metrics_listen", fleet.balancer.metrics_listen),
    ) if address is not None]
    taken: dict[tuple[str, int], str] = {}
    for index, (path, address) in enumerate(listeners):
        for earlier_path, earlier in listeners[:index]:
            if socket_key(address) == socket_key(earlier):
                raise FleetError(fleet.source, path, f"{address} is already {earlier_path}")
            wildcard = next((host for host in (address.host, earlier.host) if host in _WILDCARD_HOSTS), None)
            if address.port == earlier.port and wildcard is not None:
                raise FleetError(fleet.source, path,
                                 f"{address} collides with {earlier_path} {earlier}: {wildcard} listens on "
                                 f"every address, so port {address.port} can be bound only once")
        taken[socket_key(address)] = path
    for group, items in (("backends", fleet.backends), ("standby", fleet.standby)):
        for index, backend in enumerate(items):
            path = f"{group}[{index}].address"
            if (first := taken.get(socket_key(backend.address))) is not None:
                raise FleetError(fleet.source, path, f"{backend.address} is already {first}")
            taken[socket_key(backend.address)] = path


_Section = TypeVar("_Section", Backend, AgentConfig, StatsdConfig, BalancerConfig, ModelLimits)


def _read_section(source: str, section: type[_Section], value: Any, path: str) -> _Section:
    """Check one mapping against a section's fields: unknown and missing keys, each value's parse,
    and pairs of keys that exclude each other. Every problem names its key path."""
    fields_by_name = {item.name: item for item in fields(section) if "parse" in item.metadata}
    item = _mapping(source, value, path, allowed=tuple(fields_by_name),
                    required=[name for name, spec in fields_by_name.items() if spec.default is MISSING])
    for first, second in section.exclusive:
        if first in item and second in item:
            raise FleetError(source, f"{path}.{first}", f"give either {first} or {second}, not both")
    parsed = {}
    for name, raw in item.items():
        try:
            parsed[name] = fields_by_name[name].metadata["parse"](raw)
        except ValueError as exc:
            raise FleetError(source, f"{path}.{name}", str(exc)) from None
    return section(**parsed)


def _mapping(source: str, value: Any, path: str, allowed: Sequence[str],
             required: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FleetError(source, path, f"expected a mapping, got {_kind(value)}")
    for name in value:
        if name not in allowed:
            raise FleetError(source, f"{path}.{name}" if path != "(top level)" else str(name),
                             f"unknown key (allowed: {', '.join(sorted(allowed))})")
    for name in sorted(required):
        if name not in value:
            raise FleetError(source, f"{path}.{name}", "required key is missing")
    return value


def parse_backend(data: Any, source: str, path: str = "backend") -> Backend:
    """One backend outside a fleet file (a registration): the same keys and checks as a fleet entry."""
    return _read_section(source, Backend, data, path)


def _backend_list(source: str, value: Any, path: str, required: bool) -> list[Backend]:
    if value is None:
        if required:
            raise FleetError(source, path, "required key is missing (list at least one llama.cpp server)")
        return []
    if not isinstance(value, list):
        raise FleetError(source, path, f"expected a list, got {_kind(value)}")
    if required and not value:
        raise FleetError(source, path, "list at least one llama.cpp server")
    return [_read_section(source, Backend, item, f"{path}[{index}]") for index, item in enumerate(value)]


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {_show(value)}"
    return _show(value)


def _refuse_duplicate_keys(source: str, node: yaml.Node, path: str) -> None:
    """PyYAML silently keeps the last of two equal keys; an operator's typo must not vanish like that."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise FleetError(source, path or "(top level)",
                                 f"keys must be plain names (line {key_node.start_mark.line + 1})")
            key_path = f"{path}.{key_node.value}" if path else key_node.value
            if key_node.value in seen:
                raise FleetError(source, key_path, f"duplicate key at line {key_node.start_mark.line + 1}")
            seen.add(key_node.value)
            _refuse_duplicate_keys(source, value_node, key_path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(source, item, f"{path}[{index}]")
