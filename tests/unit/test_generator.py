"""paddler-gen haproxy: golden files for the rendered text, real `haproxy -c`, and refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fleet import default_fleet, load_fleet
from generator.haproxy import check_haproxy, haproxy_binary, haproxy_duration, render_haproxy
from generator.main import main

GOLDEN = Path(__file__).parent.parent / "golden" / "haproxy"
UPDATE = os.environ.get("PADDLER_UPDATE_GOLDEN") == "1"  # regenerate after an intended change, then review the diff

FLEETS = {
    "default": default_fleet,
    "three-backends": lambda: load_fleet(GOLDEN / "three-backends.yaml"),
    "standby": lambda: load_fleet(GOLDEN / "standby.yaml"),
    "models": lambda: load_fleet(GOLDEN / "models.yaml"),
}


def rendered(name: str) -> str:
    # Golden files must not depend on where the checkout lives.
    return render_haproxy(FLEETS[name](), lua_dir="/etc/haproxy/paddler").replace(str(GOLDEN) + "/", "")


@pytest.mark.parametrize("name", FLEETS)
def test_rendered_config_matches_its_golden_file(name: str) -> None:
    golden = GOLDEN / f"{name}.cfg"
    if UPDATE:  # writing the expectation from the output proves nothing: never report it as a pass
        golden.write_text(rendered(name))
        pytest.skip(f"rewrote {golden.name}: review the diff, then run without PADDLER_UPDATE_GOLDEN")
    assert rendered(name) == golden.read_text()


@pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed")
@pytest.mark.parametrize("name", FLEETS)
def test_rendered_config_passes_haproxy_check(name: str) -> None:
    assert check_haproxy(FLEETS[name]()) is not None


def test_standby_servers_are_backups_and_slot_overrides_are_the_starting_maxconn() -> None:
    text = rendered("standby")
    assert "server us-backup-1 10.1.0.11:8080 weight 100 maxconn 2 " in text
    assert text.count(" backup\n") == 2
    assert "server eu-2 [fd00::12]:8080 weight 100 maxconn 1 " in text
    assert "slots_endpoint" not in text  # expose_slots: true


def test_each_model_has_a_backend_with_the_servers_that_serve_it_each_asking_for_that_model() -> None:
    text = rendered("models")
    pools: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("backend "):
            current = pools.setdefault(line.split()[1], [])
        elif line.startswith("    server "):
            current.append(line.split('agent-send "', 1)[1].split("\\n", 1)[0])
    assert pools == {"llama.beta": ["gpu3 model=beta", "big1 model=beta", "spare1 model=beta"],
                     "llama.alpha": ["gpu1 model=alpha", "gpu2 model=alpha", "big1 model=alpha", "spare1 model=alpha"]}
    assert "paddler-spare-" not in text  # joining without a reload: one pool only, for now
    assert "    setenv PADDLER_MODELS beta,50,20000/alpha,30,10000\n" in text
    assert "    default_backend llama.alpha\n" in text
    assert "    tune.bufsize 327680\n" in text


def test_affinity_reads_bodies_and_sends_each_conversation_to_its_server_by_name() -> None:
    fleet = load_fleet(GOLDEN / "three-backends.yaml")
    with_affinity = replace(fleet, balancer=replace(fleet.balancer, affinity=True))
    text = render_haproxy(with_affinity, lua_dir="/etc/haproxy/paddler")
    servers = [line.split()[1] for line in text.splitlines() if line.startswith("    server ")]
    rules = [line.split()[1] for line in text.splitlines() if line.startswith("    use-server ")]
    assert rules == servers  # every server, spares too, can be a conversation's server
    assert "    use-server gpu1 if { var(txn.paddler_affine) -m str gpu1 }\n" in text
    assert "    http-request lua.paddler_read if route_model\n" in text
    assert "    http-response lua.paddler_remember\n" in text
    assert "    setenv PADDLER_AFFINITY on\n" in text and "PADDLER_MODELS" not in text
    assert "use_backend" not in text  # one model: no pool to pick
    assert "PADDLER_AFFINITY_WAIT_MS" not in text
    waiting = replace(with_affinity, balancer=replace(with_affinity.balancer, affinity_wait=0.75))
    assert "    setenv PADDLER_AFFINITY_WAIT_MS 750\n" in render_haproxy(waiting, lua_dir="/etc/haproxy/paddler")


def test_a_one_model_fleet_reads_no_body() -> None:
    text = rendered("three-backends")
    assert "wait-for-body" not in text and "PADDLER_MODELS" not in text and "tune.bufsize" not in text


def test_agent_listening_everywhere_is_reached_on_loopback() -> None:
    assert "agent-addr 127.0.0.1 agent-port 5555 agent-inter 500ms" in rendered("three-backends")


def test_spare_servers_are_disabled_lines_after_the_fleets_that_name_themselves_to_the_agent() -> None:
    lines = rendered("three-backends").splitlines()
    servers = [line.split()[1] for line in lines if line.startswith("    server ")]
    assert servers == ["gpu1", "gpu2", "gpu3.rack-b", "paddler-spare-1", "paddler-spare-2"]
    spare = next(line for line in lines if line.startswith("    server paddler-spare-2 "))
    # The fleet's servers' check settings (default-server, agent-check) and a safe starting maxconn.
    assert spare == ("    server paddler-spare-2 0.0.0.0:0 disabled weight 100 maxconn 1 agent-check "
                     "agent-addr 127.0.0.1 agent-port 5555 "
                     'agent-inter 500ms agent-send "paddler-spare-2\\n"')
    assert "the agent cannot fill them" not in "\n".join(lines)  # this fleet has a stats socket


def test_spares_without_a_stats_socket_are_rendered_and_the_config_says_they_stay_empty() -> None:
    text = rendered("default")
    assert text.count(" disabled weight 100 maxconn 1 ") == 8  # balancer.spare_servers' default
    assert "balancer.stats_socket is not set: the agent cannot fill them" in text
    assert "stats socket" not in text


def test_no_spare_servers_render_no_spare_lines() -> None:
    assert "paddler-spare-" not in rendered("standby")


@pytest.mark.parametrize(("seconds", "text"), [(10, "10s"), (0.5, "500ms"), (60, "60s"), (1.25, "1250ms")])
def test_durations_use_haproxy_syntax(seconds: float, text: str) -> None:
    assert haproxy_duration(seconds) == text


BAD_FLEETS = {
    "duplicate-name": ("backends:\n  - {name: a, address: 'h:1'}\n  - {name: a, address: 'h:2'}\n",
                       "backends[1].name"),
    "name-with-newline": ('backends:\n  - {name: "a\\nserver evil 1.2.3.4:80", address: "h:1"}\n',
                          "backends[0].name"),
    "name-with-space": ("backends:\n  - {name: 'a b', address: 'h:1'}\n", "backends[0].name"),
    "bad-address": ("backends:\n  - {name: a, address: 'h:99999'}\n", "backends[0].address"),
    "negative-slots": ("backends:\n  - {name: a, address: 'h:1', slots: -1}\n", "backends[0].slots"),
    "unknown-key": ("backends:\n  - {name: a, address: 'h:1'}\nbalancer: {max_buffer: 3}\n", "balancer.max_buffer"),
}


@pytest.mark.parametrize("case", BAD_FLEETS)
def test_bad_fleet_is_one_line_naming_the_key_exit_2_and_nothing_on_stdout(case: str, tmp_path: Path) -> None:
    text, key = BAD_FLEETS[case]
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "generator.main", "haproxy", "--fleet", str(path)],
                            capture_output=True, text=True, cwd=Path(__file__).parent.parent.parent)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"paddler-gen: {path}: {key}: ")


def test_install_lua_copies_the_bridge_next_to_the_config_reference(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["haproxy", "--lua-dir", str(tmp_path / "lua"), "--install-lua"]) == 0
    assert (tmp_path / "lua" / "paddler.lua").read_text().startswith("-- paddler.lua")
    assert f"lua-load {tmp_path}/lua/paddler.lua" in capsys.readouterr().out
