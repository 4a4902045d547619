"""Test helpers for the replays of repeated plain calls (api.py, kernels/contract.py `forward_replay`): the same
call on the full path, and a count of the calls a kept replay served. Shared by every backend's replay tests."""

from __future__ import annotations

import dataclasses

from . import api


def full_path(call):
    """call() with api's memo emptied first (validation, routing and the launcher in full), then the memo as it was."""
    saved = dict(api._plain_decisions)
    api._plain_decisions.clear()
    try:
        return call()
    finally:
        api._plain_decisions.clear()
        api._plain_decisions.update(saved)


def kept_replays() -> list:
    """The replays api.py keeps for plain kinds (not its none-yet or never markers)."""
    return [d.replay for d in api._plain_decisions.values() if d.replay not in (None, api._NO_REPLAY)]


class ReplayCounter:
    """Wraps the one kept replay so that the calls it serves are counted; `intact` tells whether it is still the
    kept one (a replay that declined a call is replaced by a new one)."""

    def __init__(self):
        ((self.key, decision),) = [(key, d) for key, d in api._plain_decisions.items()
                                   if d.replay not in (None, api._NO_REPLAY)]
        made, self.served = decision.replay, 0

        def counted(*args):
            result = made(*args)
            self.served += result is not None
            return result

        self.replay = counted
        api._plain_decisions[self.key] = dataclasses.replace(decision, replay=counted)

    @property
    def intact(self) -> bool:
        return api._plain_decisions[self.key].replay is self.replay


def decode_full_path(plan, q, layer, **options):
    """plan.run(q, layer) on the full path: the decode plan's memo emptied, and traced (a traced call never makes
    or uses a replay); then the memo as it was."""
    from . import decode_plan, trace

    saved = dict(decode_plan._decisions)
    decode_plan._decisions.clear()
    try:
        with trace.capture():
            return plan.run(q, layer, **options)
    finally:
        decode_plan._decisions.clear()
        decode_plan._decisions.update(saved)


class DecodeReplayCounter:
    """Wraps the one replay the decode plan keeps, counting the calls it serves; `intact` as ReplayCounter's."""

    def __init__(self):
        from . import decode_plan

        (self.path,) = [p for p in decode_plan._decisions.values() if p.replay not in (None, decode_plan._NO_REPLAY)]
        made, self.served = self.path.replay, 0

        def counted(*args):
            result = made(*args)
            self.served += result is not None
            return result

        self.replay = self.path.replay = counted

    @property
    def intact(self) -> bool:
        return self.path.replay is self.replay
