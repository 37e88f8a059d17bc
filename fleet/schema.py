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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_HOSTNAME_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
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


@dataclass(frozen=True)
class Backend:
    """One llama.cpp server (or a downstream balancer that answers like one)."""

    name: str
    address: Address
    api_key: str | None = None
    api_key_env: str | None = None
    slots: int | None = None

    def resolve_api_key(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The bearer token to send, read from the environment at start-up when so configured."""
        if self.api_key_env is None:
            return self.api_key
        return environ.get(self.api_key_env)


@dataclass(frozen=True)
class AgentConfig:
    listen: Address = Address("127.0.0.1", 5555)
    management: Address = Address("127.0.0.1", 8085)
    interval: float = 1.0
    # Operator endpoints (drain/ready) need this bearer token; with neither set they are disabled.
    operator_token: str | None = None
    operator_token_env: str | None = None

    def resolve_operator_token(self, environ: Mapping[str, str] = os.environ) -> str | None:
        if self.operator_token_env is None:
            return self.operator_token
        return environ.get(self.operator_token_env) or None


@dataclass(frozen=True)
class StatsdConfig:
    address: Address
    prefix: str = "paddler"
    interval: float = 1.0


@dataclass(frozen=True)
class BalancerConfig:
    listen: Address = Address("127.0.0.1", 8000)
    max_buffered_requests: int = 30
    buffered_request_timeout: float = 10.0
    # Inactivity limit on both sides of a request; bounds the worst time to first token.
    idle_timeout: float = 300.0
    # /slots shows prompts; admin endpoints (/metrics, POST /props, POST /lora-adapters) change or
    # reveal server state. Neither is reachable through the balancer unless turned on.
    expose_slots: bool = False
    expose_admin: bool = False
    stats_socket: str | None = None
    # Where HAProxy serves its own Prometheus exporter; None renders no such frontend.
    metrics_listen: Address | None = None


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
    reader = _Reader(source)
    top = reader.mapping(data, "(top level)", allowed={"backends", "standby", "agent", "balancer", "statsd"})
    backends = reader.backend_list(top.get("backends"), "backends", required=True)
    standby = reader.backend_list(top.get("standby", []), "standby", required=False)
    seen: dict[str, str] = {}
    for group, items in (("backends", backends), ("standby", standby)):
        for index, backend in enumerate(items):
            key = f"{group}[{index}].name"
            if backend.name in seen:
                raise FleetError(source, key, f"duplicate name {backend.name!r} (first used at {seen[backend.name]})")
            seen[backend.name] = key
    return Fleet(
        backends=tuple(backends),
        standby=tuple(standby),
        agent=reader.agent(top.get("agent", {})),
        balancer=reader.balancer(top.get("balancer", {})),
        statsd=reader.statsd(top["statsd"]) if "statsd" in top else None,
        source=source,
    )


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


class _Reader:
    """Walks decoded YAML, turning every problem into a FleetError with its key path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> FleetError:
        return FleetError(self.source, key, problem)

    def mapping(self, value: Any, key: str, allowed: set[str], required: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {_kind(value)}")
        for name in value:
            if name not in allowed:
                raise self.fail(f"{key}.{name}" if key != "(top level)" else str(name),
                                f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for name in sorted(required):
            if name not in value:
                raise self.fail(f"{key}.{name}", "required key is missing")
        return value

    def convert(self, key: str, func: Any, value: Any) -> Any:
        try:
            return func(value)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def positive_int(self, key: str, value: Any) -> int:
        return self.convert(key, _positive_int, value)

    def backend_list(self, value: Any, key: str, required: bool) -> list[Backend]:
        if value is None:
            if required:
                raise self.fail(key, "required key is missing (list at least one llama.cpp server)")
            return []
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {_kind(value)}")
        if required and not value:
            raise self.fail(key, "list at least one llama.cpp server")
        return [self.backend(item, f"{key}[{index}]") for index, item in enumerate(value)]

    def backend(self, value: Any, key: str) -> Backend:
        item = self.mapping(value, key, allowed={"name", "address", "api_key", "api_key_env", "slots"},
                            required={"name", "address"})
        if "api_key" in item and "api_key_env" in item:
            raise self.fail(f"{key}.api_key", "give either api_key or api_key_env, not both")
        api_key = item.get("api_key")
        if api_key is not None and (not isinstance(api_key, str) or not api_key or not api_key.isprintable()):
            raise self.fail(f"{key}.api_key", "expected a non-empty single-line string")
        api_key_env = item.get("api_key_env")
        if api_key_env is not None and (not isinstance(api_key_env, str) or not _ENV_NAME_PATTERN.fullmatch(api_key_env)):
            raise self.fail(f"{key}.api_key_env", f"expected an environment variable name, got {api_key_env!r}")
        slots = item.get("slots")
        return Backend(
            name=self.convert(f"{key}.name", validate_name, item["name"]),
            address=self.convert(f"{key}.address", parse_address, item["address"]),
            api_key=api_key,
            api_key_env=api_key_env,
            slots=None if slots is None else self.positive_int(f"{key}.slots", slots),
        )

    def optional(self, item: dict[str, Any], section: str, key: str, parse: Any, default: Any) -> Any:
        if key not in item:
            return default
        return self.convert(f"{section}.{key}", parse, item[key])

    def agent(self, value: Any) -> AgentConfig:
        defaults = AgentConfig()
        item = self.mapping(value, "agent", allowed=set(defaults.__dataclass_fields__))
        if "operator_token" in item and "operator_token_env" in item:
            raise self.fail("agent.operator_token", "give either operator_token or operator_token_env, not both")
        return AgentConfig(
            listen=self.optional(item, "agent", "listen", parse_address, defaults.listen),
            management=self.optional(item, "agent", "management", parse_address, defaults.management),
            interval=self.optional(item, "agent", "interval", parse_duration, defaults.interval),
            operator_token=self.optional(item, "agent", "operator_token", _secret, None),
            operator_token_env=self.optional(item, "agent", "operator_token_env", _env_name, None),
        )

    def statsd(self, value: Any) -> StatsdConfig:
        item = self.mapping(value, "statsd", allowed={"address", "prefix", "interval"}, required={"address"})
        return StatsdConfig(
            address=self.convert("statsd.address", parse_address, item["address"]),
            prefix=self.optional(item, "statsd", "prefix", _metric_prefix, "paddler"),
            interval=self.optional(item, "statsd", "interval", parse_duration, 1.0),
        )

    def balancer(self, value: Any) -> BalancerConfig:
        defaults = BalancerConfig()
        item = self.mapping(value, "balancer", allowed=set(defaults.__dataclass_fields__))
        return BalancerConfig(
            listen=self.optional(item, "balancer", "listen", parse_address, defaults.listen),
            max_buffered_requests=self.optional(item, "balancer", "max_buffered_requests", _positive_int,
                                                defaults.max_buffered_requests),
            buffered_request_timeout=self.optional(item, "balancer", "buffered_request_timeout", parse_duration,
                                                   defaults.buffered_request_timeout),
            idle_timeout=self.optional(item, "balancer", "idle_timeout", parse_duration, defaults.idle_timeout),
            expose_slots=self.optional(item, "balancer", "expose_slots", _boolean, defaults.expose_slots),
            expose_admin=self.optional(item, "balancer", "expose_admin", _boolean, defaults.expose_admin),
            stats_socket=self.optional(item, "balancer", "stats_socket", _socket_path, defaults.stats_socket),
            metrics_listen=self.optional(item, "balancer", "metrics_listen", parse_address, defaults.metrics_listen),
        )


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


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: f"the string {value!r}"}.get(type(value), repr(value))


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
