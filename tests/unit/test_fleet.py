"""fleet.schema: what a valid fleet file becomes, and the exact error for each mistake."""

from __future__ import annotations

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
    default_fleet,
    load_fleet,
    parse_fleet,
    validate_name,
)
from fleet.schema import NAME_PATTERN

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
    [("500ms", 0.5), ("10s", 10.0), ("2m", 120.0), ("1.5s", 1.5), (3, 3.0)],
)
def test_durations_are_converted_to_seconds(text: Any, seconds: float) -> None:
    data = one_backend()
    data["agent"] = {"interval": text}
    data["balancer"] = {"buffered_request_timeout": text}

    fleet = parse_fleet(data, source=SOURCE)

    assert fleet.agent.interval == pytest.approx(seconds)
    assert fleet.balancer.buffered_request_timeout == pytest.approx(seconds)


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
    pytest.param(one_backend(slots=-1), "backends[0].slots", "must be at least 1, got -1", id="negative-slots"),
    pytest.param(one_backend(slots=0), "backends[0].slots", "must be at least 1, got 0", id="zero-slots"),
    pytest.param(one_backend(slots=True), "backends[0].slots", "expected a whole number, got True",
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
    pytest.param({**one_backend(), "agent": {"interval": "0s"}}, "agent.interval", "must be positive",
                 id="zero-duration"),
    pytest.param({**one_backend(), "balancer": {"max_buffered_requests": 0}}, "balancer.max_buffered_requests",
                 "must be at least 1", id="zero-max-buffered-requests"),
]


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
