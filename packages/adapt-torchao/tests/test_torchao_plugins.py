"""``adapt plugins`` lists this package's backends, from its installed entry points."""

from __future__ import annotations

import subprocess
import sys

DIST = "adapt-torchao"


def plugin_statuses() -> dict[tuple[str, str, str], str]:
    out = subprocess.run(
        [sys.executable, "-m", "adapt.core.cli", "plugins"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {}
    for line in out.splitlines()[2:]:
        cells = line.split(None, 4)
        if len(cells) == 5:
            rows[(cells[0], cells[1], cells[2])] = cells[4]
    return rows


def test_adapt_plugins_lists_the_int8_backend_as_ok() -> None:
    assert plugin_statuses()[("backends", "torchao-int8", DIST)] == "ok"


def test_adapt_plugins_lists_the_intx_backend_as_ok() -> None:
    assert plugin_statuses()[("backends", "torchao-intx", DIST)] == "ok"
