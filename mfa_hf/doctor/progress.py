"""Running the doctor's checks one after another, with a progress line now and then."""

from __future__ import annotations

from typing import Callable, Iterable


def run_each(items: list, check: Callable[[object], dict], what: str, every: int,
             progress: Callable[[str], None]) -> list[dict]:
    """check(item) for each item, in order; every `every` items (and at the end) one progress line
    saying how many ran and how many did not pass."""
    rows = []
    for n, item in enumerate(items, 1):
        rows.append(check(item))
        if n % every == 0 or n == len(items):
            failed = sum(r["status"] != "passed" for r in rows)
            progress(f"{what}: {n}/{len(items)}, {failed} failed")
    return rows
