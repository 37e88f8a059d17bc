"""``paddler-agent``: command line → AgentSettings → Agent, and signal handling; or one of its subcommands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import sys
from collections.abc import Callable

from agentcheck import register, top
from agentcheck.config import AgentSettings
from agentcheck.policy import WeightFormula
from agentcheck.server import Agent
from fleet import FleetError, default_fleet, load_fleet, override_agent, parse_fleet

# A first argument naming one of these runs it with the rest; anything else runs the agent itself.
SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "top": top.main,
    "register": register.main,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paddler-agent",
        description="Watch llama.cpp servers' slots and answer HAProxy agent-checks with their real state.",
        epilog="With neither --fleet nor --backend, watches one llama-server on 127.0.0.1:8080. "
               "Subcommands: top (a running agent's fleet table in a terminal; paddler-agent top --help), "
               "register (keep a llama-server registered with a running agent; paddler-agent register --help).",
    )
    parser.add_argument("--fleet", metavar="FILE", help="fleet YAML file (backends, standby, agent, balancer)")
    parser.add_argument("--backend", metavar="NAME=HOST:PORT", action="append", default=[],
                        help="a llama.cpp server to watch; repeatable; instead of --fleet")
    parser.add_argument("--listen", metavar="HOST:PORT", help="agent-check address (default 127.0.0.1:5555)")
    parser.add_argument("--management", metavar="HOST:PORT",
                        help="management API, dashboard and /metrics (default 127.0.0.1:8085)")
    parser.add_argument("--interval", metavar="DURATION", help="poll interval, e.g. 500ms, 1s (default 1s)")
    parser.add_argument("--weight", choices=[formula.value for formula in WeightFormula],
                        help="how ready backends are weighted "
                             "(default idle: proportional to idle slots; see docs/agent.md)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def settings_from_args(args: argparse.Namespace) -> AgentSettings:
    if args.fleet and args.backend:
        raise FleetError("command line", "--backend", "give either --fleet or --backend, not both")
    if args.fleet:
        fleet = load_fleet(args.fleet)
    elif args.backend:
        entries = []
        for spec in args.backend:
            name, sep, address = spec.partition("=")
            if not sep:
                raise FleetError("command line", f"--backend {spec!r}", "expected NAME=HOST:PORT")
            entries.append({"name": name, "address": address})
        fleet = parse_fleet({"backends": entries}, source="command line")
    else:
        fleet = default_fleet()
    overrides = {key: (flag, value) for key, flag, value in (
        ("listen", "--listen", args.listen),
        ("interval", "--interval", args.interval),
        ("management", "--management", args.management),
    ) if value is not None}
    weight = WeightFormula(args.weight) if args.weight else None
    return AgentSettings.from_fleet(override_agent(fleet, overrides), weight=weight)


def raise_open_file_limit() -> None:
    """A fleet of N backends needs N polling connections plus HAProxy's checks: use the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (it halves the agent's CPU per check); asyncio's own loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _reload(agent: Agent, args: argparse.Namespace) -> None:
    """SIGHUP: read the fleet file again; a broken file is logged and changes nothing."""
    try:
        agent.reload_fleet(settings_from_args(args).fleet)
    except FleetError as exc:
        logging.getLogger("paddler.agent").error("fleet reload refused, nothing changed: %s", exc)


async def _run(settings: AgentSettings, args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    agent = Agent(settings)
    signals = [signal.SIGINT, signal.SIGTERM]
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    if args.fleet:
        signals.append(signal.SIGHUP)
        loop.add_signal_handler(signal.SIGHUP, _reload, agent, args)
    try:
        await agent.serve(stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
        raise_open_file_limit()
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_run(settings, args))
    except FleetError as exc:
        print(f"paddler-agent: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"paddler-agent: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
