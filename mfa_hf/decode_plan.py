"""A decode step's plan: built once per step, run by every layer (FlashInfer's plan/run split).

Every layer of one decode step attends the same batch with the same query length and the same left
padding; only its K/V (and, for hybrid models, its window and cache length) differ. The plan holds
what the layers share: the row groups (rows with equal left padding, as device index vectors made
once), the length vectors each group's decode needs (made once per distinct length), the path
chosen for each kind of layer (routing and dispatch run once per kind, not per layer: the platform's
own kernel where routes.py finds it exact, else one of our backends), and the inputs it checked
(validation runs once per kind). `plan.run(q, layer)` then only builds the call and launches.

Left padding is expressed without a mask: a row whose first `pad` keys are padding sees keys from
`pad` on, i.e. its window's left span is capped at L - 1 - pad (one query row per step, as batched
generate has). The window arithmetic of a two-part cache (quantized prefix + full-precision residual)
and the merge of the parts live in the kernels package (kernels/merge.py): nothing here computes
attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import dispatch, kvcache, native, ops, routes, trace
from .decisions import Decisions, steering_environment
from .kernels.contract import CacheSide, DecodeCall, Options
from .ops import describe_decode
from .problem import AttentionProblem


# A layer's kind (dtypes, shapes, strides, formats, window, host row groups, steering environment) -> its
# checked path (_LayerPath: route, dispatch.Backend or None when native, problem, replay). Shared by every plan,
# so an unmasked decode, which has no step object to hold a plan, also checks and routes once per kind
# (decisions.py).
_decisions = Decisions()


@dataclass
class _LayerPath:
    """A kind of layer's checked path: the route, our backend (None when native), the problem the trace names, and
    the backend's replay of its launch (ops.EagerShortcut.replay_for): None until made, _NO_REPLAY where the kind
    can have none. A call the replay declines takes the full path."""

    route: routes.Route
    backend: Optional[dispatch.Backend]
    problem: AttentionProblem
    replay: Optional[Callable]


def _no_replay(q, keys, values, lengths):
    return None


_NO_REPLAY = _no_replay


@dataclass(frozen=True)
class RowGroup:
    """Rows with `pad` padding keys at their start: `rows` int32 on the device (None: every row)."""

    pad: int
    rows: Optional[Tensor] = None
    host_rows: Optional[tuple[int, ...]] = None


@dataclass(frozen=True)
class LayerKV:
    """One layer's cache as the decode reads it (batch-first, (B, S, Hkv, D)).

    keys/values: the plain cache or a quantized store's sides (None when nothing is stored yet);
    length: the valid keys of that part (the same for every row); residual: the newest tokens in full
    precision, (k, v) (B, r, Hkv, D), or None."""

    keys: Optional[CacheSide]
    values: Optional[CacheSide]
    length: int
    residual: Optional[tuple[Tensor, Tensor]] = None

    @property
    def total(self) -> int:
        return self.length + (0 if self.residual is None else self.residual[0].shape[1])


def group_rows(pads: Sequence[int], device) -> tuple[RowGroup, ...]:
    """Row groups from each row's padding count (host ints): one group when every row has the same."""
    if len(set(pads)) <= 1:
        return (RowGroup(pads[0] if pads else 0),)
    groups = []
    for pad in sorted(set(pads)):
        host = tuple(b for b, p in enumerate(pads) if p == pad)
        groups.append(RowGroup(pad, torch.tensor(host, dtype=torch.int32, device=device), host))
    return tuple(groups)


class DecodePlan:
    """What the layers of one decode step share (see the module docstring)."""

    def __init__(self, batch: int, q_len: int, groups: tuple[RowGroup, ...] = (RowGroup(0),)):
        self.batch, self.q_len, self.groups = batch, q_len, groups
        if q_len > 1 and any(group.pad for group in groups):
            raise NotImplementedError(f"left padding with {q_len} query tokens per step is not supported by the "
                                      "decode plan (one token per step is)")
        self._lengths: dict = {}  # (group index, length, device) -> int32 vector
        # The route of the latest layer run when the platform's kernel served it, else None: a caller can replay
        # that kind of layer without the plan (integrations/transformers/decode.py).
        self.native_route: Optional[routes.Route] = None

    def run(self, q: Tensor, layer: LayerKV, *, scale: float, window_left: int = -1, causal: bool = True,
            softcap: float = 0.0, sinks: Optional[Tensor] = None) -> Tensor:
        """q (B, Lq, Hq, D) over `layer` -> (B, Lq, Hq, Dv). window_left: keys visible left of the
        query (-1: all); causal: no key right of it (a decode query is the newest token)."""
        results = []
        for index, group in enumerate(self.groups):
            q_rows = q if group.rows is None else q.index_select(0, group.rows)
            results.append(self._run_group(index, group, q_rows, layer, scale, window_left, causal, softcap, sinks))
        if len(results) == 1:
            return results[0]
        out = results[0].new_empty((q.shape[0],) + results[0].shape[1:])
        for group, part in zip(self.groups, results):
            out[group.rows] = part
        return out

    def _run_group(self, index, group, q, layer, scale, window_left, causal, softcap, sinks) -> Tensor:
        total = layer.total
        left = window_left
        if group.pad:  # keys [0, pad) are padding: the query (key total - 1) reaches back total - 1 - pad keys
            if group.pad >= total:
                raise ValueError(f"attention_mask: a row sees none of its {total} keys (padding {group.pad})")
            reach = total - 1 - group.pad
            left = reach if left < 0 else min(left, reach)
        keys, values, residual = layer.keys, layer.values, layer.residual
        if keys is None:  # nothing stored yet: an empty prefix before the residual
            k_res, v_res = residual
            keys = CacheSide(k_res[:, :0], None, "none", k_res.shape[-1])
            values = CacheSide(v_res[:, :0], None, "none", v_res.shape[-1])
        # What decides the path (no tensor values): the first layer of a kind pays for checks and choice.
        kind = (group.host_rows, q.dtype, q.device, q.shape, q.stride(-1), keys.codes.shape, keys.codes.stride(-1),
                keys.format, values.codes.shape, values.codes.stride(-1), values.format, layer.length, left, causal,
                softcap, None if sinks is None else (sinks.shape, sinks.dtype, sinks.device),
                None if residual is None else residual[0].shape, steering_environment())
        path = _decisions.get(kind)
        if path is None:
            path = _decisions.keep(kind, self._choose(index, group, q, keys, values, layer, scale, left, causal,
                                                      softcap, sinks))
        traced = trace.enabled()
        if traced:
            dispatch.record_route(path.route, path.problem, "decode")
        if path.backend is None:  # the platform's kernel, exact here (routes.py): plain K/V, one row group
            self.native_route = path.route
            return native.sdpa(q, _first(keys.codes, layer.length), _first(values.codes, layer.length), None,
                               path.route, scale)
        self.native_route = None
        replay = path.replay
        if replay is not None and not traced and ops.plain_eager((q, keys.codes, values.codes)):
            result = replay(q, keys, values, self._lengths_of(index, group, layer.length, q.device))
            if result is not None:
                return result[0]
        call = self._call(index, group, q, keys, values, layer, scale, left, causal, softcap, sinks)
        out = path.backend.ops.decode(call, None)[0]
        if replay is not _NO_REPLAY and not traced:  # none yet, or one that declined (it may be stale)
            path.replay = path.backend.ops.decode.replay_for(call) or replay
        return out

    def _call(self, index, group, q, keys, values, layer, scale, left, causal, softcap, sinks) -> DecodeCall:
        options = Options(float(scale), left, 0 if causal else -1, float(softcap or 0.0))
        residual = layer.residual
        return DecodeCall(
            q, keys, values, self._lengths_of(index, group, layer.length, q.device), options, group.rows,
            sinks=sinks,
            residual_keys=None if residual is None else residual[0],
            residual_values=None if residual is None else residual[1],
            residual_lengths=None if residual is None else self._lengths_of(index, group, residual[0].shape[1],
                                                                             q.device))

    def _choose(self, index, group, q, keys, values, layer, scale, left, causal, softcap, sinks):
        """Check the inputs of this kind of layer and pick its path: (Route, our backend or None when the route is
        native, the problem the trace names)."""
        call = self._call(index, group, q, keys, values, layer, scale, left, causal, softcap, sinks)
        kvcache.check_decode_call(call, group.host_rows)
        problem = describe_decode(call)
        other = ""
        if group.rows is not None:
            other = "left-padded rows (each row its own key range)"
        elif layer.residual is not None:
            other = "a two-part cache (quantized prefix + residual)"
        plain = AttentionProblem(**{**problem.__dict__, "seqlen_k": layer.length})
        route = dispatch.route(plain, other_reason=other,
                               unit_stride=routes.unit_last_stride(q, keys.codes, values.codes))
        backend = None if route.native else dispatch.select(problem)
        # Only a plain layer (one row group, no residual, no sinks) of a backend with replays can have one.
        replayable = backend is not None and backend.ops.decode.replays and not (
            group.rows is not None or layer.residual is not None or sinks is not None)
        return _LayerPath(route, backend, plain, None if replayable else _NO_REPLAY)

    def _lengths_of(self, index: int, group: RowGroup, length: int, device) -> Tensor:
        key = (index, length, device)
        lengths = self._lengths.get(key)
        if lengths is None:
            rows = self.batch if group.rows is None else len(group.host_rows)
            lengths = self._lengths[key] = torch.full((rows,), length, dtype=torch.int32, device=device)
        return lengths


def _first(codes: Tensor, length: int) -> Tensor:
    """The first `length` slots of a plain cache (B, S, Hkv, D); the tensor itself when it holds no more (a slice
    costs about a microsecond of host time, paid by every layer)."""
    return codes if codes.shape[1] == length else codes[:, :length]
