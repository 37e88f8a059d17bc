"""Prometheus exposition: a collector that reads the fleet snapshot and the counters at scrape time
(no global registry)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from agentcheck.monitor import PollCounters
from agentcheck.snapshot import Snapshot
from agentcheck.status import ModelLoad, State


class FleetCollector(Collector):
    def __init__(self, snapshot: Snapshot, poll_counters: PollCounters, checks_served: Counter[str]) -> None:
        self._snapshot = snapshot
        self._poll_counters = poll_counters
        self._checks_served = checks_served

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        totals = snapshot["totals"]
        yield GaugeMetricFamily("paddler_slots_idle", "Idle llama.cpp slots, fleet total (ready backends)",
                                value=totals["slots_idle"])
        yield GaugeMetricFamily("paddler_slots_processing", "Busy llama.cpp slots, fleet total",
                                value=totals["slots_processing"])
        if snapshot["requests_buffered"] is not None:
            yield GaugeMetricFamily("paddler_requests_buffered",
                                    "Requests waiting in the balancer for a slot (queue + held)",
                                    value=snapshot["requests_buffered"])
        per_backend = {
            "idle": GaugeMetricFamily("paddler_backend_slots_idle", "Idle slots per backend", labels=["backend"]),
            "processing": GaugeMetricFamily("paddler_backend_slots_processing", "Busy slots per backend",
                                            labels=["backend"]),
            "total": GaugeMetricFamily("paddler_backend_slots_total", "Slots per backend", labels=["backend"]),
        }
        states = GaugeMetricFamily("paddler_backend_state", "1 for the backend's current state",
                                   labels=["backend", "state"])
        drained = GaugeMetricFamily("paddler_backend_drained", "1 when an operator drained the backend",
                                    labels=["backend"])
        poll_seconds = GaugeMetricFamily("paddler_backend_poll_duration_seconds", "Duration of the last poll",
                                         labels=["backend"])
        polls = CounterMetricFamily("paddler_backend_polls", "Polls of the backend", labels=["backend"])
        failures = CounterMetricFamily("paddler_backend_poll_failures", "Polls that did not find the backend ready",
                                       labels=["backend", "state"])
        for agent in snapshot["agents"]:
            name = agent["name"]
            for key, family in per_backend.items():
                family.add_metric([name], agent[f"slots_{key}"])
            for state in State:
                states.add_metric([name, state.value], 1.0 if agent["state"] == state.value else 0.0)
            drained.add_metric([name], 1.0 if agent["drained"] else 0.0)
            poll_seconds.add_metric([name], agent["poll_seconds"] or 0.0)
            polls.add_metric([name], self._poll_counters.polls[name])
        for (name, state_value), count in sorted(self._poll_counters.failures.items()):
            failures.add_metric([name, state_value], count)
        yield from per_backend.values()
        yield from (states, drained, poll_seconds, polls, failures)
        yield from self._models(snapshot["agents"])
        buffered = GaugeMetricFamily("paddler_model_requests_buffered", "Requests waiting for a model's slots: "
                                     "its picker queue, or its HAProxy backend's", labels=["model"])
        for model_name, row in sorted(snapshot["models"].items()):
            if row["requests_buffered"] is not None:
                buffered.add_metric([model_name], row["requests_buffered"])
        yield buffered
        if "spare_servers" in snapshot:
            spares = snapshot["spare_servers"]
            yield GaugeMetricFamily("paddler_spare_servers_used", "HAProxy spare servers carrying a backend",
                                    value=spares["used"])
            yield GaugeMetricFamily("paddler_spare_servers_total", "HAProxy spare servers (balancer.spare_servers)",
                                    value=spares["total"])
            # Alert on this one: ready backends that HAProxy sends nothing (no spare left, or unresolved).
            yield GaugeMetricFamily("paddler_backends_without_haproxy_server",
                                    "Ready backends with no server line in HAProxy", value=len(spares["unplaced"]))
        served = CounterMetricFamily("paddler_agent_checks", "Agent-check replies served, by kind", labels=["reply"])
        for kind, count in sorted(self._checks_served.items()):
            served.add_metric([kind], count)
        yield served


    def _models(self, agents: list[dict[str, Any]]) -> Iterator[Metric]:
        """Per backend and model: its slots, its load state (discovered models only) and the cold loads seen."""
        labels = ["backend", "model"]
        slots = {
            "idle": GaugeMetricFamily("paddler_model_slots_idle", "Idle slots of a model on a backend", labels=labels),
            "processing": GaugeMetricFamily("paddler_model_slots_processing", "Busy slots of a model on a backend",
                                            labels=labels),
            "total": GaugeMetricFamily("paddler_model_slots_total", "Slots of a model on a backend (a plain "
                                       "llama-server's models share its slots; 0 while a router's is not loaded)",
                                       labels=labels),
        }
        loads = GaugeMetricFamily("paddler_model_load_state", "1 for the model's current load state on the backend",
                                  labels=[*labels, "state"])
        for agent in agents:
            for model in agent["models"]:
                for key, family in slots.items():
                    family.add_metric([agent["name"], model["name"]], model[f"slots_{key}"])
                if model["load"] is not None:
                    for load in ModelLoad:
                        loads.add_metric([agent["name"], model["name"], load.value],
                                         1.0 if model["load"] == load.value else 0.0)
        cold = CounterMetricFamily("paddler_model_cold_loads", "Models seen going from unloaded to loading or "
                                   "loaded (a request named a model that was not loaded)", labels=labels)
        for (name, model_name), count in sorted(self._poll_counters.cold_loads.items()):
            cold.add_metric([name, model_name], count)
        yield from slots.values()
        yield from (loads, cold)


def build_registry(collector: FleetCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
