"""Every private transformers name mfa-hf touches, and the probe that decides whether to touch them.

This is the only module of the integration allowed to name a private transformers attribute
(`tests/test_private_names.py` checks it). Everything else goes through the functions here.

Policy (issue 15): no version list decides anything. `probe()` checks the exact contract we rely on:
the names and signatures touched below, then one tiny attention run through the "mps_flash" hook
compared with transformers' own eager attention. A release we never tested gets one RuntimeWarning
naming it and works when the probe passes; when the probe fails, "mps_flash" is refused at model
init with `ContractError` (our message: version, failed check, alternatives). The public tier ("mfa"
through AttentionInterface, MFAQuantizedCache) does not depend on any of this.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

TESTED = ("5.17", "5.24", "5.25")
"""major.minor releases the whole model_tests/transformers suite passed on (5.17 is the floor)."""

ALTERNATIVES = ('attn_implementation="mfa" (the same kernels through transformers\' public AttentionInterface) '
                'or "sdpa"')


class ContractError(RuntimeError):
    """The installed transformers does not have the private contract "mps_flash" relies on."""


@dataclass(frozen=True)
class ProbeResult:
    version: str
    failed: str | None = None  # name of the first check that failed
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.failed is None

    def error(self, name: str) -> ContractError:
        return ContractError(
            f'attn_implementation="{name}" is not available with transformers {self.version}: the contract probe '
            f'"{self.failed}" failed ({self.reason}). mfa-hf hooks transformers\' private FlashAttention plumbing for '
            f"this name and checks it before use; this release changed it. Use {ALTERNATIVES}, or a tested "
            f"transformers release ({', '.join(TESTED)}).")


def installed_version() -> str:
    import transformers

    return transformers.__version__


def minor(version: str) -> str:
    major, rest = version.split(".")[:2]
    return f"{major}.{''.join(ch for ch in rest if ch.isdigit()) or 0}"


def is_tested(version: str) -> bool:
    return minor(version) in TESTED


# -- the names, each touched in exactly one place --------------------------------------------------

def _flash_utils():
    from transformers import modeling_flash_attention_utils

    return modeling_flash_attention_utils


def _pretrained_model():
    from transformers import PreTrainedModel

    return PreTrainedModel


def attn_implementation_of(module_or_model) -> str | None:
    """The implementation name a module's (or model's) config was set to."""
    return getattr(getattr(module_or_model, "config", None), "_attn_implementation", None)


def flash_attention_forward(query, key, value, attention_mask, **kwargs):
    """transformers' own flash path (unpad/varlen/packing) on (B, S, H, D) tensors."""
    return _flash_utils()._flash_attention_forward(query, key, value, attention_mask, **kwargs)


def can_set_attn_implementation(model_cls) -> bool:
    """transformers' source heuristic: does this class route attention through the interface?"""
    return model_cls._can_set_attn_implementation()


@functools.lru_cache(maxsize=None)
def modeling_source_calls_interface(model_cls) -> bool:
    """Whether the modeling file defining this class looks attention functions up in transformers'
    AttentionInterface (ALL_ATTENTION_FUNCTIONS): a release can port a model from inline attention to the
    interface (Falcon, GPT-J and CodeGen did by 5.25), so this is read, not listed per release."""
    import sys

    return _source_calls_interface(sys.modules.get(model_cls.__module__))


def _source_calls_interface(obj) -> bool:
    """Whether the source of a module or class looks attention functions up in ALL_ATTENTION_FUNCTIONS; True where
    it has no source (frozen or compiled): transformers' heuristic alone then decides."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(obj)
    except (OSError, TypeError):
        return True


def classes_call_interface(model_cls, class_names: tuple[str, ...]) -> bool:
    """Whether every named class of the modeling file defining model_cls looks attention functions up in the
    AttentionInterface (LongT5's local and transient-global encoder attention did not in 5.25, while its decoder's
    attention did): read, not listed per release. A class the file does not define counts as calling it."""
    import sys

    module = sys.modules.get(model_cls.__module__)
    classes = (getattr(module, name, None) for name in class_names)
    return all(_source_calls_interface(cls) for cls in classes if cls is not None)


@functools.lru_cache(maxsize=None)
def modeling_source_picks_attention_class_by_name(model_cls) -> bool:
    """Whether the modeling file defining this class builds some attention layer from a table keyed by the
    implementation's name (`SAM_VISION_ATTENTION_CLASSES[config._attn_implementation]`, GIT, Bark, ...): any
    other name is a KeyError there, or (after set_attn_implementation) leaves that layer on its eager class."""
    import re
    import sys

    module = sys.modules.get(model_cls.__module__)
    try:
        return re.search(r"\w+_ATTENTION_CLASSES\[", inspect.getsource(module)) is not None
    except (OSError, TypeError):  # no source: take transformers' heuristic alone
        return False


def supports_sdpa(model) -> bool:
    return bool(getattr(model, "_supports_sdpa", False))


def supports_only_eager(model) -> bool:
    """Whether transformers marks this class as supporting no attention but eager (no sdpa, flash or flex flag):
    such layers may read the mask themselves in eager's additive form (routers, inline or sparse attention)."""
    return not (supports_flash_attention(model) or supports_sdpa(model)
                or getattr(model, "_supports_flex_attn", False))


def supports_flash_attention(model) -> bool:
    """transformers marks classes whose FlashAttention path drops part of the mask (image prefixes)."""
    return bool(getattr(model, "_supports_flash_attn", False) or getattr(model, "_supports_flash_attn_2", False))


def keep_flash_name(model, name: str) -> None:
    """Models listing `_compatible_flash_implementations` (GPT-OSS: sink-capable FA kernels) make
    transformers swap any other flash name for the first entry of that list, a hub kernel. mfa-hf
    implements sinks, so add our name to this instance's list to keep the requested one."""
    compatible = getattr(model, "_compatible_flash_implementations", None)
    if compatible is not None and name not in compatible:
        model._compatible_flash_implementations = [*compatible, name]


PACKED_SEQUENCE_LEAF = "packed_sequence_mask_function.<locals>.inner_mask"

# The keyword under which sparse-attention models (DSA: DeepSeek-V3.2, GLM-MoE-DSA, Mistral Large 4, ...) hand
# the attention function their indexer's top-k key indices (B, Lq, k) when the implementation is neither eager
# nor sdpa (eager and sdpa get the selection folded into the mask instead).
SPARSE_INDICES_KWARG = "indices"
# Config fields that mark a model whose indexer reads the attention mask itself (its top-k over the mask's
# visible keys): such a model needs the dense mask eager gets, at every query length.
INDEXER_CONFIG_FIELDS = ("index_topk",)


def has_mask_reading_indexer(config) -> bool:
    return any(getattr(config, field, None) is not None for field in INDEXER_CONFIG_FIELDS)


def _cells(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def mask_leaf_functions(fn) -> list:
    """The leaf patterns inside transformers' `and_masks(...)` closures (an `or_masks` union is a leaf:
    a window cannot express it). The packed-sequence position remap (5.24+) is unwrapped: it always
    comes with the packed-sequence leaf, and inside one sequence the remapped pattern is the plain one
    (positions rise by one per token)."""
    name = getattr(fn, "__qualname__", "")
    if name == "and_masks.<locals>.and_mask" and fn.__closure__:
        inner = [value for value in _cells(fn).values() if isinstance(value, tuple)]
        if inner:
            return [leaf for f in inner[0] for leaf in mask_leaf_functions(f)]
    if name == "remap_positions_for_packed_sequence.<locals>.inner_mask" and "mask_function" in _cells(fn):
        return mask_leaf_functions(_cells(fn)["mask_function"])
    return [fn]


def mask_leaves(fn) -> list[str]:
    """Qualified names of `mask_leaf_functions(fn)`."""
    return [getattr(leaf, "__qualname__", repr(leaf)) for leaf in mask_leaf_functions(fn)]


def mask_window(fn) -> int | None:
    """The sliding window of transformers' mask pattern, in the attention-function convention (a key is
    visible when its distance is < the value): the causal overlay keeps `kv > q - w` (w), the
    bidirectional one `|q - kv| <= w` (w + 1). None without a window leaf."""
    for leaf in mask_leaf_functions(fn):
        name = getattr(leaf, "__qualname__", "")
        if name == "sliding_window_overlay.<locals>.inner_mask":
            return int(_cells(leaf)["sliding_window"])
        if name == "sliding_window_bidirectional_overlay.<locals>.inner_mask":
            return int(_cells(leaf)["sliding_window"]) + 1
    return None


def packed_sequence_ids(fn):
    """The (B, L) packed-sequence index per token that transformers' packed leaf compares, or None."""
    for leaf in mask_leaf_functions(fn):
        if getattr(leaf, "__qualname__", "") == PACKED_SEQUENCE_LEAF:
            return _cells(leaf).get("packed_sequence_mask")
    return None


def per_layer_values(config, name: str, layers: int) -> list:
    """`name` of each of `layers` layers. Heterogeneous configs (5.25's per_layer_config view: Gemma 4's 512-wide
    global layers) answer per layer, and reading such an attribute off the config itself raises (not an
    AttributeError); other configs answer once for every layer (None where absent)."""
    if not layers:
        return []
    per_layer = getattr(config, "per_layer_config", None)
    if isinstance(per_layer, Sequence) and len(per_layer) == layers:
        return [getattr(per_layer[i], name, None) for i in range(layers)]
    return [getattr(config, name, None)] * layers


def layer_types_and_kwargs(config) -> list[tuple[str, dict]]:
    """(layer type, cache-layer kwargs) per layer, as transformers' own caches build them. Up to 5.17 the
    kwargs are one dict shared by every layer (each layer class takes what its type needs); since 5.24
    they come per layer."""
    from transformers import cache_utils

    types, kwargs = cache_utils.get_layer_types_and_kwargs(config)
    if isinstance(kwargs, dict):
        return [(kind, _shared_layer_kwargs(kind, kwargs)) for kind in types]
    return list(zip(types, kwargs))


def _shared_layer_kwargs(kind: str, shared: dict) -> dict:
    windowed = kind in ("sliding_attention", "chunked_attention", "hybrid_sliding")
    return {"sliding_window": shared["sliding_window"]} if windowed and "sliding_window" in shared else {}


def paged_names_are_separate() -> bool:
    """Up to 5.23 continuous batching switches a model to "paged|<name>", a separate attention function
    that updates the paged cache itself; since 5.24 the model updates it and calls "<name>" with the
    packed batch's cu_seq_lens (which "mps_flash" serves)."""
    from transformers import AttentionInterface

    return "paged|sdpa" in AttentionInterface._global_mapping


@functools.lru_cache(maxsize=None)
def generate_cache_kwarg() -> str:
    """The name generate() takes a cache under: "cache" since 5.24 ("past_key_values" warns), before
    that "past_key_values". The mask builders were renamed in the same release."""
    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def cache_kwargs(cache) -> dict:
    """{name: cache} for `model.generate(**inputs, **cache_kwargs(cache))` on any tested release."""
    return {} if cache is None else {generate_cache_kwarg(): cache}


def hide_gguf_reader_progress() -> None:
    """The GGUF reader's "Converting and de-quantizing" bar is a plain tqdm that neither transformers'
    nor huggingface_hub's progress switch reaches: replace its module-level tqdm by a disabled one."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_reader

    if callable(getattr(gguf_reader, "tqdm", None)):
        gguf_reader.tqdm = functools.partial(gguf_reader.tqdm, disable=True)


# -- the flash provider hook ----------------------------------------------------------------------

_ORIGINAL_LAZY = "_mfa_original_lazy_imports"


def install_flash_provider(name: str, surface: Callable[[], tuple]) -> None:
    """Route `_lazy_imports(name)` to `surface()`'s FA2 functions plus transformers' pad/unpad; every
    other implementation goes to the original unchanged. Any name containing "flash" makes
    transformers call `lazy_import_flash_attention(name)`, and for names that are neither
    flash_attention_N nor a hub repo its `_lazy_imports` ends in the hub loader and raises. Wrapping
    this one function (looked up as a module global at call time) reaches every caller; pre-seeding
    its globals would break as soon as another flash name is loaded in the same process."""
    mfu = _flash_utils()
    if hasattr(mfu, _ORIGINAL_LAZY):
        return
    original = mfu._lazy_imports

    def _lazy_imports(implementation, *args, **kwargs):
        if implementation != name:
            return original(implementation, *args, **kwargs)
        flash_fn, varlen_fn, kvcache_fn = surface()
        return flash_fn, varlen_fn, kvcache_fn, mfu._pad_input, mfu._unpad_input

    _lazy_imports.__doc__ = original.__doc__
    setattr(mfu, _ORIGINAL_LAZY, original)
    mfu._lazy_imports = _lazy_imports


def uninstall_flash_provider(name: str) -> None:
    """Restore transformers' own `_lazy_imports` (tests; never needed by users)."""
    mfu = _flash_utils()
    original = getattr(mfu, _ORIGINAL_LAZY, None)
    if original is not None:
        mfu._lazy_imports = original
        delattr(mfu, _ORIGINAL_LAZY)
        if getattr(mfu, "_loaded_implementation", None) == name:
            mfu._loaded_implementation = None


# -- the init guard -------------------------------------------------------------------------------

_ORIGINAL_CHECK = "_mfa_original_check_attn"


def install_init_guard(check: Callable[[object, set], None], propagate: tuple[str, ...] = ()) -> None:
    """Call `check(model, names)` with the implementation names a model is initialised with or switched
    to: the one validation point of __init__/from_pretrained (plus its sub-configs' names, which a
    per-sub-config dict sets), and set_attn_implementation (every name of a dict; there transformers
    only warns on classes its heuristic flags). `check` raises to refuse. A name in `propagate` set as a
    string also reaches the submodels transformers left behind."""
    model_cls = _pretrained_model()
    if _ORIGINAL_CHECK in model_cls.__dict__:
        return
    original = model_cls._check_and_adjust_attn_implementation
    original_set = model_cls.set_attn_implementation

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        names = {attn_implementation}
        if kwargs.get("is_init_check", args[0] if args else False):
            names |= sub_config_implementations(getattr(self, "config", None))
        check(self, names)
        return original(self, attn_implementation, *args, **kwargs)

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        check(self, _leaf_names(attn_implementation))
        result = original_set(self, attn_implementation, *args, **kwargs)
        if attn_implementation in propagate:
            _reach_left_behind_submodels(self, attn_implementation)
        return result

    set_attn_implementation.__doc__ = original_set.__doc__
    setattr(model_cls, _ORIGINAL_CHECK, (original, original_set))
    model_cls._check_and_adjust_attn_implementation = _check_and_adjust_attn_implementation
    model_cls.set_attn_implementation = set_attn_implementation


def _reach_left_behind_submodels(model, name: str) -> None:
    """Up to 5.17, set_attn_implementation skips submodels whose config class equals the parent's (T5's
    encoder and decoder stacks): they silently kept the old implementation. Set it on them too, through
    their own public set_attn_implementation, where the interface is used."""
    model_cls = _pretrained_model()
    for sub in model.modules():
        if (sub is not model and isinstance(sub, model_cls) and attn_implementation_of(sub) != name
                and can_set_attn_implementation(type(sub))):
            sub.set_attn_implementation(name)


def _leaf_names(requested) -> set:
    if isinstance(requested, dict):
        return {name for value in requested.values() for name in _leaf_names(value)}
    return {requested} if isinstance(requested, str) else set()


def sub_config_implementations(config) -> set:
    """Implementation names set on a config's sub-configs, recursively (composite models)."""
    names, pending = set(), [config]
    while pending:
        current = pending.pop()
        for key in getattr(current, "sub_configs", None) or {}:
            sub = getattr(current, key, None)
            if sub is not None:
                names.add(getattr(sub, "_attn_implementation", None))
                pending.append(sub)
    return names - {None}


# -- the probe ------------------------------------------------------------------------------------

FLASH_FORWARD_PARAMS = ("query_states", "key_states", "value_states", "attention_mask", "query_length",
                        "is_causal", "dropout", "softmax_scale", "sliding_window", "softcap", "cu_seq_lens_q",
                        "cu_seq_lens_k", "max_length_q", "max_length_k", "attn_implementation")


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _check_names() -> tuple[str, str] | None:
    """(check, reason) for the first touched name or signature that is missing, else None."""
    mfu = _flash_utils()
    model_cls = _pretrained_model()
    checks = [
        ("flash_utils._lazy_imports(implementation, ...)",
         lambda: _params(mfu._lazy_imports)[:1] == ["implementation"]),
        ("flash_utils._pad_input/_unpad_input", lambda: callable(mfu._pad_input) and callable(mfu._unpad_input)),
        ("flash_utils._flash_attention_forward parameters",
         lambda: set(FLASH_FORWARD_PARAMS) <= set(_params(mfu._flash_attention_forward))),
        ("PreTrainedModel._check_and_adjust_attn_implementation(attn_implementation, ...)",
         lambda: _params(model_cls._check_and_adjust_attn_implementation)[1:2] == ["attn_implementation"]),
        ("PreTrainedModel._can_set_attn_implementation", lambda: callable(model_cls._can_set_attn_implementation)),
        ("masking_utils.flash_attention_mask", _has_flash_mask),
    ]
    for check, holds in checks:
        try:
            if not holds():
                return check, "the name or its signature differs"
        except (AttributeError, TypeError, ValueError, ImportError) as error:
            return check, f"{type(error).__name__}: {error}"
    return None


def _has_flash_mask() -> bool:
    from transformers.masking_utils import flash_attention_mask

    return callable(flash_attention_mask)


def equality_run(attention_fn: Callable, name: str) -> str | None:
    """None when `attention_fn` (a transformers attention function) under `name` equals transformers'
    eager attention on a tiny causal batch and on two packed sequences (position_ids restarting, the
    flash path's varlen route); else what differed. CPU float32, a few milliseconds."""
    import torch
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from ...dispatch import BackendUnavailable

    module = _stub_attention_module(name)
    cpu = torch.device("cpu")  # explicit: from_pretrained builds models under a meta-device context
    generator = torch.Generator(cpu).manual_seed(0)
    # float32 named: from_pretrained(dtype=torch.bfloat16) sets the default dtype while the probe runs, and
    # a bf16 run differs from eager by bf16 rounding, which refused mps_flash for every bf16 model.
    f32 = torch.float32
    q, k, v = (torch.randn(1, heads, 7, 8, generator=generator, device=cpu, dtype=f32) for heads in (4, 2, 2))
    causal = torch.full((7, 7), float("-inf"), device=cpu, dtype=f32).triu(1)
    packed = torch.full((7, 7), float("-inf"), device=cpu, dtype=f32)
    packed[:3, :3], packed[3:, 3:] = causal[:3, :3], causal[:4, :4]
    cases = {"causal": (dict(), causal),
             "packed (position_ids restart)": (dict(position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=cpu)), packed)}
    try:
        for case, (kwargs, additive) in cases.items():
            with cpu:  # a default device the caller set (`with torch.device("cuda"): from_config(...)`) stays out
                out, _ = attention_fn(module, q, k, v, None, scaling=8 ** -0.5, **kwargs)
            expected, _ = eager_attention_forward(module, q, k, v, additive[None, None], scaling=8 ** -0.5, dropout=0.0)
            if out.shape != expected.shape or not torch.allclose(out, expected, atol=1e-5, rtol=1e-4):
                return f"{case}: max difference {(out - expected).abs().max().item():.3g}" if out.shape == expected.shape \
                    else f"{case}: shape {tuple(out.shape)} != eager's {tuple(expected.shape)}"
    except BackendUnavailable:
        return None  # a forced backend that cannot serve CPU tensors: says nothing about transformers
    except Exception as error:  # noqa: BLE001 - any failure of the contract is the probe's answer
        return f"{type(error).__name__}: {error}"
    return None


def _stub_attention_module(name: str):
    """The attributes transformers' attention functions read from an attention layer."""
    import torch
    from types import SimpleNamespace

    module = torch.nn.Module().eval()
    module.config = SimpleNamespace(_attn_implementation=name)
    module.is_causal, module.num_key_value_groups, module.layer_idx = True, 2, None
    return module


_result: ProbeResult | None = None
_verified = False


def probe(name: str, surface: Callable[[], tuple]) -> ProbeResult:
    """The names-and-signatures half of the probe, once per process, at registration; when they hold,
    the flash provider for `name` is installed. The equality half (`verify`) runs at the first model
    that asks for `name`: registration happens while transformers' model modules are still importing."""
    global _result
    if _result is None:
        version = installed_version()
        failure = _check_names()
        if failure is None:
            install_flash_provider(name, surface)
        _result = ProbeResult(version) if failure is None else ProbeResult(version, *failure)
    return _result


def verify(attention_fn: Callable, name: str) -> ProbeResult:
    """The whole probe: names (at registration), then once `equality_run` through the installed hook.
    A failed run removes the provider; the result says which check failed."""
    global _result, _verified
    if _result is not None and _result.ok and not _verified:
        _verified = True
        reason = equality_run(attention_fn, name)
        if reason is not None:
            uninstall_flash_provider(name)
            _result = ProbeResult(_result.version, f"{name} equals eager on a tiny attention", reason)
    return _result


def probe_result() -> ProbeResult | None:
    return _result


def reset_probe() -> None:
    """Forget the cached result (tests that simulate other releases)."""
    global _result, _verified
    _result, _verified = None, False


_warned: set[str] = set()


def warn_if_untested(version: str) -> None:
    """One RuntimeWarning per untested release and process, naming it."""
    if is_tested(version) or version in _warned:
        return
    _warned.add(version)
    warnings.warn(f"mfa_hf: transformers {version} has not been tested with mfa-hf (tested: {', '.join(TESTED)}); "
                  "its private contract probe passed, so mps_flash is enabled. Please report problems.",
                  RuntimeWarning, stacklevel=3)
