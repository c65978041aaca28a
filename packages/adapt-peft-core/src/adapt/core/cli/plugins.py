"""``adapt plugins``: the installed methods, layers and backends, and whether each loads."""

from __future__ import annotations

import argparse

from ._format import table


def cmd_plugins(args: argparse.Namespace) -> int:
    import warnings

    from ..registry import get_registry

    registry = get_registry()
    rows: list[list[str]] = []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for group in registry.all_groups():
            for entry in registry.entries(group):
                rows.append(
                    [
                        group.split(".")[-1],
                        entry.name,
                        entry.distribution,
                        entry.version,
                        registry.status_of(entry),
                    ]
                )
    if not rows:
        print("No adapt plugins found. Install a method, e.g. `pip install adapt-lora`.")
        return 0
    print(table(rows, ["kind", "name", "distribution", "version", "status"]))
    failed = [r for r in rows if r[4].startswith("failed")]
    invalid = [r for r in rows if r[4].startswith("invalid")]
    if failed:
        print(f"\n{len(failed)} plugin(s) failed to load; they are skipped.")
    if invalid:
        print(f"\n{len(invalid)} plugin(s) are invalid (see their status); they are skipped.")
    if getattr(args, "check", False) and (failed or invalid):
        print("adapt plugins --check: FAILED (fix or uninstall the plugins above)")
        return 1
    return 0
