"""The fleet file: which llama.cpp servers exist and how the agent and balancer treat them.

One schema for the agent and the generator, so both reject the same mistakes with the
same words. Every error names the file, the key path and the problem, because the
operator reading it is usually looking at a 200-line YAML file during an incident.

Names end up inside generated HAProxy/Envoy configs and in agent-check replies, so they
are restricted to a charset that cannot break a config line or a protocol line.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_HOSTNAME_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_PATTERN = re.compile(rf"{_HOSTNAME_LABEL}(\.{_HOSTNAME_LABEL})*")
_IPV6_TEXT_PATTERN = re.compile(r"[0-9A-Fa-f:.]+")
_PORT_PATTERN = re.compile(r"[0-9]{1,5}")
_METRIC_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_SOCKET_PATH_PATTERN = re.compile(r"/[A-Za-z0-9_./-]{1,200}")
_ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DURATION_PATTERN = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


class FleetError(ValueError):
    """A fleet file (or equivalent command-line input) is invalid."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: {key}: {problem}")


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_duration(value: Any) -> float:
    """Seconds from ``500ms``, ``10s``, ``2m`` (or a bare number of seconds)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 500ms, 10s or 2m")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_PATTERN.fullmatch(value.strip())):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"expected a duration like 500ms, 10s or 2m, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be positive and finite, got {value!r}")
    return seconds


def parse_address(value: Any) -> Address:
    """``host:port`` or ``[v6]:port``; hosts are IPs or DNS names, nothing that could break a config line."""
    if not isinstance(value, str):
        raise ValueError(f"expected host:port, got {value!r}")
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [ipv6]:port, got {value!r}")
        if not _IPV6_TEXT_PATTERN.fullmatch(host):  # also refuses %zone suffixes, which may hold anything
            raise ValueError(f"{host!r} is not an IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port, got {value!r}")
        if not _HOSTNAME_PATTERN.fullmatch(host):
            raise ValueError(f"{host!r} is not a valid host name or IPv4 address")
    if not _PORT_PATTERN.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1-65535, got {port_text!r}")
    return Address(host, int(port_text))


def validate_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError(
            f"{value!r} is not allowed: use 1-63 characters from A-Z a-z 0-9 _ . - , starting with a letter or digit"
        )
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {value!r}")
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


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
        raise ValueError(f"expected an environment variable name, got {value!r}")
    return value


def _metric_prefix(value: Any) -> str:
    if not isinstance(value, str) or not _METRIC_PREFIX_PATTERN.fullmatch(value):
        raise ValueError(f"expected a StatsD prefix like paddler or prod.llm, got {value!r}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _socket_path(value: Any) -> str:
    """An absolute path that can sit unquoted on a haproxy.cfg line."""
    if not isinstance(value, str) or not _SOCKET_PATH_PATTERN.fullmatch(value):
        raise ValueError(f"expected an absolute path of A-Z a-z 0-9 _ . - / characters, got {value!r}")
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
    slots: int | None = key(_positive_int, None)

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
    interval: float = key(parse_duration, 1.0)
    # Operator endpoints (drain/ready) need this bearer token; with neither set they are disabled.
    operator_token: str | None = key(_secret, None)
    operator_token_env: str | None = key(_env_name, None)
    picker_token_env: str | None = key(_env_name, None)

    exclusive: ClassVar[tuple[tuple[str, str], ...]] = (("operator_token", "operator_token_env"),)

    def resolve_operator_token(self, environ: Mapping[str, str] = os.environ) -> str | None:
        if self.operator_token_env is None:
            return self.operator_token
        return environ.get(self.operator_token_env) or None


@dataclass(frozen=True)
class StatsdConfig:
    address: Address = key(parse_address)
    prefix: str = key(_metric_prefix, "paddler")
    interval: float = key(parse_duration, 1.0)

    exclusive: ClassVar[tuple[tuple[str, str], ...]] = ()


@dataclass(frozen=True)
class BalancerConfig:
    listen: Address = key(parse_address, Address("127.0.0.1", 8000))
    max_buffered_requests: int = key(_positive_int, 30)
    buffered_request_timeout: float = key(parse_duration, 10.0)
    # Inactivity limit on both sides of a request; bounds the worst time to first token.
    idle_timeout: float = key(parse_duration, 300.0)
    # /slots shows prompts; admin endpoints (/metrics, POST /props, POST /lora-adapters) change or
    # reveal server state. Neither is reachable through the balancer unless turned on.
    expose_slots: bool = key(_boolean, False)
    expose_admin: bool = key(_boolean, False)
    stats_socket: str | None = key(_socket_path, None)
    # Where HAProxy serves its own Prometheus exporter; None renders no such frontend.
    metrics_listen: Address | None = key(parse_address, None)

    exclusive: ClassVar[tuple[tuple[str, str], ...]] = ()


@dataclass(frozen=True)
class Fleet:
    backends: tuple[Backend, ...]
    standby: tuple[Backend, ...] = ()
    agent: AgentConfig = field(default_factory=AgentConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    statsd: StatsdConfig | None = None
    source: str = "<fleet>"

    def all_backends(self) -> tuple[Backend, ...]:
        return self.backends + self.standby


DEFAULT_FLEET_YAML = """\
# Embedded default: one llama-server on its own default address.
backends:
  - name: llama1
    address: 127.0.0.1:8080
"""

_TOP_LEVEL = ("backends", "standby", "agent", "balancer", "statsd")


def default_fleet() -> Fleet:
    return parse_fleet(yaml.safe_load(DEFAULT_FLEET_YAML), source="<embedded default>")


def load_fleet(path: str | Path) -> Fleet:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise FleetError(source, "(file)", f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise FleetError(source, "(file)", "not UTF-8 text") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _refuse_duplicate_keys(source, node, "")
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise FleetError(source, "(yaml)", f"not valid YAML{where}: {problem}") from None
    return parse_fleet(data, source=source)


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
    return Fleet(
        backends=tuple(backends),
        standby=tuple(standby),
        agent=_read_section(source, AgentConfig, top.get("agent", {}), "agent"),
        balancer=_read_section(source, BalancerConfig, top.get("balancer", {}), "balancer"),
        statsd=_read_section(source, StatsdConfig, top["statsd"], "statsd") if "statsd" in top else None,
        source=source,
    )


_Section = TypeVar("_Section", Backend, AgentConfig, StatsdConfig, BalancerConfig)


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
        return f"the string {value!r}"
    return repr(value)


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
