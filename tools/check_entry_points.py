"""List and load every adapt plugin entry point in the current environment.

Usage: ``python tools/check_entry_points.py`` in an environment where the adapt packages are
installed (the ``wheels`` nox session runs it in a fresh venv). Prints one line per entry
point of the groups below and exits non-zero if any fails to load, or if no method is found.
"""

from __future__ import annotations

import sys
import traceback
from importlib.metadata import entry_points

GROUPS = ("adapt.methods", "adapt.layers", "adapt.backends")


def main() -> int:
    failures = 0
    total = 0
    for group in GROUPS:
        eps = sorted(entry_points(group=group), key=lambda ep: ep.name)
        print(f"[{group}] {len(eps)} entry point(s)")
        for ep in eps:
            total += 1
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "?"
            try:
                obj = ep.load()
            except Exception:
                failures += 1
                print(f"  FAIL {ep.name} = {ep.value} ({dist})")
                traceback.print_exc(limit=3)
                continue
            print(f"  ok   {ep.name} = {ep.value} ({dist}) -> {type(obj).__name__}")
    if not list(entry_points(group="adapt.methods")):
        print("no entry point in group adapt.methods: is any method package installed?")
        failures += 1
    print(f"{total} entry point(s), {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
