"""Every private diffusers name this integration touches, and the probe that decides whether to.

The private tier: the "mfa" member added to diffusers' closed `AttentionBackendName` Enum and our
function in its `_AttentionBackendRegistry`; a dispatcher processor's `_attention_backend` (what
enable() sets per processor); and the set-time wrappers on the diffusers methods that attach
processors (set_time.py builds them). No other file in this folder names a private diffusers
attribute (model_tests/diffusers/test_private_names.py enforces it), so a release that moves one
breaks here, in one place, and the probe names it.

Nothing here is gated by diffusers' version number. `probe()` runs once, when the package is
imported: it checks that every name we touch exists with the signature we use, registers the
backend, checks that diffusers' lookups find it, and runs one tiny attention through diffusers'
dispatcher with backend "mfa" and with "native" (torch SDPA), which must agree. If all holds, the
backend stays registered and the set-time wrappers are installed; if not, both are taken back and
the private features raise UnsupportedDiffusersInternals naming the check that failed. A release
outside compat.TESTED_DIFFUSERS, or a failed probe, earns one RuntimeWarning. The processors never
depend on any of this.
"""

from __future__ import annotations

import inspect
import os
import types
import warnings

import torch

from . import set_time
from .compat import ProbeResult, UnsupportedDiffusersInternals, installed_diffusers_version
from .dispatcher import BACKEND_NAME, mfa_attention

_MEMBER_NAME = "MFA"
_BACKEND_ATTR = "_attention_backend"  # also what diffusers' ModelMixin.set_attention_backend sets
MISSING = object()  # a processor without its own backend (it reads the class default)

_result: ProbeResult | None = None


# ---- A dispatcher processor's own backend (enable.py, contracts.py)

def uses_dispatcher(processor) -> bool:
    """Processors that call diffusers' dispatcher (Flux, Wan, ...) carry a per-processor backend."""
    return hasattr(processor, _BACKEND_ATTR)


_SUPPORTED_ATTR = "_SUPPORTED_BACKENDS"  # a processor that works only with the backends it names (AnyFlow's: flex)


def pinned_backends(processor) -> tuple | None:
    """The backends a dispatcher processor is limited to, or None when it takes any: the ones its class lists, or
    the backend its class defaults to when that is not None (a processor that builds inputs only that backend
    reads, such as flex's BlockMask)."""
    cls = type(processor)
    listed = getattr(cls, _SUPPORTED_ATTR, None)
    if listed is not None:
        return tuple(str(getattr(name, "value", name)) for name in listed)
    default = getattr(cls, _BACKEND_ATTR, None)
    return None if default is None else (str(getattr(default, "value", default)),)


def own_backend(processor):
    return processor.__dict__.get(_BACKEND_ATTR, MISSING)


def set_backend(processor, backend) -> None:
    """Give the processor its own backend; MISSING takes it away (back to the class default)."""
    if backend is MISSING:
        processor.__dict__.pop(_BACKEND_ATTR, None)
    else:
        setattr(processor, _BACKEND_ATTR, backend)


# ---- The public entry points of the private tier

def probe() -> ProbeResult:
    """The cached outcome of the contract probe; the first call runs it (and warns, at most once)."""
    global _result
    if _result is None:
        _result = _run_probe()
        message = _result.warning()
        if message is not None:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
    return _result


def reset_probe() -> None:
    """Forget the outcome: the next probe() checks, registers and warns again (tests use it)."""
    global _result
    _result = None


def require(feature: str):
    """The backend's Enum member; UnsupportedDiffusersInternals naming `feature` if the probe failed."""
    result = probe()
    if not result.ok:
        raise result.error(feature)
    return _diffusers().enum(BACKEND_NAME)


def register_mfa_backend():
    """Make sure "mfa" is in diffusers' backend Enum and registry; returns the Enum member."""
    return require("the 'mfa' attention backend")


def install_set_time_checks() -> None:
    _install_set_time(_diffusers())


def uninstall_set_time_checks() -> None:
    _uninstall_set_time(_diffusers())


# ---- The names we touch

def _diffusers():
    """Every diffusers object the private tier uses; an ImportError/AttributeError means one moved."""
    from diffusers.models import attention, attention_dispatch, attention_processor
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return types.SimpleNamespace(
        enum=attention_dispatch.AttentionBackendName, registry=attention_dispatch._AttentionBackendRegistry,
        dispatch=attention_dispatch.dispatch_attention_fn, dispatcher_processor=FluxAttnProcessor,
        templated=getattr(attention_dispatch, "_templated_context_parallel_attention", None),
        attach_methods=((attention_processor.Attention, "set_processor"),
                        (attention.AttentionModuleMixin, "set_processor"),
                        (attention.AttentionMixin, "set_attn_processor")))


def _extend_enum(enum_cls):
    existing = enum_cls._value2member_map_.get(BACKEND_NAME)
    if existing is not None:
        return existing
    member = str.__new__(enum_cls, BACKEND_NAME)
    member._name_, member._value_ = _MEMBER_NAME, BACKEND_NAME
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, _MEMBER_NAME, member)  # EnumType.__setattr__ refuses new members
    enum_cls._member_map_[_MEMBER_NAME] = member
    enum_cls._value2member_map_[BACKEND_NAME] = member
    enum_cls._member_names_.append(_MEMBER_NAME)
    return member


def _register(d):
    member = _extend_enum(d.enum)
    if d.registry._backends.get(member) is not mfa_attention:
        supported = not _context_parallel_reason(d)  # declared only where the templates' contract holds
        d.registry.register(member, constraints=[], supports_context_parallel=supported)(mfa_attention)
    return member


def _unregister(d) -> None:
    """Take "mfa" out of the registry and the Enum, so diffusers' own entry points refuse it."""
    member = d.enum._value2member_map_.pop(BACKEND_NAME, None)
    if member is not None:
        for table in (d.registry._backends, d.registry._constraints, d.registry._supported_arg_names):
            table.pop(member, None)
        getattr(d.registry, "_supports_context_parallel", set()).discard(BACKEND_NAME)
    d.enum._member_map_.pop(_MEMBER_NAME, None)
    if _MEMBER_NAME in d.enum._member_names_:
        d.enum._member_names_.remove(_MEMBER_NAME)
    if _MEMBER_NAME in d.enum.__dict__:
        type.__delattr__(d.enum, _MEMBER_NAME)


def _install_set_time(d) -> None:
    for cls, name in d.attach_methods:
        current = cls.__dict__.get(name)
        if current is not None and not set_time.is_wrapper(current):
            setattr(cls, name, set_time.wrap(name, current))


def _uninstall_set_time(d) -> None:
    for cls, name in d.attach_methods:
        current = cls.__dict__.get(name)
        if current is not None and set_time.is_wrapper(current):
            setattr(cls, name, set_time.original(current))


# ---- Context parallelism (context_parallel.py): diffusers' templates and its process groups

_TEMPLATE_KEYWORDS = {"forward_op", "backward_op", "_parallel_config"}
_CP_FIELDS = ("_ring_mesh", "_ulysses_mesh")


def _context_parallel_reason(d) -> str:
    """Why diffusers' context-parallel templates cannot call us ("" when they can): the template function
    with forward_op/backward_op keywords, the registry's set of CP backends, the config's meshes."""
    if d.templated is None:
        return "expected attention_dispatch._templated_context_parallel_attention, got none"
    missing = _TEMPLATE_KEYWORDS - inspect.signature(d.templated).parameters.keys()
    if missing:
        return f"expected _templated_context_parallel_attention to take {sorted(missing)}, got none"
    if not isinstance(getattr(d.registry, "_supports_context_parallel", None), set):
        return "expected _AttentionBackendRegistry._supports_context_parallel to be a set, got none"
    from diffusers import ContextParallelConfig

    fields = getattr(ContextParallelConfig, "__dataclass_fields__", {})
    absent = [name for name in _CP_FIELDS if name not in fields]
    return f"expected ContextParallelConfig fields {absent}, got none" if absent else ""


def require_context_parallel():
    """The template function, or UnsupportedDiffusersInternals naming what moved."""
    require("context parallelism with the 'mfa' backend")
    d = _diffusers()
    reason = _context_parallel_reason(d)
    if reason:
        raise UnsupportedDiffusersInternals(f"context parallelism with the 'mfa' backend: {reason}")
    return d.templated


def context_parallel_groups(parallel_config):
    """(ring group, ring degree, ulysses group, ulysses degree) of a parallel config diffusers set up."""
    cp = parallel_config.context_parallel_config
    return (cp._ring_mesh.get_group(), cp.ring_degree, cp._ulysses_mesh.get_group(), cp.ulysses_degree)


# ---- The probe: each check raises (any exception) when the contract does not hold

class _Broken(Exception):
    pass


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise _Broken(message)


def _check_registry(d) -> None:
    signature = inspect.signature(d.registry.register)
    _expect({"backend", "constraints", "supports_context_parallel"} <= signature.parameters.keys(),
            f"expected register(backend, constraints, supports_context_parallel), got register{signature}")
    for table in ("_backends", "_constraints", "_supported_arg_names"):
        found = getattr(d.registry, table, None)
        _expect(isinstance(found, dict), f"expected _AttentionBackendRegistry.{table} to be a dict, "
                                         f"got {type(found).__name__}")


def _check_enum(d) -> None:
    _expect(issubclass(d.enum, str), "expected AttentionBackendName to be a str Enum, got another base")
    for name, kind in (("_member_map_", dict), ("_value2member_map_", dict), ("_member_names_", list)):
        found = getattr(d.enum, name, None)
        _expect(isinstance(found, kind), f"expected AttentionBackendName.{name} to be a {kind.__name__}, "
                                         f"got {type(found).__name__}")


_DISPATCH_PARAMETERS = {"query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa",
                        "attention_kwargs", "backend"}


def _check_dispatch_signature(d) -> None:
    signature = inspect.signature(d.dispatch)
    missing = _DISPATCH_PARAMETERS - signature.parameters.keys()
    _expect(not missing, f"expected dispatch_attention_fn to take {sorted(missing)}, "
                         f"got dispatch_attention_fn{signature}")


def _check_processor_attribute(d) -> None:
    _expect(hasattr(d.dispatcher_processor, _BACKEND_ATTR),
            f"expected {d.dispatcher_processor.__name__}.{_BACKEND_ATTR} (a processor's own backend), got none")


def _check_attach_methods(d) -> None:
    for cls, name in d.attach_methods:
        method = cls.__dict__.get(name)
        if method is not None and set_time.is_wrapper(method):
            method = set_time.original(method)
        _expect(callable(method) and "processor" in inspect.signature(method).parameters,
                f"expected {cls.__name__} to define {name}(self, processor, ...), got {method!r}")


def _check_lookups(d, member) -> None:
    """Every lookup diffusers performs (Enum call, iteration, value set, registry tables) finds us."""
    _expect(d.enum(BACKEND_NAME) is member and member in list(d.enum)
            and BACKEND_NAME in {m.value for m in d.enum.__members__.values()},
            f"expected AttentionBackendName('{BACKEND_NAME}') to resolve after extending the Enum, got no member")
    _expect(BACKEND_NAME in d.registry._backends and d.registry._backends[member] is mfa_attention,
            "expected _AttentionBackendRegistry._backends to hold mfa_attention under 'mfa', got another entry")
    declared = set(inspect.signature(mfa_attention).parameters)
    found = d.registry._supported_arg_names.get(member)
    _expect(found == declared, f"expected the registry to record mfa_attention's parameters {sorted(declared)}, "
                               f"got {sorted(found or ())}")


def _tiny_problem():
    """(B, S, H, D) float32 on the CPU whatever the defaults: GQA (4 query heads, 2 KV), 2 keys masked."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 4, 8, generator=generator, dtype=torch.float32, device="cpu")
    key, value = (torch.randn(1, 6, 2, 8, generator=generator, dtype=torch.float32, device="cpu") for _ in range(2))
    keep = torch.ones(1, 6, dtype=torch.bool, device="cpu")
    keep[0, 4:] = False
    return query, key, value, keep


def _check_dispatch_keywords(d, member) -> None:
    """return_lse reaches us through attention_kwargs, and a keyword we do not declare is dropped."""
    query, key, value, _ = _tiny_problem()
    with torch.no_grad():
        result = d.dispatch(query, key, value, enable_gqa=True, backend=member,
                            attention_kwargs={"return_lse": True, "mfa_probe_undeclared": None})
    _expect(isinstance(result, tuple) and len(result) == 2 and tuple(result[1].shape) == (1, 4, 4),
            f"expected (out, lse (1, 4, 4)) for return_lse=True, got {type(result).__name__}")


def _check_equality(d, member) -> None:
    query, key, value, keep = _tiny_problem()
    options = dict(attn_mask=keep, scale=0.3, enable_gqa=True)
    with torch.no_grad():
        ours = d.dispatch(query, key, value, backend=member, **options)
        native = d.dispatch(query, key, value, backend=d.enum.NATIVE, **options)
    _expect(ours.shape == native.shape, f"expected 'mfa' to return {tuple(native.shape)} like 'native', "
                                        f"got {tuple(ours.shape)}")
    difference = (ours - native).abs().max().item()
    _expect(difference <= 1e-4, f"expected 'mfa' to equal 'native' on a masked GQA call within 1e-4, "
                                f"got a max difference of {difference:.3g}")


_NAME_CHECKS = (("_AttentionBackendRegistry.register", _check_registry),
                ("AttentionBackendName Enum", _check_enum),
                ("dispatch_attention_fn signature", _check_dispatch_signature),
                ("processor._attention_backend", _check_processor_attribute),
                ("set_processor/set_attn_processor", _check_attach_methods))
_BEHAVIOUR_CHECKS = (("backend lookups", _check_lookups),
                     ("dispatcher keywords", _check_dispatch_keywords),
                     ("equality with 'native'", _check_equality))


ENV_BACKEND = "DIFFUSERS_ATTN_BACKEND"
ENV_BACKEND_REASON = (
    "DIFFUSERS_ATTN_BACKEND=mfa: diffusers reads it when it is first imported, before mfa_hf can add 'mfa' to its "
    "closed list of backend names, so diffusers itself fails to import ('mfa' is not a valid AttentionBackendName). "
    "Unset it, and select the backend in code: `with attention_backend('mfa'):`, `model.set_attention_backend('mfa')` "
    "or `mfa_hf.integrations.diffusers.enable(pipe)`")


def _run_probe() -> ProbeResult:
    version, step, d = installed_diffusers_version(), "diffusers names", None
    try:
        d = _diffusers()
        for step, check in _NAME_CHECKS:
            check(d)
        step = "backend registration"
        member = _register(d)
        for step, check in _BEHAVIOUR_CHECKS:
            check(d, member)
        step = "set-time wrappers"
        _install_set_time(d)
    except Exception as error:  # any failure means the contract differs: record it, never raise here
        _take_back(d)
        reason = str(error) if isinstance(error, _Broken) else f"{type(error).__name__}: {error}"
        if d is None and os.environ.get(ENV_BACKEND, "").strip().lower() == "mfa":
            step, reason = ENV_BACKEND, ENV_BACKEND_REASON  # not the release: diffusers fails its own import
        return ProbeResult(version, failed=step, reason=reason)
    return ProbeResult(version)


def _take_back(d) -> None:
    """Undo what a failed probe may have done; best effort, since the failure may be in these names."""
    if d is None:
        return
    for undo in (_unregister, _uninstall_set_time):
        try:
            undo(d)
        except Exception:
            pass
