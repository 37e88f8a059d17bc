"""``paddler-gen``: the command exists so installs and docs are stable; rendering is not built yet.

It validates a fleet file with the shared schema (the one real thing it can do today) and
refuses to render rather than print a config that was never tested.
"""

from __future__ import annotations

import argparse
import sys

from fleet import FleetError, default_fleet, load_fleet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paddler-gen", description="Render HAProxy/Envoy configs for a llama.cpp fleet.")
    parser.add_argument("target", choices=["haproxy", "envoy", "check-fleet"])
    parser.add_argument("--fleet", metavar="FILE", help="fleet YAML file (default: embedded one-server fleet)")
    args = parser.parse_args(argv)
    try:
        fleet = load_fleet(args.fleet) if args.fleet else default_fleet()
    except FleetError as exc:
        print(f"paddler-gen: {exc}", file=sys.stderr)
        return 2
    if args.target == "check-fleet":
        print(f"{fleet.source}: ok, {len(fleet.backends)} backend(s), {len(fleet.standby)} standby", file=sys.stderr)
        return 0
    print(f"paddler-gen: rendering {args.target} configs is not available in this version", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
