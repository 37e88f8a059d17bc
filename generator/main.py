"""``paddler-gen``: render balancer configs from the fleet file (stdout), or validate the fleet.

    paddler-gen haproxy > haproxy.cfg                      # embedded default fleet
    paddler-gen haproxy --fleet fleet.yaml --check         # also run the local haproxy -c
    paddler-gen envoy --fleet fleet.yaml --check           # also run envoy --mode validate
    paddler-gen haproxy --fleet fleet.yaml --install-lua   # also copy paddler.lua to --lua-dir

Exit status: 0 rendered; 1 the proxy refused the rendered config; 2 bad input.
Nothing is written to stdout unless the whole config is good.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleet import Fleet, FleetError, default_fleet, load_fleet
from generator import envoy, haproxy
from generator.templates import CheckError


@dataclass(frozen=True)
class Target:
    proxy: str
    render: Callable[[Fleet, str], str]
    check: Callable[[Fleet], str | None]
    lua_source: Callable[[], Path]
    default_lua_dir: str


TARGETS = {
    "haproxy": Target("haproxy -c", haproxy.render_haproxy, haproxy.check_haproxy,
                      haproxy.packaged_lua_path, haproxy.DEFAULT_LUA_DIR),
    "envoy": Target("envoy --mode validate", envoy.render_envoy, envoy.check_envoy,
                    envoy.packaged_lua_path, envoy.DEFAULT_LUA_DIR),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paddler-gen",
                                     description="Render HAProxy or Envoy configs for a llama.cpp fleet.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, target in TARGETS.items():
        command = commands.add_parser(name, help=f"print the {name} config for the fleet")
        command.add_argument("--fleet", metavar="FILE",
                             help="fleet YAML file (default: one llama-server on 127.0.0.1:8080)")
        command.add_argument("--lua-dir", default=target.default_lua_dir,
                             help=f"directory the proxy loads paddler.lua from (default {target.default_lua_dir})")
        command.add_argument("--install-lua", action="store_true", help="copy paddler.lua into --lua-dir")
        command.add_argument("--check", action="store_true", help=f"validate with the local {target.proxy}")
    check_fleet = commands.add_parser("check-fleet", help="validate a fleet file")
    check_fleet.add_argument("--fleet", metavar="FILE", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        fleet = load_fleet(args.fleet) if args.fleet else default_fleet()
        if args.command == "check-fleet":
            print(f"{fleet.source}: ok, {len(fleet.backends)} backend(s), {len(fleet.standby)} standby",
                  file=sys.stderr)
            return 0
        target = TARGETS[args.command]
        text = target.render(fleet, args.lua_dir)
    except FleetError as exc:
        print(f"paddler-gen: {exc}", file=sys.stderr)
        return 2
    if args.check:
        try:
            checked_with = target.check(fleet)
        except CheckError as exc:
            print(f"paddler-gen: {target.proxy} refused the config:\n{exc}", file=sys.stderr)
            return 1
        verdict = f"valid for {checked_with}" if checked_with else f"{args.command} not found, not checked"
        print(f"paddler-gen: {verdict}", file=sys.stderr)
    if args.install_lua:
        destination = Path(args.lua_dir) / "paddler.lua"
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target.lua_source(), destination)
        print(f"paddler-gen: installed {destination}", file=sys.stderr)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
