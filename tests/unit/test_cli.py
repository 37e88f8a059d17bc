"""Command lines: paddler-agent's arguments → AgentSettings, and exit codes for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

import agentcheck.main as agent_main
import generator.main as generator_main
from agentcheck.config import AgentSettings
from agentcheck.main import build_parser, settings_from_args
from fleet import Address, Backend, FleetError


def settings_for(*argv: str) -> AgentSettings:
    return settings_from_args(build_parser().parse_args(list(argv)))


def cli_error(*argv: str) -> FleetError:
    with pytest.raises(FleetError) as info:
        settings_for(*argv)
    return info.value


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- settings_from_args ---------------------------------------------------------------------


def test_backend_options_become_the_fleet() -> None:
    settings = settings_for("--backend", "a=127.0.0.1:1", "--backend", "b=127.0.0.1:2")

    assert settings.backends == (Backend("a", Address("127.0.0.1", 1)), Backend("b", Address("127.0.0.1", 2)))
    assert settings.agent_send_wait == 1.0  # several backends: HAProxy must name one, give it time
    assert settings.listen == Address("127.0.0.1", 5555)
    assert settings.interval == 1.0


def test_no_arguments_watch_the_embedded_default_backend() -> None:
    settings = settings_for()

    assert settings.backends == (Backend("llama1", Address("127.0.0.1", 8080)),)
    assert settings.agent_send_wait == 0.1  # one backend: a check may send nothing, answer quickly


def test_fleet_file_supplies_backends_standby_and_agent_settings(tmp_path: Path) -> None:
    fleet = write(tmp_path / "fleet.yaml",
                  "backends:\n  - name: a\n    address: h:1\n"
                  "standby:\n  - name: s\n    address: h:2\n"
                  "agent:\n  listen: 127.0.0.1:6000\n  interval: 2s\n")

    settings = settings_for("--fleet", str(fleet))

    assert [backend.name for backend in settings.backends] == ["a", "s"]
    assert settings.listen == Address("127.0.0.1", 6000)
    assert settings.interval == 2.0


def test_listen_and_interval_options_override_the_fleet(tmp_path: Path) -> None:
    fleet = write(tmp_path / "fleet.yaml",
                  "backends:\n  - name: a\n    address: h:1\nagent:\n  listen: 127.0.0.1:6000\n  interval: 2s\n")

    settings = settings_for("--fleet", str(fleet), "--listen", "0.0.0.0:7000", "--interval", "500ms")

    assert settings.listen == Address("0.0.0.0", 7000)
    assert settings.interval == 0.5
    assert settings.poll_timeout == pytest.approx(0.4)


def test_fleet_and_backend_together_are_refused(tmp_path: Path) -> None:
    fleet = write(tmp_path / "fleet.yaml", "backends:\n  - name: a\n    address: h:1\n")

    error = cli_error("--fleet", str(fleet), "--backend", "b=127.0.0.1:2")

    assert error.source == "command line"
    assert error.key == "--backend"
    assert "not both" in error.problem


def test_backend_spec_without_equals_sign_is_named_in_the_error() -> None:
    error = cli_error("--backend", "127.0.0.1:8080")

    assert error.source == "command line"
    assert error.key == "--backend '127.0.0.1:8080'"
    assert "'127.0.0.1:8080'" in str(error)
    assert "NAME=HOST:PORT" in error.problem


@pytest.mark.parametrize(
    ("spec", "key", "shown"),
    [
        ("a=nohost", "backends[0].address", "'nohost'"),
        ("a=127.0.0.1:0", "backends[0].address", "'0'"),
        ("bad name=127.0.0.1:1", "backends[0].name", "'bad name'"),
    ],
)
def test_backend_spec_with_bad_parts_names_the_bad_part(spec: str, key: str, shown: str) -> None:
    error = cli_error("--backend", spec)

    assert error.source == "command line"
    assert error.key == key
    assert shown in error.problem


def test_second_backend_spec_errors_point_at_the_second_entry() -> None:
    error = cli_error("--backend", "a=127.0.0.1:1", "--backend", "b=127.0.0.1:70000")

    assert error.key == "backends[1].address"


def test_duplicate_backend_names_on_the_command_line_are_refused() -> None:
    error = cli_error("--backend", "a=127.0.0.1:1", "--backend", "a=127.0.0.1:2")

    assert error.key == "backends[1].name"


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["--listen", "nowhere"], "--listen"),
        (["--interval", "soon"], "--interval"),
        (["--interval", "0s"], "--interval"),
        (["--interval", "1ms"], "--interval"),
        (["--interval", "1e300"], "--interval"),
        (["--management", "999.1.1.1:8085"], "--management"),
    ],
)
def test_bad_listen_or_interval_option_is_named(argv: list[str], key: str) -> None:
    error = cli_error(*argv)

    assert error.source == "command line"
    assert error.key == key


def test_an_interval_flag_has_the_fleet_files_range() -> None:
    error = cli_error("--interval", "10ms")

    assert error.problem == "must be 50ms-1m, got 10ms"


@pytest.mark.parametrize(
    ("argv", "key", "problem"),
    [
        (["--listen", "127.0.0.1:8085"], "agent.management", "127.0.0.1:8085 is already agent.listen"),
        (["--management", "127.0.0.1:8080"], "backends[0].address", "127.0.0.1:8080 is already agent.management"),
        (["--listen", "0.0.0.0:8085"], "agent.management",
         "127.0.0.1:8085 collides with agent.listen 0.0.0.0:8085: 0.0.0.0 listens on every address, "
         "so port 8085 can be bound only once"),
    ],
)
def test_a_listener_flag_may_not_take_an_address_already_in_use(argv: list[str], key: str, problem: str) -> None:
    error = cli_error(*argv)

    assert (error.source, error.key, error.problem) == ("<embedded default> with " + argv[0], key, problem)


# --- exit codes -----------------------------------------------------------------------------


def test_agent_with_missing_fleet_file_exits_2_with_one_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"

    code = agent_main.main(["--fleet", str(missing)])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("paddler-agent:")
    assert str(missing) in lines[0]


def test_agent_with_bad_backend_spec_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = agent_main.main(["--backend", "nonsense"])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.startswith("paddler-agent: command line: --backend 'nonsense': ")
    assert err.count("\n") == 1


def test_generator_check_fleet_with_bad_file_exits_2_with_nothing_on_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write(tmp_path / "fleet.yaml", "backends:\n  - name: a\n    address: h:1\n    slots: 0\n")

    code = generator_main.main(["check-fleet", "--fleet", str(bad)])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.startswith(f"paddler-gen: {bad}: backends[0].slots: ")


def test_generator_check_fleet_with_good_file_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path / "fleet.yaml", "backends:\n  - name: a\n    address: h:1\n")

    code = generator_main.main(["check-fleet", "--fleet", str(good)])

    out, err = capsys.readouterr()
    assert code == 0
    assert out == ""
    assert "ok, 1 backend(s), 0 standby" in err
