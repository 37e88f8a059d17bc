"""The agent's settings: the fleet plus what the command line overrides, resolved once at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from agentcheck.policy import DEFAULT_WEIGHT_FORMULA, WeightFormula
from fleet import Address, Backend, Fleet, FleetError, contract

POLL_TIMEOUT_FRACTION = 0.8  # a poll must finish before the next one is due


@dataclass(frozen=True)
class AgentSettings:
    fleet: Fleet
    listen: Address
    interval: float
    # None: no management server (and so no picker, dashboard or /metrics).
    management: Address | None
    weight: WeightFormula = DEFAULT_WEIGHT_FORMULA
    operator_token: str | None = None
    # Bearer tokens per backend, read from the environment once (``api_key_env``).
    api_keys: Mapping[str, str | None] = field(default_factory=dict)
    # How long to wait for HAProxy's agent-send line. In fleet mode the name is needed, so wait
    # longer; with one backend a check may send nothing at all, so answer quickly.
    request_wait: float = 1.0
    single_backend_request_wait: float = 0.1

    @property
    def backends(self) -> tuple[Backend, ...]:
        return self.fleet.all_backends()

    @property
    def poll_timeout(self) -> float:
        return self.interval * POLL_TIMEOUT_FRACTION

    @property
    def agent_send_wait(self) -> float:
        return self.single_backend_request_wait if len(self.backends) == 1 else self.request_wait

    @property
    def balancer_health_url(self) -> str:
        """The balancer's aggregated /health, read for the number of requests waiting in HAProxy."""
        return f"http://{contract.client_address(self.fleet.balancer.listen)}/health"

    @classmethod
    def from_fleet(cls, fleet: Fleet, weight: WeightFormula | None = None,
                   environ: Mapping[str, str] = os.environ) -> AgentSettings:
        """The fleet's settings (command-line overrides are already in it: ``fleet.override_agent``);
        secrets named by ``*_env`` keys are read here, so a missing one stops the agent at start-up
        rather than failing every poll."""
        token = fleet.agent.resolve_operator_token(environ)
        if fleet.agent.operator_token_env and not token:
            raise FleetError(fleet.source, "agent.operator_token_env",
                             f"environment variable {fleet.agent.operator_token_env} is not set or empty")
        return cls(
            fleet=fleet,
            listen=fleet.agent.listen,
            interval=fleet.agent.interval,
            management=fleet.agent.management,
            weight=weight or DEFAULT_WEIGHT_FORMULA,
            operator_token=token,
            api_keys=resolve_api_keys(fleet, environ),
        )


def resolve_api_keys(fleet: Fleet, environ: Mapping[str, str]) -> dict[str, str | None]:
    keys = {}
    for backend in fleet.all_backends():
        key = backend.resolve_api_key(environ)
        if backend.api_key_env and not key:
            raise FleetError("environment", f"{backend.name}.api_key_env",
                             f"environment variable {backend.api_key_env} is not set or empty")
        if key is not None and not key.isprintable():
            raise FleetError("environment", f"{backend.name}.api_key_env",
                             f"environment variable {backend.api_key_env} holds a control character "
                             "(a line break?); it cannot be sent in an Authorization header")
        keys[backend.name] = key
    return keys
