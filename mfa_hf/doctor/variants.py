"""The kernel variants the dispatcher can pick, enumerated from the variant classes' own fields.

Each family is one source file and its variant dataclass (ForwardVariant, BackwardVariant,
DecodeVariant, AppendVariant). Its fields are read with `dataclasses.fields`; each gets the values
the dispatcher can give it (DOMAINS below, from the backend's own tables: MSL_TYPES, MASK_KINDS,
FORMAT_CODES, rows_per_tile); a field added later that is not known here gets (False, True) when it
is a bool and its default otherwise (the report says so).

- full (the default on a Mac): every dtype x head-dim pair meets every value of every other field,
  and every two other fields' values meet at least once (a pairwise covering array; covering.py).
- quick: every dtype, every head dim of QUICK_HEAD_DIMS and every value of every field at least once.

Variants that compile the same code (the same source and #defines) are compiled once.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .covering import Field, covering

# The head dims people use, an odd one (not a multiple of 8) and an MLA pair (D_qk != D_v).
HEAD_DIMS = ((32, 32), (64, 64), (72, 72), (80, 80), (96, 96), (100, 100), (128, 128), (160, 160),
             (192, 192), (256, 256), (192, 128))
QUICK_HEAD_DIMS = ((64, 64), (128, 128), (100, 100), (256, 256), (192, 128))


@dataclass(frozen=True)
class Family:
    """One kernel source: the module that launches it, its variant class and its parameter count."""

    name: str
    module: str
    variant_class: str
    param_count: str  # a module attribute: a field tuple (its length is passed) or an int


FAMILIES = (
    Family("forward", "mfa_hf.kernels.metal.forward", "ForwardVariant", "PARAM_FIELDS"),
    Family("backward", "mfa_hf.kernels.metal.backward", "BackwardVariant", "BACKWARD_PARAM_FIELDS"),
    Family("decode", "mfa_hf.kernels.metal.decode", "DecodeVariant", "DECODE_PARAM_FIELDS"),
    Family("append", "mfa_hf.kernels.metal.append", "AppendVariant", "APPEND_PARAM_COUNT"),
)


@dataclass
class Planned:
    """One variant to compile (or an enumeration problem to report)."""

    family: str
    variant: Any
    param_count: int
    source: str
    id: str
    same_code: list = field(default_factory=list)  # ids of variants with identical code (not compiled again)
    error: str = ""


@dataclass
class Enumeration:
    planned: list[Planned]
    skipped: list[tuple[str, str]]  # (variant id, reason): variants the backend would not be asked to run here
    notes: list[str]  # fields enumerated at their default only, and the like
    candidates: int  # variants before removing those with identical code


def enumerate_variants(quick: bool, device_type: str, head_dims=None) -> Enumeration:
    result = Enumeration([], [], [], 0)
    for family in FAMILIES:
        try:
            module = importlib.import_module(family.module)
            cls = getattr(module, family.variant_class)
            count = getattr(module, family.param_count)
            count = count if isinstance(count, int) else len(count)
            rows = _rows(cls, quick, head_dims, result.notes)
        except Exception as error:  # an API change here must show in the report, not stop it
            result.planned.append(Planned(family.name, None, 0, "?", f"{family.name} (enumeration)",
                                          error=f"cannot enumerate {family.name} variants: {error!r}"))
            continue
        _plan_family(family, cls, count, rows, device_type, result)
    return result


def _plan_family(family: Family, cls, count: int, rows: list[dict], device_type: str, result: Enumeration) -> None:
    from mfa_hf.kernels.metal import backend

    seen: dict = {}
    source = getattr(cls, "SOURCE", "attention_forward.metal")
    for row in rows:
        values = _variant_values(cls, row)
        name = variant_id(family.name, cls, values)
        try:
            variant = cls(**values)
        except (ValueError, TypeError) as error:
            result.skipped.append((name, f"not constructible: {error}"))
            continue
        refused = _refusal(backend, device_type, values)
        if refused:
            result.skipped.append((name, refused))
            continue
        result.candidates += 1
        try:
            key = (source, tuple(sorted((k, str(v)) for k, v in variant.defines(count).items())))
        except Exception as error:  # compile_check reports the same failure for this variant
            key = (source, name)
            result.notes.append(f"{name}: defines() raised {error!r}")
        if key in seen:
            seen[key].same_code.append(name)
            continue
        seen[key] = Planned(family.name, variant, count, source, name)
        result.planned.append(seen[key])


def _refusal(backend, device_type: str, values: dict) -> str:
    """The backend's reason to refuse this dtype and head dims on this device ('' when it serves them)."""
    from mfa_hf.problem import AttentionProblem

    dims = _dims_of(values)
    problem = AttentionProblem(device_type, values["dtype"], 1, 1, 1, 1, 1, dims[0], dims[-1])
    ok, reason = backend.supports(problem)
    return "" if ok else f"not served here: {reason}"


def _rows(cls, quick: bool, head_dims, notes: list[str]) -> list[dict]:
    dims = tuple(head_dims or (QUICK_HEAD_DIMS if quick else HEAD_DIMS))
    names = [f.name for f in dataclasses.fields(cls)]
    dim_names = _dim_names(names)
    dim_values = dims if len(dim_names) == 2 else tuple(dict.fromkeys((d[0],) for d in dims))
    dtypes = _dtypes()
    fields = []
    if quick:
        fields += [Field("dtype", lambda row: dtypes, dtypes), Field("dims", lambda row: dim_values, dim_values)]
    else:
        shapes = tuple((dtype, d) for dtype in dtypes for d in dim_values)
        fields.append(Field("shape", lambda row: shapes, shapes))
    for f in dataclasses.fields(cls):
        if f.name in ("dtype", *dim_names):
            continue
        fields.append(_field(f, notes, cls.__name__))
    rows = covering(fields, strength=1 if quick else 2)
    for row in rows:
        dtype, chosen = (row.pop("dtype"), row.pop("dims")) if quick else row.pop("shape")
        row.update({"dtype": dtype, **dict(zip(dim_names, chosen))})
    return rows


def _dtypes() -> tuple:
    from mfa_hf.kernels.metal.loader import MSL_TYPES

    return tuple(MSL_TYPES)


def _dim_names(names: list[str]) -> tuple[str, ...]:
    if "dim_qk" in names and "dim_v" in names:
        return ("dim_qk", "dim_v")
    if "dim" in names:
        return ("dim",)
    raise ValueError(f"expected head-dim fields (dim_qk, dim_v) or (dim), got fields {names}")


def _row_dtype(row: dict) -> torch.dtype:
    return row["dtype"] if "dtype" in row else row["shape"][0]


def _row_dims(row: dict) -> tuple:
    return row["dims"] if "dims" in row else row["shape"][1]


def _dims_of(values: dict) -> tuple:
    return (values["dim_qk"], values["dim_v"]) if "dim_qk" in values else (values["dim"],)


# ---------------------------------------------------------------------------------------------
# Field domains: what the dispatcher can put in each field, from the backend's own tables.


def _formats(dim: int) -> tuple:
    from mfa_hf.kernels.metal.binding import FORMAT_CODES
    from mfa_hf.kv_formats import spec

    return tuple(f for f in FORMAT_CODES if not spec(f).grouped or dim % min(spec(f).group_sizes) == 0)


def _all_formats(row: dict) -> tuple:
    from mfa_hf.kernels.metal.binding import FORMAT_CODES

    return tuple(FORMAT_CODES)


def _mask_kinds(row: dict) -> tuple:
    from mfa_hf.kernels.metal.loader import MASK_KINDS

    return tuple(MASK_KINDS)


def _mask_dtypes(row: dict) -> tuple:
    from mfa_hf.helper_tensors import MASK_FLOAT_DTYPES

    return tuple(MASK_FLOAT_DTYPES) if row.get("mask_kind") == "additive" else (None,)


def _every_mask_dtype(row: dict) -> tuple:
    from mfa_hf.helper_tensors import MASK_FLOAT_DTYPES

    return (None, *MASK_FLOAT_DTYPES)


def _only_with_additive(row: dict) -> tuple:
    return (False, True) if row.get("mask_kind") == "additive" else (False,)


def _rows_per_tile(dims: tuple) -> tuple:
    from mfa_hf.kernels.metal.decode import rows_per_tile

    limit = rows_per_tile(1 << 20, 1, dims[0], dims[-1])  # a group so large that the tile's limit applies
    return tuple(range(1, limit + 1))


def _per_token(row: dict) -> tuple:
    fmt = row.get("format")
    if fmt == "none":
        return (False,)
    from mfa_hf.kv_formats import spec

    return (True,) if spec(fmt).grouped else (False, True)  # grouped formats (nf4) always keep scales per token


# name -> (values given the row so far, every value it can take)
DOMAINS: dict[str, tuple[Callable[[dict], tuple], Callable[[dict], tuple]]] = {
    "mask_kind": (_mask_kinds, _mask_kinds),
    "mask_dtype": (_mask_dtypes, _every_mask_dtype),
    "want_mask_grad": (_only_with_additive, lambda row: (False, True)),
    "k_format": (lambda row: _formats(_row_dims(row)[0]), _all_formats),
    "v_format": (lambda row: _formats(_row_dims(row)[-1]), _all_formats),
    "format": (lambda row: _formats(_row_dims(row)[0]), _all_formats),
    "rows": (lambda row: _rows_per_tile(_row_dims(row)), lambda row: _rows_per_tile((1, 1))),
    "per_token": (_per_token, lambda row: (False, True)),
}


def _field(f: dataclasses.Field, notes: list[str], owner: str) -> Field:
    if f.name in DOMAINS:
        values, every = DOMAINS[f.name]
        return Field(f.name, values, every({}))
    if f.type in ("bool", bool) or isinstance(f.default, bool):
        both = (False, True)
        return Field(f.name, lambda row: both, both)
    if f.default is dataclasses.MISSING:
        raise ValueError(f"{owner}.{f.name}: no default and no known values (add it to doctor/variants.py DOMAINS)")
    notes.append(f"{owner}.{f.name}: only its default {f.default!r} (the dispatcher passes nothing else)")
    default = (f.default,)
    return Field(f.name, lambda row: default, default)


def _variant_values(cls, row: dict) -> dict:
    return {f.name: row[f.name] for f in dataclasses.fields(cls) if f.name in row}


def short(value) -> str:
    if isinstance(value, torch.dtype):
        return {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}.get(value, str(value))
    return str(value)


def variant_id(family: str, cls, values: dict) -> str:
    """`forward f16 d64 mask=additive(bf16) softcap`: the fields that differ from their defaults."""
    dims = _dims_of(values)
    parts = [family, short(values["dtype"]), "d" + "x".join(str(d) for d in dict.fromkeys(dims))]
    for f in dataclasses.fields(cls):
        if f.name in ("dtype", "dim_qk", "dim_v", "dim"):
            continue
        value = values.get(f.name, f.default)
        if f.name == "mask_dtype":
            continue  # shown with the mask kind
        if f.name == "mask_kind" and value != "none":
            dtype = values.get("mask_dtype")
            parts.append(f"mask={value}" + (f"({short(dtype)})" if dtype is not None else ""))
        elif isinstance(value, bool):
            if value:
                parts.append(f.name)
        elif f.default is dataclasses.MISSING or value != f.default:
            parts.append(f"{f.name}={short(value)}")
    return " ".join(parts)
