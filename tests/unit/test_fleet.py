"""fleet.schema: what a valid fleet file becomes, and the exact error for each mistake."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet import (
    Address,
    AgentConfig,
    Backend,
    BalancerConfig,
    FleetError,
    StatsdConfig,
    default_fleet,
    load_fleet,
    parse_fleet,
    validate_name,
)
from fleet.schema import MAX_DEPTH, MAX_FILE_BYTES, NAME_PATTERN

SOURCE = "fleet.yaml"

FULL_FLEET_YAML = """\
backends:
  - name: gpu1
    address: 10.0.0.1:8080
    api_key: s3cret
    slots: 4
  - name: gpu-2.local
    address: "[::1]:8080"
    api_key_env: GPU2_API_KEY
standby:
  - name: cpu_spare
    address: spare.example.com:8081
agent:
  listen: 0.0.0.0:5556
  management: 127.0.0.1:9000
  interval: 500ms
balancer:
  listen: 0.0.0.0:8001
  max_buffered_requests: 50
  buffered_request_timeout: 2m
"""


def one_backend(**overrides: Any) -> dict[str, Any]:
    backend = {"name": "gpu1", "address": "127.0.0.1:8080"}
    backend.update(overrides)
    return {"backends": [backend]}


def fleet_error(data: Any) -> FleetError:
    with pytest.raises(FleetError) as info:
        parse_fleet(data, source=SOURCE)
    return info.value


def load_error(path: Path) -> FleetError:
    with pytest.raises(FleetError) as info:
        load_fleet(path)
    return info.value


# --- valid files ------------------------------------------------------------------------


def test_full_fleet_file_loads_every_key(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(FULL_FLEET_YAML, encoding="utf-8")

    fleet = load_fleet(path)

    assert fleet.source == str(path)
    assert fleet.backends == (
        Backend("gpu1", Address("10.0.0.1", 8080), api_key="s3cret", slots=4),
        Backend("gpu-2.local", Address("::1", 8080), api_key_env="GPU2_API_KEY"),
    )
    assert fleet.standby == (Backend("cpu_spare", Address("spare.example.com", 8081)),)
    assert [backend.name for backend in fleet.all_backends()] == ["gpu1", "gpu-2.local", "cpu_spare"]
    assert fleet.agent == AgentConfig(
        listen=Address("0.0.0.0", 5556), management=Address("127.0.0.1", 9000), interval=0.5
    )
    assert fleet.balancer == BalancerConfig(
        listen=Address("0.0.0.0", 8001), max_buffered_requests=50, buffered_request_timeout=120.0
    )


def test_ipv6_address_keeps_brackets_when_printed() -> None:
    fleet = parse_fleet(one_backend(address="[::1]:8080"), source=SOURCE)

    assert fleet.backends[0].address == Address("::1", 8080)
    assert str(fleet.backends[0].address) == "[::1]:8080"


def test_api_key_env_is_resolved_from_the_given_environment() -> None:
    backend = parse_fleet(one_backend(api_key_env="GPU_KEY"), source=SOURCE).backends[0]

    assert backend.api_key is None
    assert backend.resolve_api_key({"GPU_KEY": "from-env"}) == "from-env"
    assert backend.resolve_api_key({}) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("10s", 10.0), ("1m", 60.0), ("1.5s", 1.5), (3, 3.0)],
)
def test_durations_are_converted_to_seconds(text: Any, seconds: float) -> None:
    data = one_backend()
    data["agent"] = {"interval": text}
    data["balancer"] = {"buffered_request_timeout": text}

    fleet = parse_fleet(data, source=SOURCE)

    assert fleet.agent.interval == pytest.approx(seconds)
    assert fleet.balancer.buffered_request_timeout == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "seconds"), [("2m", 120.0), ("1h", 3600.0), ("24h", 86400.0)])
def test_long_durations_are_converted_to_seconds(text: str, seconds: float) -> None:
    fleet = parse_fleet({**one_backend(), "balancer": {"buffered_request_timeout": text}}, source=SOURCE)

    assert fleet.balancer.buffered_request_timeout == seconds


def test_omitted_sections_take_documented_defaults() -> None:
    fleet = parse_fleet(one_backend(), source=SOURCE)

    assert fleet.standby == ()
    assert fleet.agent.listen == Address("127.0.0.1", 5555)
    assert fleet.agent.management == Address("127.0.0.1", 8085)
    assert fleet.agent.interval == 1.0
    assert fleet.balancer.max_buffered_requests == 30
    assert fleet.balancer.buffered_request_timeout == 10.0


def test_backend_optional_keys_default_to_none() -> None:
    backend = parse_fleet(one_backend(), source=SOURCE).backends[0]

    assert backend == Backend("gpu1", Address("127.0.0.1", 8080), api_key=None, api_key_env=None, slots=None)


def test_embedded_default_fleet_is_one_llama_server_on_its_default_port() -> None:
    fleet = default_fleet()

    assert fleet.source == "<embedded default>"
    assert fleet.backends == (Backend("llama1", Address("127.0.0.1", 8080)),)
    assert fleet.standby == ()
    assert fleet.agent == AgentConfig()
    assert fleet.balancer == BalancerConfig()


# --- errors from decoded data -------------------------------------------------------------


BAD_FLEETS = [
    pytest.param(
        {
            "backends": [{"name": "gpu1", "address": "127.0.0.1:8080"}],
            "standby": [{"name": "gpu1", "address": "127.0.0.1:8081"}],
        },
        "standby[0].name",
        "duplicate name 'gpu1' (first used at backends[0].name)",
        id="duplicate-name-across-backends-and-standby",
    ),
    pytest.param(
        {"backends": [{"name": "a", "address": "h:1"}, {"name": "a", "address": "h:2"}]},
        "backends[1].name",
        "duplicate name 'a'",
        id="duplicate-name-within-backends",
    ),
    pytest.param(one_backend(name="gpu\n1"), "backends[0].name", "is not allowed", id="name-with-newline"),
    pytest.param(one_backend(name="gpu 1"), "backends[0].name", "is not allowed", id="name-with-space"),
    pytest.param(one_backend(name=""), "backends[0].name", "is not allowed", id="empty-name"),
    pytest.param(one_backend(name="gpu#1"), "backends[0].name", "is not allowed", id="name-with-hash"),
    pytest.param(one_backend(name=7), "backends[0].name", "expected a string", id="name-not-a-string"),
    pytest.param(one_backend(address="127.0.0.1"), "backends[0].address", "expected host:port",
                 id="address-without-port"),
    pytest.param(one_backend(address="127.0.0.1:0"), "backends[0].address", "port must be 1-65535",
                 id="address-port-0"),
    pytest.param(one_backend(address="127.0.0.1:70000"), "backends[0].address", "port must be 1-65535",
                 id="address-port-70000"),
    pytest.param(one_backend(address="bad host:80"), "backends[0].address", "not a valid host name",
                 id="address-host-with-space"),
    pytest.param(one_backend(address="bad\nhost:80"), "backends[0].address", "not a valid host name",
                 id="address-host-with-newline"),
    pytest.param(one_backend(address="[not-v6]:80"), "backends[0].address", "is not an IPv6 address",
                 id="address-bad-ipv6"),
    pytest.param(one_backend(slots=-1), "backends[0].slots", "must be 1-1024, got -1", id="negative-slots"),
    pytest.param(one_backend(slots=0), "backends[0].slots", "must be 1-1024, got 0", id="zero-slots"),
    pytest.param(one_backend(slots=True), "backends[0].slots", "expected a whole number 1-1024, got True",
                 id="bool-slots"),
    pytest.param({**one_backend(), "bogus": 1}, "bogus", "unknown key", id="unknown-top-level-key"),
    pytest.param(one_backend(bogus=1), "backends[0].bogus", "unknown key", id="unknown-backend-key"),
    pytest.param({**one_backend(), "agent": {"bogus": 1}}, "agent.bogus", "unknown key", id="unknown-agent-key"),
    pytest.param(one_backend(api_key="k", api_key_env="K"), "backends[0].api_key", "not both",
                 id="api-key-and-api-key-env"),
    pytest.param(one_backend(api_key_env="NOT-A-VAR"), "backends[0].api_key_env",
                 "expected an environment variable name", id="api-key-env-not-a-variable-name"),
    pytest.param(one_backend(api_key="two\nlines"), "backends[0].api_key", "single-line", id="api-key-multiline"),
    pytest.param({"backends": [{"name": "gpu1"}]}, "backends[0].address", "required key is missing",
                 id="backend-without-address"),
    pytest.param({}, "backends", "required key is missing", id="missing-backends"),
    pytest.param({"standby": [{"name": "a", "address": "h:1"}]}, "backends", "required key is missing",
                 id="only-standby"),
    pytest.param({"backends": []}, "backends", "list at least one llama.cpp server", id="empty-backends"),
    pytest.param({"backends": {"name": "a"}}, "backends", "expected a list", id="backends-not-a-list"),
    pytest.param(None, "(top level)", "expected a mapping, got nothing", id="empty-document"),
    pytest.param({**one_backend(), "agent": {"interval": "soon"}}, "agent.interval", "expected a duration",
                 id="bad-duration"),
    pytest.param({**one_backend(), "agent": {"interval": "0s"}}, "agent.interval", "must be 50ms-1m, got 0s",
                 id="zero-duration"),
    pytest.param({**one_backend(), "balancer": {"max_buffered_requests": 0}}, "balancer.max_buffered_requests",
                 "must be 1-100000, got 0", id="zero-max-buffered-requests"),
]


def with_section(section: str, **values: Any) -> dict[str, Any]:
    return {**one_backend(), section: values}


# Every number has a range, and the error says it (the hardening issue's examples first).
OUT_OF_RANGE = [
    pytest.param(one_backend(slots=4294967296), "backends[0].slots", "must be 1-1024, got 4294967296",
                 id="slots-2^32-haproxy-would-read-as-unlimited"),
    pytest.param(one_backend(slots=1025), "backends[0].slots", "must be 1-1024, got 1025", id="slots-1025"),
    pytest.param(one_backend(slots=1e30), "backends[0].slots", "expected a whole number 1-1024, got 1e+30",
                 id="slots-float-1e30"),
    pytest.param(one_backend(slots="1e30"), "backends[0].slots", "expected a whole number 1-1024, got '1e30'",
                 id="slots-string-1e30"),
    pytest.param(one_backend(slots=4.0), "backends[0].slots", "expected a whole number 1-1024, got 4.0",
                 id="slots-whole-float"),
    pytest.param(one_backend(slots=10**400), "backends[0].slots", "must be 1-1024, got a number of 401 digits",
                 id="slots-401-digits"),
    pytest.param(one_backend(slots=10**5000), "backends[0].slots",
                 "must be 1-1024, got a number of thousands of digits", id="slots-past-the-int-to-str-limit"),
    pytest.param(with_section("agent", interval="0.1ms"), "agent.interval", "must be 50ms-1m, got 0.1ms",
                 id="interval-0.1ms"),
    pytest.param(with_section("agent", interval=1e300), "agent.interval", "must be 50ms-1m, got 1e+300",
                 id="interval-1e300"),
    pytest.param(with_section("agent", interval="61s"), "agent.interval", "must be 50ms-1m, got 61s",
                 id="interval-61s"),
    pytest.param(with_section("agent", interval=-1), "agent.interval", "must be 50ms-1m, got -1",
                 id="interval-negative"),
    pytest.param(with_section("agent", interval="1e300"), "agent.interval",
                 "expected a duration of 50ms-1m like 500ms, 10s or 2m, got '1e300'", id="interval-string-1e300"),
    pytest.param(with_section("statsd", address="127.0.0.1:8125", interval="50ms"), "statsd.interval",
                 "must be 100ms-10m, got 50ms", id="statsd-interval-50ms"),
    pytest.param(with_section("statsd", address="127.0.0.1:8125", interval="11m"), "statsd.interval",
                 "must be 100ms-10m, got 11m", id="statsd-interval-11m"),
    pytest.param(with_section("balancer", max_buffered_requests=1e30), "balancer.max_buffered_requests",
                 "expected a whole number 1-100000, got 1e+30", id="max-buffered-1e30"),
    pytest.param(with_section("balancer", max_buffered_requests=100_001), "balancer.max_buffered_requests",
                 "must be 1-100000, got 100001", id="max-buffered-100001"),
    pytest.param(with_section("balancer", buffered_request_timeout="99ms"), "balancer.buffered_request_timeout",
                 "must be 100ms-24h, got 99ms", id="buffered-timeout-99ms"),
    pytest.param(with_section("balancer", buffered_request_timeout="25h"), "balancer.buffered_request_timeout",
                 "must be 100ms-24h, got 25h", id="buffered-timeout-25h"),
    pytest.param(with_section("balancer", buffered_request_timeout=float("inf")),
                 "balancer.buffered_request_timeout", "must be 100ms-24h, got inf", id="buffered-timeout-inf"),
    pytest.param(with_section("balancer", idle_timeout="999ms"), "balancer.idle_timeout",
                 "must be 1s-24h, got 999ms", id="idle-timeout-999ms"),
    pytest.param(with_section("balancer", idle_timeout="100000m"), "balancer.idle_timeout",
                 "must be 1s-24h, got 100000m", id="idle-timeout-huge"),
    pytest.param(with_section("balancer", affinity=True, affinity_wait="9ms"), "balancer.affinity_wait",
                 "must be 10ms-1m, got 9ms", id="affinity-wait-9ms"),
    pytest.param(with_section("balancer", affinity=True, affinity_wait="61s"), "balancer.affinity_wait",
                 "must be 10ms-1m, got 61s", id="affinity-wait-61s"),
    pytest.param(with_section("balancer", spare_servers=257), "balancer.spare_servers",
                 "must be 0-256, got 257", id="spare-servers-257"),
    pytest.param(with_section("agent", max_registered_backends=-1), "agent.max_registered_backends",
                 "must be 0-1024, got -1", id="max-registered-negative"),
    pytest.param(with_section("agent", registration_timeout="999ms"), "agent.registration_timeout",
                 "must be 1s-1h, got 999ms", id="registration-timeout-999ms"),
]


def test_affinity_wait_is_read_with_affinity_and_refused_without_it() -> None:
    fleet = parse_fleet({**one_backend(), "balancer": {"affinity": True, "affinity_wait": "750ms"}}, source=SOURCE)
    assert fleet.balancer.affinity_wait == 0.75
    assert parse_fleet(one_backend(), source=SOURCE).balancer.affinity_wait is None
    assert str(fleet_error({**one_backend(), "balancer": {"affinity_wait": "1s"}})) == \
        f"{SOURCE}: balancer.affinity_wait: needs balancer.affinity: true"
    too_long = {"affinity": True, "affinity_wait": "10s", "buffered_request_timeout": "10s"}
    assert str(fleet_error({**one_backend(), "balancer": too_long})) == (
        f"{SOURCE}: balancer.affinity_wait: must be shorter than buffered_request_timeout (10s: the longest any "
        "request waits)")
    a_model_waits_less = {**one_backend(), "balancer": {"affinity": True, "affinity_wait": "3s"},
                          "models": {"tiny": {"buffered_request_timeout": "2s"}}}
    assert "must be shorter than buffered_request_timeout (2s" in str(fleet_error(a_model_waits_less))


@pytest.mark.parametrize(("data", "key", "message"), OUT_OF_RANGE)
def test_out_of_range_number_is_refused_with_its_range(data: Any, key: str, message: str) -> None:
    assert str(fleet_error(data)) == f"{SOURCE}: {key}: {message}"


def test_numbers_at_the_ends_of_their_ranges_are_accepted() -> None:
    low = parse_fleet({
        "backends": [{"name": "a", "address": "127.0.0.1:8080", "slots": 1}],
        "agent": {"interval": "50ms", "max_registered_backends": 0, "registration_timeout": "1s"},
        "statsd": {"address": "127.0.0.1:8125", "interval": "100ms"},
        "balancer": {"max_buffered_requests": 1, "buffered_request_timeout": "100ms", "idle_timeout": "1s",
                     "spare_servers": 0, "max_request_body": 16384},
    }, source=SOURCE)
    high = parse_fleet({
        "backends": [{"name": "a", "address": "127.0.0.1:8080", "slots": 1024}],
        "agent": {"interval": "60s", "max_registered_backends": 1024, "registration_timeout": "1h"},
        "statsd": {"address": "127.0.0.1:8125", "interval": "10m"},
        "balancer": {"max_buffered_requests": 100_000, "buffered_request_timeout": "24h", "idle_timeout": "24h",
                     "spare_servers": 256, "max_request_body": 16 * 1024 * 1024},
    }, source=SOURCE)

    assert (low.backends[0].slots, low.agent.interval, low.balancer.max_buffered_requests) == (1, 0.05, 1)
    assert low.statsd == StatsdConfig(Address("127.0.0.1", 8125), interval=0.1)
    assert (low.balancer.buffered_request_timeout, low.balancer.idle_timeout) == (0.1, 1.0)
    assert (high.backends[0].slots, high.agent.interval, high.balancer.max_buffered_requests) == (1024, 60.0, 100_000)
    assert high.statsd == StatsdConfig(Address("127.0.0.1", 8125), interval=600.0)
    assert (high.balancer.buffered_request_timeout, high.balancer.idle_timeout) == (86400.0, 86400.0)
    assert (low.agent.max_registered_backends, low.agent.registration_timeout, low.balancer.spare_servers) == (0, 1, 0)
    assert (high.agent.max_registered_backends, high.agent.registration_timeout,
            high.balancer.spare_servers) == (1024, 3600, 256)
    assert (low.balancer.max_request_body, high.balancer.max_request_body) == (16384, 16 * 1024 * 1024)


def test_names_of_haproxys_spare_servers_are_reserved() -> None:
    data = {"backends": [{"name": "paddler-spare-1", "address": "127.0.0.1:8080"}]}
    assert str(fleet_error(data)) == (f"{SOURCE}: backends[0].name: 'paddler-spare-1' is not allowed: names starting "
                                      "with 'paddler-spare-' are HAProxy's spare servers")


@pytest.mark.parametrize("section", [Backend, AgentConfig, StatsdConfig, BalancerConfig])
def test_every_default_is_inside_its_own_range(section: type) -> None:
    # A default is what its key's parse returns; parsing it again (addresses as text) must give it back.
    checked = 0
    for spec in fields(section):
        if "parse" not in spec.metadata or spec.default is MISSING or spec.default is None:
            continue
        raw = str(spec.default) if isinstance(spec.default, Address) else spec.default
        assert spec.metadata["parse"](raw) == spec.default, spec.name
        checked += 1
    assert checked == {Backend: 0, AgentConfig: 5, StatsdConfig: 2, BalancerConfig: 9}[section]


BAD_ADDRESSES = [
    pytest.param("999.1.1.1:80", "'999.1.1.1' is not an IPv4 address (four numbers 0-255, no leading zeros)",
                 id="ipv4-octet-999"),
    pytest.param("1.2.3:80", "'1.2.3' is not an IPv4 address (four numbers 0-255, no leading zeros)",
                 id="ipv4-three-octets"),
    pytest.param("010.0.0.1:80", "'010.0.0.1' is not an IPv4 address (four numbers 0-255, no leading zeros)",
                 id="ipv4-leading-zero"),
    pytest.param("8080:80", "'8080' is not an IPv4 address (four numbers 0-255, no leading zeros)",
                 id="host-all-digits"),
    pytest.param(f"{'a' * 300}:80", "host name is 300 characters long, at most 253 are allowed",
                 id="host-300-characters"),
    pytest.param(f"{'a' * 64}.example:80", f"'{'a' * 64}.example' is not a valid host name or IPv4 address",
                 id="label-64-characters"),
]


@pytest.mark.parametrize(("address", "problem"), BAD_ADDRESSES)
def test_bad_host_is_refused(address: str, problem: str) -> None:
    assert str(fleet_error(one_backend(address=address))) == f"{SOURCE}: backends[0].address: {problem}"


def test_host_name_of_253_characters_is_accepted_and_254_refused() -> None:
    label = "a" * 63
    longest = f"{label}.{label}.{label}.{'b' * 61}"
    assert len(longest) == 253

    fleet = parse_fleet(one_backend(address=f"{longest}:80"), source=SOURCE)

    assert fleet.backends[0].address == Address(longest, 80)
    assert fleet_error(one_backend(address=f"x{longest}:80")).problem == (
        "host name is 254 characters long, at most 253 are allowed")


def two_backends(first: str, second: str, group: str = "backends") -> dict[str, Any]:
    data: dict[str, Any] = {"backends": [{"name": "a", "address": first}]}
    if group == "backends":
        data["backends"].append({"name": "b", "address": second})
    else:
        data[group] = [{"name": "b", "address": second}]
    return data


SHARED_ADDRESSES = [
    pytest.param(two_backends("127.0.0.1:8080", "127.0.0.1:8080"),
                 "backends[1].address: 127.0.0.1:8080 is already backends[0].address", id="twice-in-backends"),
    pytest.param(two_backends("127.0.0.1:8080", "127.0.0.1:8080", "standby"),
                 "standby[0].address: 127.0.0.1:8080 is already backends[0].address", id="backend-and-standby"),
    pytest.param(two_backends("GPU.example:8080", "gpu.example:8080"),
                 "backends[1].address: gpu.example:8080 is already backends[0].address", id="host-name-case"),
    pytest.param(two_backends("[::1]:8080", "[0:0::1]:8080"),
                 "backends[1].address: [0:0::1]:8080 is already backends[0].address", id="ipv6-spellings"),
    pytest.param(with_section("agent", management="127.0.0.1:5555"),
                 "agent.management: 127.0.0.1:5555 is already agent.listen", id="agent-listen-and-management"),
    pytest.param(with_section("balancer", listen="127.0.0.1:8085"),
                 "balancer.listen: 127.0.0.1:8085 is already agent.management", id="balancer-on-management"),
    pytest.param(with_section("balancer", metrics_listen="127.0.0.1:8000"),
                 "balancer.metrics_listen: 127.0.0.1:8000 is already balancer.listen", id="metrics-on-balancer"),
    pytest.param(with_section("balancer", listen="0.0.0.0:5555"),
                 "balancer.listen: 0.0.0.0:5555 collides with agent.listen 127.0.0.1:5555: 0.0.0.0 listens on "
                 "every address, so port 5555 can be bound only once", id="wildcard-v4-after-loopback"),
    pytest.param({**one_backend(), "agent": {"listen": "0.0.0.0:9000"}, "balancer": {"listen": "10.0.0.1:9000"}},
                 "balancer.listen: 10.0.0.1:9000 collides with agent.listen 0.0.0.0:9000: 0.0.0.0 listens on "
                 "every address, so port 9000 can be bound only once", id="address-after-wildcard-v4"),
    pytest.param(with_section("agent", listen="[::]:8085"),
                 "agent.management: 127.0.0.1:8085 collides with agent.listen [::]:8085: :: listens on "
                 "every address, so port 8085 can be bound only once", id="wildcard-v6"),
    pytest.param(one_backend(address="127.0.0.1:8000"),
                 "backends[0].address: 127.0.0.1:8000 is already balancer.listen", id="backend-on-the-balancer"),
]


@pytest.mark.parametrize(("data", "message"), SHARED_ADDRESSES)
def test_an_address_used_twice_is_refused(data: Any, message: str) -> None:
    assert str(fleet_error(data)) == f"{SOURCE}: {message}"


def test_same_port_on_different_hosts_is_not_a_collision() -> None:
    fleet = parse_fleet({
        "backends": [{"name": "a", "address": "127.0.0.1:8080"}, {"name": "b", "address": "127.0.0.2:8080"}],
        "agent": {"listen": "127.0.0.1:7000", "management": "127.0.0.2:7000"},
        "balancer": {"listen": "127.0.0.3:7000", "metrics_listen": "[::1]:7000"},
    }, source=SOURCE)

    assert [backend.address.port for backend in fleet.backends] == [8080, 8080]
    assert fleet.balancer.metrics_listen == Address("::1", 7000)


@pytest.mark.parametrize(("data", "key", "problem"), BAD_FLEETS)
def test_invalid_fleet_is_reported_with_file_key_path_and_problem(data: Any, key: str, problem: str) -> None:
    error = fleet_error(data)

    assert error.source == SOURCE
    assert error.key == key
    assert problem in error.problem
    assert str(error).startswith(f"{SOURCE}: {key}: ")


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("[fe80::1%eth0 x]:8080", id="space-in-ipv6-zone"),
        pytest.param("[fe80::1%eth0\nx]:8080", id="newline-in-ipv6-zone"),
    ],
)
def test_ipv6_zone_cannot_smuggle_whitespace_into_config_lines(address: str) -> None:
    # parse_address promises "nothing that could break a config line"; ipaddress accepts any
    # scope id after '%', so the host must still be checked for whitespace.
    error = fleet_error(one_backend(address=address))

    assert error.key == "backends[0].address"


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_duration_is_rejected(value: float) -> None:
    # YAML's .nan / .inf decode to floats; neither is a usable poll interval.
    error = fleet_error({**one_backend(), "agent": {"interval": value}})

    assert error.key == "agent.interval"


# --- errors from files --------------------------------------------------------------------


def test_duplicate_yaml_key_is_refused_not_silently_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "backends:\n"
        "  - name: a\n"
        "    address: h:1\n"
        "backends:\n"
        "  - name: b\n"
        "    address: h:2\n",
        encoding="utf-8",
    )

    error = load_error(path)

    assert error.source == str(path)
    assert error.key == "backends"
    assert "duplicate key at line 4" in error.problem
    assert str(path) in str(error)


def test_duplicate_yaml_key_inside_a_backend_names_its_full_key_path(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "backends:\n"
        "  - name: a\n"
        "    address: h:1\n"
        "    address: h:2\n",
        encoding="utf-8",
    )

    error = load_error(path)

    assert error.source == str(path)
    assert error.key == "backends[0].address"
    assert "line 4" in error.problem


def test_invalid_yaml_is_reported_with_its_position(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("backends: [\n  - name: a\n", encoding="utf-8")

    error = load_error(path)

    assert error.source == str(path)
    assert error.key == "(yaml)"
    assert error.problem.startswith("not valid YAML at line ")
    assert str(path) in str(error)


def test_unhashable_yaml_key_is_a_fleet_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("? [a, b]\n: 1\nbackends: []\n", encoding="utf-8")

    error = load_error(path)

    assert error.source == str(path)
    assert str(path) in str(error)


def test_missing_file_is_reported_as_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"

    error = load_error(path)

    assert error.source == str(path)
    assert error.key == "(file)"
    assert error.problem.startswith("cannot read: ")
    assert str(path) in str(error)


def test_directory_instead_of_file_is_reported_as_unreadable(tmp_path: Path) -> None:
    error = load_error(tmp_path)

    assert error.key == "(file)"
    assert error.problem.startswith("cannot read: ")
    assert str(tmp_path) in str(error)


def test_non_utf8_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_bytes(b"backends:\n  - name: \xff\xfe\n")

    error = load_error(path)

    assert error.key == "(file)"
    assert "UTF-8" in error.problem


def test_semantic_errors_in_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("backends:\n  - name: a\n    address: h:1\n    slots: 0\n", encoding="utf-8")

    error = load_error(path)

    assert error.source == str(path)
    assert error.key == "backends[0].slots"


# --- names are safe inside config lines and agent-check replies ---------------------------

UNSAFE_CHARS = " \t\r\n\x0b\x0c#,"

names = st.one_of(
    st.text(max_size=80),
    st.from_regex(NAME_PATTERN, fullmatch=True),
    # a valid name with something unsafe spliced in
    st.tuples(
        st.from_regex(NAME_PATTERN, fullmatch=True),
        st.text(alphabet=st.sampled_from([*list(UNSAFE_CHARS), "\xa0", "\u2028", "\x85"]), min_size=1, max_size=3),
        st.integers(min_value=0, max_value=64),
    ).map(lambda parts: parts[0][: parts[2]] + parts[1] + parts[0][parts[2]:]),
)


@settings(database=None, derandomize=True, max_examples=500)
@given(names)
def test_accepted_names_never_contain_whitespace_hash_or_comma(name: str) -> None:
    try:
        accepted = validate_name(name)
    except ValueError:
        return
    assert accepted == name
    assert not any(char.isspace() for char in name)
    assert "#" not in name
    assert "," not in name
    assert "\n" not in name and "\r" not in name
    assert 1 <= len(name) <= 63


# --- YAML that could make the loader spin, recurse or print more than one line -------------


def billion_laughs() -> str:
    """The hardening issue's file: 9 levels of 9 aliases, a billion strings from a few hundred bytes."""
    lines = [f'a0: &a0 ["{"lol" * 4}"]']
    lines += [f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]" for level in range(1, 10)]
    return "\n".join([*lines, "backends: *a9", ""])


def nested_lists(depth: int) -> str:
    return "backends: " + "[" * depth + "]" * depth + "\n"


def written(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_billion_laughs_is_refused_at_its_first_anchor(tmp_path: Path) -> None:
    text = billion_laughs()
    assert len(text.encode()) == 525

    error = load_error(written(tmp_path, text))

    assert (error.key, error.problem) == ("(yaml)", "line 1: anchors and aliases are not allowed in a fleet file")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param("backends: &a [*a]\n", 1, id="recursive-anchor"),
        pytest.param("x: &gpu\n  name: a\nbackends:\n  - *gpu\n", 1, id="anchor-on-a-mapping"),
        pytest.param("backends:\n  - name: &n a\n    address: h:1\n", 2, id="anchor-on-a-scalar"),
        pytest.param("backends:\n  - name: a\n    address: h:1\n  - <<: *base\n", 4, id="merge-key-alias"),
    ],
)
def test_anchors_and_aliases_are_refused_with_their_line(tmp_path: Path, text: str, line: int) -> None:
    error = load_error(written(tmp_path, text))

    assert str(error) == (f"{tmp_path / 'fleet.yaml'}: (yaml): line {line}: "
                          "anchors and aliases are not allowed in a fleet file")


@pytest.mark.parametrize("text", [
    pytest.param(nested_lists(5000), id="5000-nested-flow-lists"),
    # Block nesting costs indentation, so 128 KiB holds fewer levels, still past the recursion limit.
    pytest.param("backends:\n" + "".join(f"{'  ' * level}- \n" for level in range(1, 350)), id="350-block-lists"),
    pytest.param("backends:\n" + "".join(f"{' ' * level}k:\n" for level in range(1, 500)), id="500-block-maps"),
])
def test_deep_nesting_is_refused_before_the_composer_recurses(tmp_path: Path, text: str) -> None:
    error = load_error(written(tmp_path, text))

    assert error.key == "(yaml)"
    assert error.problem.endswith(f": nested deeper than {MAX_DEPTH} levels")


def test_nesting_up_to_the_limit_reaches_the_schema(tmp_path: Path) -> None:
    # The top-level mapping is the first level: 63 lists below it make 64.
    deepest = load_error(written(tmp_path, nested_lists(MAX_DEPTH - 1)))
    too_deep = load_error(written(tmp_path, nested_lists(MAX_DEPTH)))

    assert (deepest.key, deepest.problem) == ("backends[0]", "expected a mapping, got a list")
    assert (too_deep.key, too_deep.problem) == ("(yaml)", "line 1: nested deeper than 64 levels")


def test_file_larger_than_the_limit_is_refused_unread(tmp_path: Path) -> None:
    fleet = "backends:\n  - name: a\n    address: h:1\n"
    exact = fleet + "#" * (MAX_FILE_BYTES - len(fleet) - 1) + "\n"
    assert len(exact) == MAX_FILE_BYTES

    assert load_fleet(written(tmp_path, exact)).backends == (Backend("a", Address("h", 1)),)
    error = load_error(written(tmp_path, exact + "\n"))
    assert (error.key, error.problem) == ("(file)", "larger than 128 KiB; a fleet file is a few kilobytes")


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        pytest.param("backends:\n  - name: a\n    address: h:1\n    slots: " + "1" * 5000 + "\n", "(yaml)",
                     "a value cannot be read: Exceeds the limit (4300 digits) for integer string conversion: "
                     "value has 5000 digits", id="integer-of-5000-digits"),
        pytest.param("backends:\n  - name: 2024-13-45\n", "(yaml)",
                     "a value cannot be read: month must be in 1..12", id="timestamp-in-month-13"),
        pytest.param('"gpu\\nx": 1\n', "gpu\\nx",
                     "unknown key (allowed: agent, backends, balancer, default_model, models, standby, statsd)",
                     id="key-with-a-line-break-is-shown-escaped"),
        pytest.param('backends:\n  - "name\\u2028": a\n', "backends[0].name\\u2028",
                     "unknown key (allowed: address, api_key, api_key_env, models, name, slots)",
                     id="key-with-a-unicode-line-separator"),
        pytest.param("backends: \x00\n", "(yaml)",
                     "not valid YAML at character 11: special characters are not allowed", id="nul-character"),
        pytest.param("backends: []\n---\nbackends: []\n", "(yaml)",
                     "not valid YAML at line 2, column 1: but found another document", id="two-documents"),
    ],
)
def test_unreadable_values_and_odd_keys_give_one_line(tmp_path: Path, text: str, key: str, problem: str) -> None:
    error = load_error(written(tmp_path, text))

    assert str(error) == f"{tmp_path / 'fleet.yaml'}: {key}: {problem}"
    assert len(str(error).splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        pytest.param("backends:\n  - name: a\n    address: h:1\n    slots: !!int ''\n", "!!int",
                     id="int-tag-on-an-empty-string"),
        pytest.param("backends:\n  - name: !!timestamp a\n", "!!timestamp", id="timestamp-tag-on-a-name"),
        pytest.param("backends:\n  - name: !!bool a\n", "!!bool", id="bool-tag-on-a-name"),
        pytest.param("backends: !!seq\n  - name: a\n", "!!seq", id="seq-tag"),
        pytest.param("backends:\n  - name: !local a\n", "!local", id="local-tag"),
    ],
)
def test_explicit_tags_are_refused(tmp_path: Path, text: str, tag: str) -> None:
    # Constructors given a tag they cannot honour fail with KeyError, IndexError, AttributeError...
    error = load_error(written(tmp_path, text))

    assert error.key == "(yaml)"
    assert error.problem.endswith(f": tags such as {tag} are not allowed in a fleet file (quote the value)")


def test_fleet_error_escapes_whatever_would_break_its_line() -> None:
    error = FleetError("fleet\n.yaml", "a\rb", "bad\u2028value\x85end\ttab")

    assert str(error) == "fleet\\n.yaml: a\\rb: bad\\u2028value\\x85end\\ttab"
    assert error.key == "a\\rb"
