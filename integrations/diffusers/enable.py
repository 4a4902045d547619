"""`enable(pipe_or_model)`: every attention module gets our processor or backend; a handle restores.

What each module gets is decided by the processor it has now, which names the contract it follows:

    AttnProcessor2_0, AttnProcessor        -> MFAProcessor
    JointAttnProcessor2_0                  -> MFAJointAttnProcessor
    CogVideoXAttnProcessor2_0              -> MFACogVideoXAttnProcessor
    a dispatcher processor (a per-processor backend; Flux, Wan, LTX, QwenImage, ...)
                                           -> its own backend set to "mfa" (per processor; the global
                                              active backend is left alone)
    another processor whose __call__ calls F.scaled_dot_product_attention (AuraFlow, CogView4,
    HunyuanDiT, Lumina 2, HiDream, IP-Adapter, ...), or the dispatcher without a backend of its own (Cosmos)
                                           -> the same processor under a class whose SDPA calls are routed
                                              to our kernels (routed.py)

and a diffusers module with no processor whose own forward calls F.scaled_dot_product_attention (the Wan,
QwenImage and HunyuanImage VAEs' attention blocks, ...), or with a routable processor but no set_processor
(Mochi's attention, the Cosmos VAE's), has its forward's SDPA calls routed the same way, by two forward hooks
(routed_modules.py).

Anything else (linear attention, xformers, sliced, ...) is left as it is and listed in
`handle.skipped` (or refused with strict=True). Every check runs before anything is changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from . import internals, routed, routed_modules
from .contracts import ContractMismatch
from .dispatcher import BACKEND_NAME
from .processors import MFACogVideoXAttnProcessor, MFAJointAttnProcessor, MFAProcessor

OUR_PROCESSORS = (MFAProcessor, MFAJointAttnProcessor, MFACogVideoXAttnProcessor)


def replacement_table() -> dict[type, type]:
    """Upstream processor class -> ours. Exact classes: a subclass may have changed the contract."""
    from diffusers.models import attention_processor as upstream

    return {
        upstream.AttnProcessor2_0: MFAProcessor,
        upstream.AttnProcessor: MFAProcessor,
        upstream.JointAttnProcessor2_0: MFAJointAttnProcessor,
        upstream.CogVideoXAttnProcessor2_0: MFACogVideoXAttnProcessor,
    }


@dataclass
class MFAHandle:
    """What enable()/set_processor() changed; restore() (or leaving the `with` block) undoes it."""

    processors: list = field(default_factory=list)  # (module name, module, original processor)
    backends: list = field(default_factory=list)  # (module name, processor, original instance value)
    skipped: dict = field(default_factory=dict)  # module name -> processor class left in place
    modules: list = field(default_factory=list)  # (module name, module, hook handles): processor-less, routed

    def restore(self) -> None:
        for _, module, original in reversed(self.processors):
            module.set_processor(original)
        for _, processor, original in reversed(self.backends):
            internals.set_backend(processor, original)
        for _, module, hooks in reversed(self.modules):
            routed_modules.unroute_module(module, hooks)
        self.processors, self.backends, self.modules = [], [], []

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name, module, _ in self.processors:
            kind = type(module.processor).__name__
            counts[kind] = counts.get(kind, 0) + 1
        if self.backends:
            counts["dispatcher backend 'mfa'"] = len(self.backends)
        for _, module, _ in self.modules:
            kind = f"{type(module).__name__} (its own SDPA calls routed)"
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def __enter__(self) -> "MFAHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def enable(pipe_or_model, strict: bool = False) -> MFAHandle:
    """Give every diffusers attention module of a pipeline (or one model) our kernel."""
    table = replacement_table()
    shared = {cls: cls() for cls in OUR_PROCESSORS}  # one instance per contract, as set_attn_processor does
    handle, swaps, routed_hooks = MFAHandle(), [], []
    for name, module in attention_modules(pipe_or_model):
        current = module.processor
        if isinstance(current, OUR_PROCESSORS) or routed.is_routed(current):
            continue
        if internals.uses_dispatcher(current):
            if _names_mfa(internals.own_backend(current)):
                # already on "mfa" (an earlier enable(), whose handle restores it, or set_attention_backend): recording
                # "mfa" as its original left it there after both handles restored
                continue
            pinned = internals.pinned_backends(current)
            if pinned is not None and BACKEND_NAME not in pinned:  # e.g. a flex BlockMask: only that backend reads it
                handle.skipped[name] = f"{type(current).__name__} (works only with the {', '.join(pinned)} backend)"
            else:
                handle.backends.append((name, current, internals.own_backend(current)))
        elif not hasattr(module, "set_processor"):  # its processor cannot be swapped (Mochi's, Cosmos VAE's)
            if routed.routable(current):  # but its SDPA calls can be routed, around the module's forward
                routed_hooks.append((name, module))
            else:
                handle.skipped[name] = f"{type(current).__name__} (the module has no set_processor)"
        elif type(current) in table:
            swaps.append((name, module, shared[table[type(current)]]))
        elif routed.routable(current):
            swaps.append((name, module, routed.routed(current)))
        else:
            handle.skipped[name] = type(current).__name__
    if strict and handle.skipped:
        raise ContractMismatch(f"enable(strict=True): expected every attention module to follow a contract "
                               f"mfa_hf serves, got {_listing(handle.skipped)}")
    _check_all(swaps)
    member = internals.register_mfa_backend() if handle.backends else None  # may raise: nothing changed yet
    for name, processor, _ in handle.backends:
        internals.set_backend(processor, member)
    _apply(handle, swaps)
    for name, module in routed_hooks + list(_processorless_sdpa_modules(pipe_or_model)):
        if not routed_modules.is_routed_module(module):
            handle.modules.append((name, module, routed_modules.route_module(module)))
    return handle


def _names_mfa(backend) -> bool:
    return getattr(backend, "value", backend) == BACKEND_NAME


def _processorless_sdpa_modules(pipe_or_model):
    """Modules with no processor that call SDPA themselves. A processor that is a module (IP-Adapter's) is not one
    of them: it is a module's `processor`, decided on with that module (routable_module skips modules holding a
    processor, and this skips the processors they hold)."""
    for prefix, component in _components(pipe_or_model):
        held = set()
        for name, module in component.named_modules():
            if callable(getattr(module, "processor", None)):
                held.add(id(module.processor))
            elif id(module) not in held and routed_modules.routable_module(module):
                yield f"{prefix}{name}", module


def follows_contract(current, processor) -> bool:
    """Whether a module's current processor computes what `processor` (ours) serves: the same class, or the
    upstream class it replaces (replacement_table)."""
    return type(current) is type(processor) or replacement_table().get(type(current)) is type(processor)


def set_processor(model: nn.Module, processor) -> MFAHandle:
    """`model.set_attn_processor(processor)`, but checked at set time against every module's contract."""
    if not isinstance(processor, OUR_PROCESSORS):
        raise TypeError(f"processor: expected one of {[c.__name__ for c in OUR_PROCESSORS]}, "
                        f"got {type(processor).__name__}")
    handle, swaps, wrong = MFAHandle(), [], {}
    for name, module in attention_modules(model):
        current_cls = type(module.processor)
        if not hasattr(module, "set_processor"):
            wrong[name] = f"{current_cls.__name__} (the module has no set_processor)"
        elif not follows_contract(module.processor, processor):
            wrong[name] = current_cls.__name__
        swaps.append((name, module, processor))
    if wrong:
        raise ContractMismatch(f"{type(processor).__name__}: serves {processor.serves}, but these modules follow "
                               f"another one: {_listing(wrong)}; use enable(model) to pick per module")
    _check_all(swaps)
    _apply(handle, swaps)
    return handle


def attention_modules(pipe_or_model):
    """(qualified name, module) for every diffusers attention module of a pipeline or a model: a module holding a
    callable `processor` (most also have set_processor; Mochi's attention has none, and is listed all the same,
    so that enable() reports it instead of passing it over)."""
    for prefix, component in _components(pipe_or_model):
        for name, module in component.named_modules():
            if callable(getattr(module, "processor", None)):
                yield f"{prefix}{name}", module


def _components(pipe_or_model):
    if isinstance(pipe_or_model, nn.Module):
        return [("", pipe_or_model)]
    components = getattr(pipe_or_model, "components", None)
    if not isinstance(components, dict):
        raise TypeError(f"pipe_or_model: expected a diffusers pipeline (with .components) or a torch.nn.Module, "
                        f"got {type(pipe_or_model).__name__}")
    return [(f"{key}.", value) for key, value in components.items() if isinstance(value, nn.Module)]


def _check_all(swaps) -> None:
    for name, module, processor in swaps:
        if routed.is_routed(processor):  # the upstream processor itself runs: its own contract
            continue
        try:
            processor.check(module)
        except ContractMismatch as error:
            raise ContractMismatch(f"{name}: {error}") from None


def _apply(handle: MFAHandle, swaps) -> None:
    for name, module, processor in swaps:
        handle.processors.append((name, module, module.processor))
        module.set_processor(processor)


def _listing(modules: dict, limit: int = 5) -> str:
    items = [f"{name} ({cls})" for name, cls in list(modules.items())[:limit]]
    more = f" and {len(modules) - limit} more" if len(modules) > limit else ""
    return ", ".join(items) + more
