"""Covering arrays: few rows in which every value (strength 1) or every pair of values (strength 2)
of the given fields appears at least once.

A field's values may depend on the fields before it (a mask dtype only exists for an additive mask),
so a field is a name and a function of the row built so far. Rows are built greedily and
deterministically: each row is seeded with the first target still uncovered and filled, field by
field, with the value that covers the most uncovered targets (ties: the value least used so far,
then the first, which is the field's default). A target that no row can hold (its values exclude each other) is dropped.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

Row = dict  # field name -> value
Target = tuple  # ((name, value), ...) sorted by field position


@dataclass(frozen=True)
class Field:
    name: str
    values: Callable[[Row], tuple]  # the values allowed after the fields before it are chosen
    every: tuple  # every value it can take in any row (what must be covered)


def covering(fields: list[Field], strength: int) -> list[Row]:
    if strength not in (1, 2):
        raise ValueError(f"strength: expected 1 (every value) or 2 (every pair), got {strength!r}")
    position = {f.name: n for n, f in enumerate(fields)}
    targets = dict.fromkeys(_targets(fields, strength))
    rows: list[Row] = []
    usage: Counter = Counter()  # how often each (field, value) was chosen: ties go to the least used
    while targets:
        target = next(iter(targets))
        row = _build_row(fields, targets, dict(target), strength, position, usage)
        if row is None or target not in set(_tuples(row, fields, strength)):
            del targets[target]
            continue
        for covered in _tuples(row, fields, strength):
            targets.pop(covered, None)
        usage.update((name, _key(value)) for name, value in row.items())
        rows.append(row)
    return rows


def _targets(fields: list[Field], strength: int):
    for group in itertools.combinations(fields, strength):
        for values in itertools.product(*(f.every for f in group)):
            yield tuple((f.name, _key(v)) for f, v in zip(group, values))


def _tuples(row: Row, fields: list[Field], strength: int):
    for group in itertools.combinations(fields, strength):
        yield tuple((f.name, _key(row[f.name])) for f in group)


def _key(value: Any) -> Any:
    """Values as dictionary keys (torch dtypes hash; lists would not)."""
    return tuple(value) if isinstance(value, list) else value


def _build_row(fields, targets, forced: dict, strength: int, position: dict, usage: Counter) -> Row | None:
    row: Row = {}
    for field in fields:
        allowed = field.values(row)
        if not allowed:
            return None
        if field.name in forced:
            if forced[field.name] not in allowed:
                return None
            row[field.name] = forced[field.name]
            continue
        rest = fields[position[field.name] + 1:]
        ranked = sorted(allowed, key=lambda v: (
            -_gain(field.name, v, {**forced, **row}, targets, strength, position),
            -_opens(rest, {**row, field.name: v}, targets) if strength == 1 else 0,
            usage[field.name, _key(v)], allowed.index(v)))
        fitting = [v for v in ranked if _completes(rest, {**row, field.name: v}, forced)]
        if not fitting:
            return None
        row[field.name] = fitting[0]
    return row


def _completes(fields: list[Field], row: Row, forced: dict) -> bool:
    """Whether the remaining fields can be filled so that every forced value is allowed (a value
    chosen now can rule out a forced one later: no mask dtype without an additive mask)."""
    if not fields:
        return True
    field, rest = fields[0], fields[1:]
    allowed = field.values(row)
    if field.name in forced:
        allowed = (forced[field.name],) if forced[field.name] in allowed else ()
    return any(_completes(rest, {**row, field.name: v}, forced) for v in allowed)


def _opens(rest: list[Field], row: Row, targets: dict) -> int:
    """Later fields that keep an uncovered value allowed after this choice (strength 1 only): an
    additive mask is worth more than none while a mask dtype is still uncovered."""
    opened = 0
    for field in rest:
        try:
            allowed = field.values(row)
        except KeyError:  # it depends on a field not chosen yet
            continue
        opened += any(((field.name, _key(v)),) in targets for v in allowed)
    return opened


def _gain(name: str, value, known: Row, targets: dict, strength: int, position: dict) -> int:
    """Uncovered targets that `value` completes with the values already chosen (or forced later)."""
    if strength == 1:
        return int(((name, _key(value)),) in targets)
    gain = 0
    for other, chosen in known.items():
        if other == name:
            continue
        pair = sorted(((name, _key(value)), (other, _key(chosen))), key=lambda item: position[item[0]])
        gain += tuple(pair) in targets
    return gain
