"""The release policy: "mfa" is never gated; "mps_flash" is enabled by a contract probe (names,
signatures, one tiny run through the hook against eager), never by a version number. An untested
release warns once and works; a release whose contract changed gets our error at model init."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from conftest import kernel_calls, padded_batch
from families import BY_NAME

from mfa_hf import trace
from mfa_hf.integrations import transformers as integration
from mfa_hf.integrations.transformers import ContractError, internals


def _llama(implementation: str):
    return tf.LlamaForCausalLM._from_config(BY_NAME["llama"].config(), attn_implementation=implementation).eval()


def _runs_our_kernel(model) -> bool:
    with torch.no_grad(), trace.capture() as calls:
        model(padded_batch("left")[0])
    return kernel_calls(calls) >= 2


@pytest.fixture
def fresh_probe(monkeypatch):
    """Re-register from scratch inside the test, and leave the real registration behind it."""
    monkeypatch.setattr(internals, "_warned", set())
    internals.reset_probe()
    internals.uninstall_flash_provider("mps_flash")
    yield
    monkeypatch.undo()
    internals.reset_probe()
    internals.uninstall_flash_provider("mps_flash")
    assert integration.register().ok


def test_probe_passes_on_the_installed_release_and_ran_the_equality_check():
    _llama("mps_flash")  # the first model asking for the name completes the probe
    result = internals.probe_result()
    assert result.ok and result.version == tf.__version__, result
    assert internals._verified


def test_installed_release_is_a_tested_one():
    # CI runs the suite on what pip resolves and on the floor; TESTED must name both (README lists them).
    assert internals.is_tested(tf.__version__), f"add {internals.minor(tf.__version__)} to internals.TESTED"


@pytest.mark.parametrize("version, tested", [("5.17.0", True), ("5.24.0", True), ("5.25.1", True),
                                             ("5.26.0", False), ("6.0.0.dev0", False), ("5.23.0", False)])
def test_tested_means_major_minor(version, tested):
    assert internals.is_tested(version) is tested


def test_untested_release_warns_once_naming_it_and_works(fresh_probe, monkeypatch):
    monkeypatch.setattr(internals, "installed_version", lambda: "5.99.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert integration.register().ok
        integration.register()
        model = _llama("mps_flash")
    named = [w for w in caught if issubclass(w.category, RuntimeWarning) and "5.99.0" in str(w.message)]
    assert len(named) == 1, [str(w.message) for w in caught]
    assert _runs_our_kernel(model)


def test_missing_private_name_refuses_mps_flash_with_our_error_and_mfa_still_works(fresh_probe, monkeypatch):
    from transformers import modeling_flash_attention_utils as mfu

    monkeypatch.setattr(internals, "installed_version", lambda: "5.99.0")
    monkeypatch.delattr(mfu, "_flash_attention_forward")
    result = integration.register()
    assert not result.ok and "_flash_attention_forward" in result.failed
    with pytest.raises(ContractError) as error:
        _llama("mps_flash")
    text = str(error.value)
    assert "5.99.0" in text and "_flash_attention_forward" in text and '"mfa"' in text and '"sdpa"' in text
    assert _runs_our_kernel(_llama("mfa"))


def test_changed_flash_path_fails_the_equality_run(fresh_probe, monkeypatch):
    """A release whose flash path computes something else (simulated: it returns zeros)."""
    monkeypatch.setattr(internals, "flash_attention_forward",
                        lambda query, key, value, mask, **kwargs: torch.zeros_like(query))
    assert integration.register().ok  # the names hold ...
    with pytest.raises(ContractError, match="equals eager.*max difference"):
        _llama("mps_flash")  # ... the run through the hook does not
    assert not internals.probe_result().ok
    assert _runs_our_kernel(_llama("mfa"))


def test_registration_never_raises_on_import(fresh_probe, monkeypatch):
    """Even with the private contract gone, `import transformers` and "mfa" keep working."""
    from transformers import modeling_flash_attention_utils as mfu

    monkeypatch.delattr(mfu, "_lazy_imports")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tested release with a broken probe: no warning, the error comes at init
        monkeypatch.setattr(internals, "installed_version", lambda: "5.24.0")
        assert not integration.register().ok
    assert _runs_our_kernel(_llama("mfa"))


def test_generate_cache_kwarg_is_the_one_this_release_takes():
    """cache= since 5.24 (past_key_values= warns there), past_key_values= before."""
    name = internals.generate_cache_kwarg()
    model = _llama("mfa")
    ids = padded_batch("left")[0]
    cache = tf.DynamicCache()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, **internals.cache_kwargs(cache))
    assert out.shape[1] == ids.shape[1] + 2 and cache.get_seq_length() > 0, name


def test_layer_types_and_kwargs_on_every_release():
    """5.17 returns one kwargs dict shared by all layers, 5.24 a list; both give one entry per layer."""
    config = BY_NAME["gemma2"].config()
    layers = internals.layer_types_and_kwargs(config)
    assert len(layers) == config.num_hidden_layers
    assert [kind for kind, _ in layers] == list(config.layer_types)
    for kind, kwargs in layers:
        assert kwargs == ({"sliding_window": 4} if kind == "sliding_attention" else {}), (kind, kwargs)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("default_device", ["meta", "cpu", "cuda"])
def test_probe_passes_under_a_default_device_and_dtype(fresh_probe, default_device, dtype):
    """`with torch.device(...)` and `dtype=`: from_config / from_pretrained build there and set the default
    dtype meanwhile. The equality run is a float32 CPU run whatever the caller set (a bf16 model on the GPU
    machine had mps_flash refused: the probe ran in bf16 and missed eager by bf16 rounding)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if default_device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the GPU machine)")
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    assert integration.register().ok
    with torch.device(default_device):
        AutoModelForCausalLM.from_config(config, attn_implementation="mps_flash", dtype=getattr(torch, dtype))
    assert internals.probe_result().ok, internals.probe_result()
