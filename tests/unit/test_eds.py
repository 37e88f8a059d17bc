"""The endpoint list the agent serves Envoy (EDS) and the picker's wait for Envoy to apply it."""

from __future__ import annotations

import asyncio
import json

from agentcheck.eds import TYPE_URL, EndpointDiscovery
from agentcheck.model import FleetModel, Origin, PollWindow
from agentcheck.picker import Picker
from agentcheck.status import BackendStatus, SlotSource, State
from fleet import Address, Backend

BACKENDS = [Backend("eu-1", Address("10.0.0.11", 8080)), Backend("eu-2", Address("fd00::12", 8080))]
STANDBY = [Backend("backup", Address("10.1.0.11", 8080))]
JOINER = Backend("new", Address("10.0.0.13", 8080))


def ready(total: int = 2) -> BackendStatus:
    return BackendStatus(State.READY, slots_total=total, slots_processing=0, slot_source=SlotSource.SLOTS)


def make() -> tuple[FleetModel, EndpointDiscovery]:
    model = FleetModel(BACKENDS, STANDBY)
    discovery = EndpointDiscovery(model)
    model.subscribe(discovery.on_member_change)
    return model, discovery


def served(discovery: EndpointDiscovery) -> dict:
    response: dict = json.loads(discovery.body)
    return response


def test_every_member_is_listed_standby_at_priority_1_with_its_name() -> None:
    _, discovery = make()
    response = served(discovery)
    assert response["version_info"] == discovery.version
    assert response["type_url"] == TYPE_URL
    [assignment] = response["resources"]
    assert assignment == {"@type": TYPE_URL, "cluster_name": "llama", "endpoints": [
        {"priority": 0, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "10.0.0.11", "port_value": 8080}}},
             "metadata": {"filter_metadata": {"paddler": {"name": "eu-1"}}}},
            {"endpoint": {"address": {"socket_address": {"address": "fd00::12", "port_value": 8080}}},
             "metadata": {"filter_metadata": {"paddler": {"name": "eu-2"}}}}]},
        {"priority": 1, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "10.1.0.11", "port_value": 8080}}},
             "metadata": {"filter_metadata": {"paddler": {"name": "backup"}}}}]}]}


def test_joins_and_removals_are_new_versions_and_nothing_else_is() -> None:
    model, discovery = make()
    first = discovery.version
    model.record_poll("eu-1", ready(), now=1.0, window=PollWindow(1.0, 1.0))
    model.set_drained("eu-1", True)
    model.set_leaving("eu-2", True, "deregistered")  # its streams must finish: still listed
    assert discovery.version == first
    model.add(JOINER, Origin.REGISTERED)
    joined = discovery.version
    assert joined != first
    assert "10.0.0.13" in discovery.body.decode()
    model.remove("eu-2")
    assert discovery.version != joined
    assert "fd00::12" not in discovery.body.decode()


def test_a_host_name_is_left_out_rather_than_making_envoy_reject_every_update() -> None:
    model, discovery = make()
    model.add(Backend("named", Address("gpu.example", 8080)), Origin.REGISTERED)
    assert "gpu.example" not in discovery.body.decode()
    discovery.record_request(discovery.version, error_detail=False)
    assert not discovery.acknowledged("named")


def test_a_member_may_get_requests_once_envoy_has_applied_a_version_that_lists_it() -> None:
    model, discovery = make()
    acknowledgements = []
    discovery.when_acknowledged(lambda: acknowledgements.append(discovery.version))
    assert discovery.acknowledged("eu-1")  # no Envoy has asked: a static config has every fleet member
    discovery.record_request("", error_detail=False)  # a starting Envoy has nothing yet
    assert not discovery.acknowledged("eu-1")
    first = discovery.version
    discovery.record_request(first, error_detail=False)
    assert discovery.acknowledged("eu-1") and acknowledgements == [first]
    model.add(JOINER, Origin.REGISTERED)
    assert not discovery.acknowledged("new")
    discovery.record_request(first, error_detail=False)  # still the old one: nothing new
    assert not discovery.acknowledged("new") and acknowledgements == [first]
    discovery.record_request(discovery.version, error_detail=True)  # an error applies nothing
    assert not discovery.acknowledged("new")
    discovery.record_request(discovery.version, error_detail=False)
    assert discovery.acknowledged("new") and acknowledgements == [first, discovery.version]
    model.remove("new")
    assert not discovery.acknowledged("new")


def test_another_agent_process_versions_are_never_taken_for_its_own() -> None:
    _, discovery = make()
    _, restarted = make()
    assert discovery.version != restarted.version  # both are "<epoch>.1"
    restarted.record_request(discovery.version, error_detail=False)
    assert not restarted.acknowledged("eu-1")


async def test_a_waiting_request_hears_of_a_change_at_once_and_of_none_at_its_timeout() -> None:
    model, discovery = make()
    current = discovery.version
    assert await discovery.wait_for_change("an older version", timeout=5.0)
    assert not await discovery.wait_for_change(current, timeout=0.01)
    waiting = asyncio.create_task(discovery.wait_for_change(current, timeout=5.0))
    await asyncio.sleep(0)
    model.add(JOINER, Origin.REGISTERED)
    assert await asyncio.wait_for(waiting, 1.0)


async def test_closing_answers_held_requests_at_once() -> None:
    _, discovery = make()
    waiting = asyncio.create_task(discovery.wait_for_change(discovery.version, timeout=5.0))
    await asyncio.sleep(0)
    discovery.close()
    assert not await asyncio.wait_for(waiting, 1.0)
    assert not await asyncio.wait_for(discovery.wait_for_change(discovery.version, timeout=5.0), 1.0)


async def test_the_picker_places_on_a_joined_member_only_after_envoy_applied_it() -> None:
    model = FleetModel([BACKENDS[0]])
    discovery = EndpointDiscovery(model)
    picker = Picker(model, max_buffered_requests=4, buffered_request_timeout=5.0, in_balancer=discovery.acknowledged)
    model.subscribe(picker.on_member_change)
    model.subscribe(discovery.on_member_change)
    discovery.when_acknowledged(picker.wake)
    discovery.record_request(discovery.version, error_detail=False)
    model.record_poll("eu-1", ready(1), now=1.0, window=PollWindow(1.0, 1.0))
    assert (await picker.acquire()).backend == "eu-1"  # its one slot is taken now
    model.add(JOINER, Origin.REGISTERED)
    model.record_poll("new", ready(2), now=2.0, window=PollWindow(2.0, 2.0))
    assert picker.candidates() == ["eu-1"]
    waiting = asyncio.create_task(picker.acquire())
    await asyncio.sleep(0.01)
    assert not waiting.done()  # ready, but Envoy does not have its address yet
    discovery.record_request(discovery.version, error_detail=False)
    lease = await asyncio.wait_for(waiting, 1.0)
    assert (lease.backend, lease.address) == ("new", "10.0.0.13:8080")
