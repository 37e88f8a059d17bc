"""``paddler-gen``: render balancer configs from the fleet file (stdout), or validate the fleet.

    paddler-gen haproxy > haproxy.cfg                      # embedded default fleet
    paddler-gen haproxy --fleet fleet.yaml --check         # also run the local haproxy -c
    paddler-gen envoy --fleet fleet.yaml --check           # also run envoy --mode validate
    paddler-gen haproxy --fleet fleet.yaml --install-lua   # also copy paddler.lua to --lua-dir

Exit status: 0 rendered; 1 the proxy refused the rendered config (or --check could not run it);
2 bad input. Nothing is written to stdout unless the whole config is good.

Only the fleet (validated by fleet/schema.py) and two values from the command line reach a config,
and both pass an allow-list first (generator/templates.py): ``--lua-dir`` must be an absolute path
of ``A-Z a-z 0-9 _ . - /`` (else ``paddler-gen: --lua-dir: <problem>``, exit 2), and the fleet
file's path is shown in the header comment as-is only when plainly printable, else as an escaped
JSON string, so it can never leave its comment line.

``--check`` validates exactly the text it prints: the config is rendered once, and that text, naming
``<--lua-dir>/paddler.lua``, is what ``haproxy -c`` / ``envoy --mode validate`` reads. Both proxies
load the Lua file while checking, so it must exist on this machine: ``--install-lua`` copies it
first; otherwise a missing file is ``paddler-gen: cannot check: <path> does not exist; ...`` and
exit 1 (never "valid" for a config that was not checked as printed). A proxy binary that is not
installed is reported as "not checked", exit 0, as before.
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
    lua_path: Callable[[str], str]  # --lua-dir -> the Lua file the config names; ValueError if refused
    binary: Callable[[], str | None]
    check_text: Callable[[str, str], None]  # (binary, exact text); CheckError if refused
    lua_source: Callable[[], Path]
    default_lua_dir: str


TARGETS = {
    "haproxy": Target("haproxy -c", haproxy.render_haproxy, haproxy.haproxy_lua_path, haproxy.haproxy_binary,
                      haproxy.check_haproxy_text, haproxy.packaged_lua_path, haproxy.DEFAULT_LUA_DIR),
    "envoy": Target("envoy --mode validate", envoy.render_envoy, envoy.envoy_lua_path, envoy.envoy_binary,
                    envoy.check_envoy_text, envoy.packaged_lua_path, envoy.DEFAULT_LUA_DIR),
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
    except FleetError as exc:
        print(f"paddler-gen: {exc}", file=sys.stderr)
        return 2
    try:
        lua_path = Path(target.lua_path(args.lua_dir))
    except ValueError as exc:
        print(f"paddler-gen: --lua-dir: {exc}", file=sys.stderr)
        return 2
    try:
        text = target.render(fleet, args.lua_dir)
    except FleetError as exc:
        print(f"paddler-gen: {exc}", file=sys.stderr)
        return 2
    if args.install_lua:  # before --check: the proxy loads this very file while checking
        lua_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target.lua_source(), lua_path)
        print(f"paddler-gen: installed {lua_path}", file=sys.stderr)
    if args.check:
        binary = target.binary()
        if binary is None:
            print(f"paddler-gen: {args.command} not found, not checked", file=sys.stderr)
        elif not lua_path.is_file():
            problem = "is not a file" if lua_path.exists() else "does not exist"
            print(f"paddler-gen: cannot check: {lua_path} {problem}; "
                  "run with --install-lua or --lua-dir pointing at it", file=sys.stderr)
            return 1
        else:
            try:
                target.check_text(binary, text)  # exactly the bytes written below
            except CheckError as exc:
                print(f"paddler-gen: {target.proxy} refused the config:\n{exc}", file=sys.stderr)
                return 1
            print(f"paddler-gen: valid for {binary}", file=sys.stderr)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
