"""The agent's settings: one typed object, built once from the fleet and the command line."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from agentcheck.policy import DEFAULT_WEIGHT_FORMULA, WeightFormula
from fleet import Address, Backend, Fleet, FleetError, StatsdConfig

POLL_TIMEOUT_FRACTION = 0.8  # a poll must finish before the next one is due


@dataclass(frozen=True)
class AgentSettings:
    backends: tuple[Backend, ...]
    listen: Address = Address("127.0.0.1", 5555)
    interval: float = 1.0
    weight: WeightFormula = DEFAULT_WEIGHT_FORMULA
    # How long to wait for HAProxy's agent-send line. In fleet mode the name is needed, so wait
    # longer; with one backend a check may send nothing at all, so answer quickly.
    request_wait: float = 1.0
    single_backend_request_wait: float = 0.1
    management: Address | None = Address("127.0.0.1", 8085)
    operator_token: str | None = None
    statsd: StatsdConfig | None = None
    # The balancer's aggregated /health, read for the number of buffered requests.
    balancer_health_url: str | None = None
    standby: frozenset[str] = frozenset()
    max_buffered_requests: int = 30
    buffered_request_timeout: float = 10.0

    @property
    def poll_timeout(self) -> float:
        return self.interval * POLL_TIMEOUT_FRACTION

    @property
    def single_backend(self) -> Backend | None:
        return self.backends[0] if len(self.backends) == 1 else None

    @classmethod
    def from_fleet(cls, fleet: Fleet, listen: Address | None = None, interval: float | None = None,
                   weight: WeightFormula | None = None, management: Address | None = None,
                   environ: Mapping[str, str] = os.environ) -> "AgentSettings":
        token = fleet.agent.resolve_operator_token(environ)
        if fleet.agent.operator_token_env and not token:
            raise FleetError(fleet.source, "agent.operator_token_env",
                             f"environment variable {fleet.agent.operator_token_env} is not set or empty")
        balancer = fleet.balancer.listen
        balancer_host = "127.0.0.1" if balancer.host in ("0.0.0.0", "::") else balancer.host
        return cls(
            backends=fleet.all_backends(),
            listen=listen or fleet.agent.listen,
            interval=interval or fleet.agent.interval,
            weight=weight or DEFAULT_WEIGHT_FORMULA,
            management=management or fleet.agent.management,
            operator_token=token,
            statsd=fleet.statsd,
            balancer_health_url=f"http://{Address(balancer_host, balancer.port)}/health",
            standby=frozenset(backend.name for backend in fleet.standby),
            max_buffered_requests=fleet.balancer.max_buffered_requests,
            buffered_request_timeout=fleet.balancer.buffered_request_timeout,
        )
