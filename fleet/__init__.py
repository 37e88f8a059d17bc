"""The fleet file schema, shared by the agent (``agentcheck``) and the config generator."""

from fleet.schema import (
    DEFAULT_FLEET_YAML,
    Address,
    AgentConfig,
    Backend,
    BalancerConfig,
    Fleet,
    FleetError,
    StatsdConfig,
    default_fleet,
    load_fleet,
    override_agent,
    parse_address,
    parse_duration,
    parse_fleet,
    validate_name,
)

__all__ = [
    "DEFAULT_FLEET_YAML",
    "Address",
    "AgentConfig",
    "Backend",
    "BalancerConfig",
    "Fleet",
    "FleetError",
    "StatsdConfig",
    "default_fleet",
    "load_fleet",
    "override_agent",
    "parse_address",
    "parse_duration",
    "parse_fleet",
    "validate_name",
]
