"""``paddler-gen``: render balancer configs from the fleet file (stdout), or validate the fleet.

    paddler-gen haproxy > haproxy.cfg                      # embedded default fleet
    paddler-gen haproxy --fleet fleet.yaml --check         # also run the local haproxy -c
    paddler-gen haproxy --fleet fleet.yaml --install-lua   # also copy paddler.lua to --lua-dir

Exit status: 0 rendered; 1 the rendered config was refused by haproxy -c; 2 bad input.
Nothing is written to stdout unless the whole config is good.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from fleet import FleetError, default_fleet, load_fleet
from generator.haproxy import DEFAULT_LUA_DIR, LUA_FILE, CheckError, check_haproxy, packaged_lua_path, render_haproxy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paddler-gen", description="Render HAProxy configs for a llama.cpp fleet.")
    commands = parser.add_subparsers(dest="command", required=True)
    haproxy = commands.add_parser("haproxy", help="print haproxy.cfg for the fleet")
    haproxy.add_argument("--fleet", metavar="FILE", help="fleet YAML file (default: one llama-server on 127.0.0.1:8080)")
    haproxy.add_argument("--lua-dir", default=DEFAULT_LUA_DIR,
                         help=f"directory HAProxy loads {LUA_FILE} from (default {DEFAULT_LUA_DIR})")
    haproxy.add_argument("--install-lua", action="store_true", help=f"copy {LUA_FILE} into --lua-dir")
    haproxy.add_argument("--check", action="store_true", help="validate with the local haproxy -c when present")
    check_fleet = commands.add_parser("check-fleet", help="validate a fleet file")
    check_fleet.add_argument("--fleet", metavar="FILE", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        fleet = load_fleet(args.fleet) if args.fleet else default_fleet()
    except FleetError as exc:
        print(f"paddler-gen: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-fleet":
        print(f"{fleet.source}: ok, {len(fleet.backends)} backend(s), {len(fleet.standby)} standby", file=sys.stderr)
        return 0

    text = render_haproxy(fleet, lua_dir=args.lua_dir)
    if args.check:
        try:
            checked_with = check_haproxy(fleet)
        except CheckError as exc:
            print(f"paddler-gen: haproxy -c refused the config:\n{exc}", file=sys.stderr)
            return 1
        print(f"paddler-gen: {'valid for ' + checked_with if checked_with else 'haproxy not found, not checked'}",
              file=sys.stderr)
    if args.install_lua:
        target = Path(args.lua_dir) / LUA_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(packaged_lua_path(), target)
        print(f"paddler-gen: installed {target}", file=sys.stderr)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
