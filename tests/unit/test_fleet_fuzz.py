"""Fuzzing the fleet loader: whatever the file holds, load_fleet returns a Fleet whose numbers are
in range and whose addresses are distinct, or raises a FleetError that prints as one line naming
the file — never any other exception (which the CLIs would show as a traceback and exit 1).

10,000 generated files in all (each test asserts how many it ran): valid fleets with keys
and values swapped for odd ones, text spliced with YAML's sharp edges (anchors, tags, huge
numbers, control characters), deep nesting, alias graphs, and raw text and bytes. The bombs
from the hardening issue are also run through the real command lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet import Fleet, FleetError, load_fleet
from fleet.schema import MAX_DEPTH

REPO = Path(__file__).parent.parent.parent

FUZZ_SETTINGS: dict[str, Any] = {
    "database": None,
    "derandomize": True,
    "deadline": None,  # the machine may be busy; a slow example is not a wrong one
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
}


@pytest.fixture(scope="module")
def fleet_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fleet.yaml"


def load_bytes(path: Path, data: bytes) -> Fleet | FleetError:
    """The property: a sane Fleet, or a one-line FleetError that starts with the file's name."""
    path.write_bytes(data)
    try:
        fleet = load_fleet(path)
    except FleetError as error:
        message = str(error)
        assert "\n" not in message
        assert len(message.splitlines()) == 1, message
        assert message.startswith(f"{path}: "), message
        assert error.source == str(path)
        return error
    assert_sane(fleet)
    return fleet


def load_text(path: Path, text: str) -> Fleet | FleetError:
    return load_bytes(path, text.encode("utf-8", "surrogatepass"))


def assert_sane(fleet: Fleet) -> None:
    """What an accepted fleet promises, whatever file it came from."""
    backends = fleet.all_backends()
    assert backends
    assert len({backend.name for backend in backends}) == len(backends)
    assert len({(str(backend.address).lower()) for backend in backends}) == len(backends)
    for backend in backends:
        assert backend.slots is None or 1 <= backend.slots <= 1024
        assert 1 <= backend.address.port <= 65535
        assert len(backend.address.host) <= 253
        assert str(backend.address).isprintable()
    listeners = [fleet.agent.listen, fleet.agent.management, fleet.balancer.listen]
    if fleet.balancer.metrics_listen is not None:
        listeners.append(fleet.balancer.metrics_listen)
    for index, address in enumerate(listeners):
        for earlier in listeners[:index]:
            if address.port == earlier.port:
                assert address.host != earlier.host
                assert "0.0.0.0" not in (address.host, earlier.host) and "::" not in (address.host, earlier.host)
    assert 0.05 <= fleet.agent.interval <= 60
    assert 1 <= fleet.balancer.max_buffered_requests <= 100_000
    assert 0.1 <= fleet.balancer.buffered_request_timeout <= 86400
    assert 1 <= fleet.balancer.idle_timeout <= 86400
    if fleet.statsd is not None:
        assert 0.1 <= fleet.statsd.interval <= 600


def run_counted(examples: int, strategy: st.SearchStrategy[Any], check: Callable[[Any], object]) -> int:
    """Run ``check`` on ``examples`` generated values; return how many ran, so a test can say."""
    ran = 0

    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(strategy)
    def run(value: Any) -> None:
        nonlocal ran
        ran += 1
        check(value)

    run()
    return ran


# --- generated fleets --------------------------------------------------------------------------

ODD_STRINGS = [
    "", " ", "0", "-1", "1e30", "1.0e+30", "4294967296", "0.1ms", "1e300", "25h", "24h", "0s", "-1s",
    "999.1.1.1:80", "1.2.3:80", "01.2.3.4:80", "a" * 300 + ":80", "0.0.0.0:5555", "[::]:8085", "[::1]:8080",
    "127.0.0.1:8000", "127.0.0.1:8080", "127.0.0.1:5555", "127.0.0.1:8085", "GPU.example:8080",
    "h:0", "h:65536", "h:-1", "[fe80::1%eth0]:80", "name with space", "a\nb", "a\rb", "\u2028", "\x85",
    "\x00", "\x1b[31m", "#", ",", "é", "\U0001f600", "true", "null", "~", "&a", "*a", "!!int",
]

odd_scalars = st.one_of(
    st.sampled_from(ODD_STRINGS),
    st.integers(),
    st.sampled_from([0, -1, 1, 1024, 1025, 2**31, 2**32, 2**63, 100_000, 100_001, 10**40]),
    st.floats(),
    st.sampled_from([0.05, 0.049, 60.0, 60.5, 1e30, 1e300, float("inf"), float("-inf"), float("nan")]),
    st.booleans(),
    st.none(),
    st.text(max_size=20),
)
odd_values = st.one_of(
    odd_scalars,
    st.lists(odd_scalars, max_size=3),
    st.dictionaries(st.sampled_from(["name", "address", "slots", "x", "listen", "interval"]), odd_scalars,
                    max_size=3),
)

BACKEND_KEYS = ["name", "address", "api_key", "api_key_env", "slots"]
SECTION_KEYS = {
    "agent": ["listen", "management", "interval", "operator_token", "operator_token_env", "picker_token_env"],
    "balancer": ["listen", "max_buffered_requests", "buffered_request_timeout", "idle_timeout", "expose_slots",
                 "expose_admin", "stats_socket", "metrics_listen"],
    "statsd": ["address", "prefix", "interval"],
}
GOOD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "interval": st.sampled_from(["50ms", "500ms", "1s", "60s", "1m", 2, 0.5]),
    "listen": st.sampled_from(["127.0.0.1:5555", "127.0.0.1:8000", "0.0.0.0:9000", "127.0.0.2:7000"]),
    "management": st.sampled_from(["127.0.0.1:8085", "127.0.0.1:9100", "[::1]:9000"]),
    "max_buffered_requests": st.integers(1, 100_000),
    "buffered_request_timeout": st.sampled_from(["100ms", "10s", "2m", "1h", "24h"]),
    "idle_timeout": st.sampled_from(["1s", "5m", "24h"]),
    "expose_slots": st.booleans(),
    "expose_admin": st.booleans(),
    "metrics_listen": st.sampled_from(["127.0.0.1:8405", "127.0.0.1:8000"]),
    "address": st.sampled_from(["127.0.0.1:8125"]),
    "prefix": st.sampled_from(["paddler", "prod.llm"]),
}


@st.composite
def base_fleets(draw: st.DrawFn) -> dict[str, Any]:
    """A fleet that is valid as often as not: distinct names, mostly distinct addresses."""
    count = draw(st.integers(1, 4))
    ports = draw(st.lists(st.integers(8080, 8090), min_size=count, max_size=count))
    backends = [{"name": f"gpu{index}", "address": f"127.0.0.1:{port}"} for index, port in enumerate(ports)]
    for backend in backends:
        if draw(st.booleans()):
            backend["slots"] = draw(st.integers(1, 1024))
    data: dict[str, Any] = {"backends": backends[:-1] or backends}
    if len(backends) > 1 and draw(st.booleans()):
        data["standby"] = backends[-1:]
    elif len(backends) > 1:
        data["backends"] = backends
    for section, keys in SECTION_KEYS.items():
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=3))
            values = {name: draw(GOOD_VALUES[name]) for name in chosen if name in GOOD_VALUES}
            if section == "statsd":
                values["address"] = "127.0.0.1:8125"
            data[section] = values
    return data


def paths_in(data: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(data, dict):
        for name, value in data.items():
            yield from paths_in(value, (*prefix, name))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from paths_in(value, (*prefix, index))


@st.composite
def mutated_fleets(draw: st.DrawFn) -> dict[str, Any]:
    data = draw(base_fleets())
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(list(paths_in(data))))
        *parents, last = path or (None,)
        holder = data
        for step in parents:
            holder = holder[step]
        action = draw(st.sampled_from(["replace", "add", "delete"]))
        if not path:
            if action == "add":
                data[draw(st.sampled_from(["bogus", "standby", "agent", "balancer", "statsd"]))] = draw(odd_values)
            continue
        if action == "replace":
            holder[last] = draw(odd_values)
        elif action == "add" and isinstance(holder[last], dict):
            every_key = BACKEND_KEYS + [name for keys in SECTION_KEYS.values() for name in keys]
            holder[last][draw(st.sampled_from([*every_key, "bogus", 1, None]))] = draw(odd_values)
        elif action == "delete" and isinstance(holder, dict):
            del holder[last]
    return data


def dumped(data: Any, flow: bool) -> str:
    return yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True, sort_keys=False)


# Text YAML turns into something a dumper would never write: each is spliced into a dumped fleet.
SPLICES = [
    "&a ", "*a", "&a [*a]", "<<: *a\n", "!!int ", "!!binary aGk=", "!!timestamp ", "!foo ",
    "!!python/object:os.system ",
    "1e30", "1.0e+30", ".inf", "-.inf", ".nan", "0x1F", "0o17", "0b101", "1_000", "190:20:30", "2024-13-45",
    "2001-12-14t21:59:43.10+99:00", "~", "yes", "on", "1" * 4400, "9" * 320, "'", '"', '"\\x00"', '"\\u2028"',
    '"\\N"', "\t", "\x00", "\x7f", "\ufeff", "\x85", "\u2028", "\r", "\r\n", "[", "]", "{", "}", ": ", "- ", "? ",
    ", ", "#", "|\n", ">-\n", "---\n", "...\n", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "@", "`", "\\",
    "  ", "\n  ", "\n- ", "- - - - ", "[[[[[[[[", "{a: {b: {c: ", "k: v\nk: v\n",
]


@st.composite
def spliced_texts(draw: st.DrawFn) -> str:
    text = dumped(draw(mutated_fleets()), draw(st.booleans()))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(SPLICES)) + text[at:]
    if draw(st.booleans()):
        text = text[:draw(st.integers(0, len(text)))]
    return text


def nested(depth: int, style: str) -> str:
    if style == "flow-lists":
        return "[" * depth + "]" * depth
    if style == "flow-maps":
        return "{a: " * depth + "b" + "}" * depth
    if style == "block-lists":
        return "".join(f"\n{'  ' * level}- " for level in range(depth)) + "x"
    return "".join(f"\n{' ' * level}k:" for level in range(1, depth + 1)) + " x"


@st.composite
def structural_texts(draw: st.DrawFn) -> str:
    """Deep nesting around the limit, and alias graphs (laughs, cycles, merges)."""
    kind = draw(st.sampled_from(["nesting", "aliases"]))
    if kind == "nesting":
        style = draw(st.sampled_from(["flow-lists", "flow-maps", "block-lists", "block-maps"]))
        # Thousands of levels are test_fleet's and the command lines' (below): each costs PyYAML's
        # scanner ~0.3 s of looking ahead, too much for a thousand examples.
        depth = draw(st.one_of(st.integers(1, MAX_DEPTH + 3), st.integers(MAX_DEPTH, 200)))
        return f"backends: {nested(depth, style)}\n"
    levels = draw(st.integers(1, 9))
    width = draw(st.integers(1, 9))
    lines = ['a0: &a0 ["lol"]']
    lines += [f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * width)}]" for level in range(1, levels)]
    lines.append(draw(st.sampled_from([f"backends: *a{levels - 1}", "backends: &r [*r]", "<<: *a0",
                                       "backends:\n  - <<: {name: a}\n    address: h:1"])))
    return "\n".join(lines) + "\n"


yaml_alphabet = st.one_of(
    st.sampled_from(list("abc:-[]{},&*!|>'\"#%@`?~ \n\t0123456789.e+")),
    st.characters(),
)


def test_mutated_fleets_are_accepted_sanely_or_refused_in_one_line(fleet_path: Path) -> None:
    outcomes: list[bool] = []

    def check(data: dict[str, Any]) -> None:
        outcomes.append(isinstance(load_text(fleet_path, dumped(data, flow=False)), Fleet))

    assert run_counted(2000, mutated_fleets(), check) == 2000
    # Both outcomes are exercised, not only refusals.
    assert 200 < sum(outcomes) < 1800


def test_spliced_yaml_texts_give_a_fleet_or_one_line(fleet_path: Path) -> None:
    assert run_counted(2000, spliced_texts(), lambda text: load_text(fleet_path, text)) == 2000


def test_nesting_and_alias_graphs_give_a_fleet_or_one_line(fleet_path: Path) -> None:
    assert run_counted(1000, structural_texts(), lambda text: load_text(fleet_path, text)) == 1000


def test_raw_text_gives_a_fleet_or_one_line(fleet_path: Path) -> None:
    texts = st.text(alphabet=yaml_alphabet, max_size=120)
    assert run_counted(3500, texts, lambda text: load_text(fleet_path, text)) == 3500


def test_raw_bytes_give_a_fleet_or_one_line(fleet_path: Path) -> None:
    assert run_counted(1500, st.binary(max_size=120), lambda data: load_bytes(fleet_path, data)) == 1500


# --- the hardening issue's files through the real command lines -------------------------------


def billion_laughs() -> str:
    lines = [f'a0: &a0 ["{"lol" * 4}"]']
    lines += [f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]" for level in range(1, 10)]
    return "\n".join([*lines, "backends: *a9", ""])


BOMBS = {
    "billion-laughs": (billion_laughs(), "line 1: anchors and aliases are not allowed in a fleet file"),
    "recursive-anchor": ("backends: &a [*a]\n", "line 1: anchors and aliases are not allowed in a fleet file"),
    "5000-deep": ("backends: " + "[" * 5000 + "]" * 5000 + "\n", "line 1: nested deeper than 64 levels"),
}


def run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    # The timeout is the bound: before the fix the laughs kept a core busy for well over 10 s.
    return subprocess.run([sys.executable, "-m", module, *args], check=False, capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=20)


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_check_fleet_refuses_each_bomb_in_one_line_with_exit_2(tmp_path: Path, bomb: str) -> None:
    text, problem = BOMBS[bomb]
    path = tmp_path / "fleet.yaml"
    path.write_text(text, encoding="utf-8")

    result = run_module("generator.main", "check-fleet", "--fleet", str(path))

    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"paddler-gen: {path}: (yaml): {problem}\n"


@pytest.mark.parametrize(("module", "args", "program"), [
    pytest.param("generator.main", ("haproxy",), "paddler-gen", id="paddler-gen-haproxy"),
    pytest.param("agentcheck.main", (), "paddler-agent", id="paddler-agent"),
])
def test_generator_and_agent_refuse_the_laughs_before_doing_anything(
        tmp_path: Path, module: str, args: tuple[str, ...], program: str) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(billion_laughs(), encoding="utf-8")

    result = run_module(module, *args, "--fleet", str(path))

    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"{program}: {path}: (yaml): line 1: anchors and aliases are not allowed in a fleet file\n"
