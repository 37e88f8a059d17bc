"""The spare-server plan: which spare carries which member, and the runtime commands, without HAProxy."""

from __future__ import annotations

import pytest

from agentcheck.model import Member, Origin, Role
from agentcheck.spares import EMPTY_ADDRESS, HAProxyServer, Use, parse_show_stat, plan
from agentcheck.status import BackendStatus, SlotSource, State
from fleet import Address, Backend

SPARES = ["paddler-spare-1", "paddler-spare-2"]


def member(name: str, port: int, slots: int = 0, role: Role = Role.PRIMARY, leaving: bool = False,
           host: str = "127.0.0.1", drained: bool = False, busy: int = 0) -> Member:
    status = (BackendStatus(State.READY, slots_total=slots, slots_processing=busy, slot_source=SlotSource.SLOTS)
              if slots
              else BackendStatus(State.PENDING))
    return Member(Backend(name, Address(host, port)), role, status=status, origin=Origin.REGISTERED, leaving=leaving,
                  drained=drained)


def haproxy(**spares: tuple[str, str, int]) -> dict[str, HAProxyServer]:
    """The static server gpu1 plus spares given as name=(status, address, sessions); others empty."""
    servers = {"gpu1": HAProxyServer("gpu1", "UP", "127.0.0.1:8081", 0)}
    for name in SPARES:
        status, address, sessions = spares.get(name.replace("-", "_"), ("MAINT", EMPTY_ADDRESS, 0))
        servers[name] = HAProxyServer(name, status, address, sessions)
    return servers


def fill(spare: str, port: int, slots: int) -> list[str]:
    return [f"set server llama/{spare} addr 127.0.0.1 port {port}", f"set maxconn server llama/{spare} {slots}",
            f"set weight llama/{spare} 0", f"set server llama/{spare} state ready"]


def release(spare: str) -> list[str]:
    return [f"set server llama/{spare} state maint", f"set server llama/{spare} addr 0.0.0.0 port 0"]


def addresses(*members: Member) -> dict[str, str | None]:
    return {m.name: m.backend.address.host for m in members}


def test_a_member_without_a_server_line_gets_the_first_free_spare_filled_at_weight_0_with_its_slots() -> None:
    fleet = [member("gpu1", 8081, 2), member("gpu7", 8087, 3)]
    result = plan("llama", fleet, haproxy(), SPARES, {}, addresses(*fleet))
    assert result.assignment == {"paddler-spare-1": Use("gpu7")}
    assert result.commands == fill("paddler-spare-1", 8087, 3)
    assert result.filling == ["paddler-spare-1"]
    assert result.unplaced == []


def test_a_member_gets_a_spare_only_once_it_is_ready() -> None:
    gpu7 = member("gpu7", 8087)
    result = plan("llama", [gpu7], haproxy(), SPARES, {}, addresses(gpu7))
    assert result.assignment == {} and result.commands == [] and result.unplaced == []


def test_a_spare_refilled_while_its_member_is_down_starts_at_maxconn_1() -> None:
    gpu7 = member("gpu7", 8087)
    result = plan("llama", [gpu7], haproxy(), SPARES, {"paddler-spare-1": Use("gpu7")}, addresses(gpu7))
    assert result.commands == fill("paddler-spare-1", 8087, 1)


def test_a_filled_spare_needs_no_command_and_keeps_its_member_whatever_joins_later() -> None:
    gpu8, gpu7 = member("gpu8", 8088, 2), member("gpu7", 8087, 2)
    servers = haproxy(paddler_spare_2=("UP", "127.0.0.1:8087", 2))
    result = plan("llama", [gpu8, gpu7], servers, SPARES, {"paddler-spare-2": Use("gpu7")}, addresses(gpu8, gpu7))
    assert result.assignment == {"paddler-spare-2": Use("gpu7"), "paddler-spare-1": Use("gpu8")}
    assert result.commands == fill("paddler-spare-1", 8088, 2)
    assert result.filling == ["paddler-spare-1"]


@pytest.mark.parametrize("why", ["leaving", "drained"])
def test_a_leaving_or_drained_member_keeps_its_spare_which_is_drained_here(why: str) -> None:
    gpu7 = member("gpu7", 8087, 2, **{why: True})
    assignment = {"paddler-spare-1": Use("gpu7")}
    up = haproxy(paddler_spare_1=("UP", "127.0.0.1:8087", 1))
    result = plan("llama", [gpu7], up, SPARES, assignment, addresses(gpu7))
    assert result.assignment == assignment
    assert result.commands == ["set server llama/paddler-spare-1 state drain"]
    draining = haproxy(paddler_spare_1=("DRAIN", "127.0.0.1:8087", 1))
    assert plan("llama", [gpu7], draining, SPARES, assignment, addresses(gpu7)).commands == []


def test_a_member_that_stays_after_all_has_its_spare_ready_again() -> None:
    gpu7 = member("gpu7", 8087, 2)
    servers = haproxy(paddler_spare_1=("DRAIN", "127.0.0.1:8087", 0))
    result = plan("llama", [gpu7], servers, SPARES, {"paddler-spare-1": Use("gpu7")}, addresses(gpu7))
    assert result.commands == ["set server llama/paddler-spare-1 state ready"]


def test_a_removed_members_spare_drains_while_haproxy_shows_sessions_then_goes_back_to_maintenance() -> None:
    busy = haproxy(paddler_spare_1=("UP", "127.0.0.1:8087", 1))
    first = plan("llama", [], busy, SPARES, {"paddler-spare-1": Use("gpu7")}, {})
    assert first.assignment == {"paddler-spare-1": Use("gpu7", releasing=True)}
    assert first.commands == ["set server llama/paddler-spare-1 state drain"]
    draining = haproxy(paddler_spare_1=("DRAIN", "127.0.0.1:8087", 1))
    assert plan("llama", [], draining, SPARES, first.assignment, {}).commands == []
    done = plan("llama", [], haproxy(paddler_spare_1=("DRAIN", "127.0.0.1:8087", 0)), SPARES, first.assignment, {})
    assert done.assignment == {} and done.commands == release("paddler-spare-1")


def test_a_releasing_spare_is_not_handed_out_until_released() -> None:
    gpu8 = member("gpu8", 8088, 2)
    servers = haproxy(paddler_spare_1=("DRAIN", "127.0.0.1:8087", 1))
    result = plan("llama", [gpu8], servers, SPARES, {"paddler-spare-1": Use("gpu7", releasing=True)},
                  addresses(gpu8))
    assert result.assignment == {"paddler-spare-1": Use("gpu7", releasing=True), "paddler-spare-2": Use("gpu8")}


def test_a_member_given_its_own_server_line_by_a_reload_leaves_its_spare() -> None:
    gpu7 = member("gpu7", 8087, 2)
    servers = {**haproxy(paddler_spare_1=("UP", "127.0.0.1:8087", 0)),
               "gpu7": HAProxyServer("gpu7", "UP", "127.0.0.1:8087", 0)}
    result = plan("llama", [gpu7], servers, SPARES, {"paddler-spare-1": Use("gpu7")}, addresses(gpu7))
    assert result.assignment == {} and result.commands == release("paddler-spare-1")
    assert result.unplaced == []


def test_a_reloaded_haproxy_with_every_spare_disabled_again_is_refilled() -> None:
    gpu7 = member("gpu7", 8087, 4)
    result = plan("llama", [gpu7], haproxy(), SPARES, {"paddler-spare-2": Use("gpu7")}, addresses(gpu7))
    assert result.assignment == {"paddler-spare-2": Use("gpu7")}
    assert result.commands == fill("paddler-spare-2", 8087, 4)


def test_after_a_reload_a_busy_members_spare_waits_for_the_old_workers_streams_to_end() -> None:
    busy = member("gpu7", 8087, 2, busy=2)  # the old worker's streams, which the new one cannot count
    assignment = {"paddler-spare-2": Use("gpu7")}
    result = plan("llama", [busy], haproxy(), SPARES, assignment, addresses(busy))
    assert result.assignment == assignment and result.commands == [] and result.held == ["paddler-spare-2"]
    assert result.unplaced == []
    overdue = plan("llama", [busy], haproxy(), SPARES, assignment, addresses(busy), overdue={"paddler-spare-2"})
    assert overdue.commands == fill("paddler-spare-2", 8087, 2) and overdue.held == []
    idle = member("gpu7", 8087, 2)
    assert plan("llama", [idle], haproxy(), SPARES, assignment, addresses(idle)).commands == fill(
        "paddler-spare-2", 8087, 2)


def test_a_first_fill_does_not_wait_for_busy_slots() -> None:
    busy = member("gpu7", 8087, 2, busy=1)  # traffic that does not pass through HAProxy
    assert plan("llama", [busy], haproxy(), SPARES, {}, addresses(busy)).commands == fill("paddler-spare-1", 8087, 2)


def test_a_spare_out_of_maintenance_at_the_wrong_address_goes_through_maintenance_first() -> None:
    # After a reload the agent's `ready` for the spare's name can take it out of MAINT before its address is set.
    gpu7 = member("gpu7", 8087, 2)
    result = plan("llama", [gpu7], haproxy(paddler_spare_1=("DOWN", EMPTY_ADDRESS, 0)), SPARES,
                  {"paddler-spare-1": Use("gpu7")}, addresses(gpu7))
    assert result.commands == ["set server llama/paddler-spare-1 state maint", *fill("paddler-spare-1", 8087, 2)]


def test_a_restarted_agent_takes_back_the_spare_haproxy_shows_carrying_the_member() -> None:
    gpu7 = member("gpu7", 8087, 2)
    servers = haproxy(paddler_spare_2=("UP", "127.0.0.1:8087", 1))
    result = plan("llama", [gpu7], servers, SPARES, {}, addresses(gpu7))
    assert result.assignment == {"paddler-spare-2": Use("gpu7")} and result.commands == []


def test_a_just_started_agent_keeps_a_carrying_spare_for_its_member_to_register_again() -> None:
    servers = haproxy(paddler_spare_2=("UP", "127.0.0.1:8087", 1))
    waiting = plan("llama", [], servers, SPARES, {}, {}, adopting=True)
    assert waiting.assignment == {} and waiting.commands == []  # streams on it keep running, counted there

    gpu7 = member("gpu7", 8087, 2)
    back = plan("llama", [gpu7], servers, SPARES, waiting.assignment, addresses(gpu7), adopting=True)
    assert back.assignment == {"paddler-spare-2": Use("gpu7")} and back.commands == []


def test_a_spare_no_one_uses_is_put_back_to_maintenance_at_the_empty_address() -> None:
    result = plan("llama", [], haproxy(paddler_spare_2=("UP", "127.0.0.1:8087", 0)), SPARES, {}, {})
    assert result.commands == release("paddler-spare-2")


def test_when_spares_run_out_the_rest_are_unplaced_and_nothing_breaks() -> None:
    fleet = [member(f"gpu{port}", port, 1) for port in (8087, 8088, 8089)]
    result = plan("llama", fleet, haproxy(), SPARES, {}, addresses(*fleet))
    assert list(result.assignment.values()) == [Use("gpu8087"), Use("gpu8088")]
    assert result.unplaced == ["gpu8089"]


def test_standby_members_and_unresolved_names_get_no_spare_and_are_reported() -> None:
    standby = member("cold", 8090, 1, role=Role.STANDBY)
    named = member("gpu9", 8091, 1, host="gpu9.internal")
    result = plan("llama", [standby, named], haproxy(), SPARES, {}, {"cold": "127.0.0.1", "gpu9": None})
    assert result.assignment == {} and result.commands == [] and result.unplaced == ["cold", "gpu9"]


def test_a_name_is_filled_with_its_resolved_ip() -> None:
    named = member("gpu9", 8091, 1, host="gpu9.internal")
    result = plan("llama", [named], haproxy(), SPARES, {}, {"gpu9": "10.0.0.9"})
    assert result.commands[0] == "set server llama/paddler-spare-1 addr 10.0.0.9 port 8091"


def test_an_ipv6_member_is_compared_in_haproxys_bracketed_form() -> None:
    gpu6 = member("gpu6", 8086, 1, host="::1")
    servers = haproxy(paddler_spare_1=("UP", "[::1]:8086", 0))
    assert plan("llama", [gpu6], servers, SPARES, {"paddler-spare-1": Use("gpu6")}, {"gpu6": "::1"}).commands == []


SHOW_STAT = """\
# pxname,svname,qcur,qmax,scur,smax,slim,status,last_agt,addr,
llm,FRONTEND,,,0,0,4096,OPEN,,,
llama,gpu1,0,0,2,2,2,UP,"via agent : up (leaving the fleet, idle=0 processing=2 via slots)",127.0.0.1:8081,
llama,paddler-spare-1,0,0,0,0,1,MAINT,,0.0.0.0:0,
llama,BACKEND,0,0,2,2,410,UP,,,
other,x,0,0,5,5,1,UP,,10.0.0.1:1,

"""


def test_show_stat_is_read_by_column_name_for_one_backend() -> None:
    assert parse_show_stat(SHOW_STAT, "llama") == {
        "gpu1": HAProxyServer("gpu1", "UP", "127.0.0.1:8081", 2),
        "paddler-spare-1": HAProxyServer("paddler-spare-1", "MAINT", EMPTY_ADDRESS, 0),
    }


def test_an_error_instead_of_show_stat_is_an_error() -> None:
    with pytest.raises(ValueError, match="not show stat output"):
        parse_show_stat("Permission denied\n", "llama")
