"""The release policy: no version gate, a probe of the private contract (internals.py), one warning
for a release we never tested, and our error, naming version, probe and alternatives, when the
contract is broken; the processors work throughout."""

import copy
import importlib
import re
import warnings

import diffusers
import pytest
import torch
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from diffusers.models.attention_processor import Attention

import mfa_hf.integrations.diffusers as integration
from mfa_hf import trace
from mfa_hf.integrations.diffusers import (
    MFAProcessor,
    UnsupportedDiffusersInternals,
    UnsupportedDiffusersVersion,
    enable,
    probe,
    register_mfa_backend,
)
from mfa_hf.integrations.diffusers import dispatcher, internals, set_time


@pytest.fixture
def reprobe():
    """A monkeypatch under which the probe runs afresh; afterwards, with everything undone, the probe
    runs again on the real diffusers, which must pass (and re-registers the backend)."""
    with pytest.MonkeyPatch.context() as patch:
        internals.reset_probe()
        yield patch
    internals.reset_probe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real release may itself be untested (CI takes the newest)
        assert probe().ok, probe()


def _our_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught
            if issubclass(w.category, RuntimeWarning) and str(w.message).startswith("mfa_hf: diffusers")]


def _assert_enable_matches_default(tiny, name: str) -> None:
    default, inputs = tiny.build(name)
    ours = copy.deepcopy(default)
    expected, _ = tiny.run_counting(default, inputs)
    handle = enable(ours)
    actual, calls = tiny.run_counting(ours, inputs)
    handle.restore()
    assert calls > 0, f"{name}: our kernel did not run"
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_the_probe_passes_on_the_installed_diffusers():
    result = probe()
    assert result.ok and result.failed is None and result.reason == "", result
    assert result.version == diffusers.__version__
    assert AttentionBackendName("mfa") in _AttentionBackendRegistry._backends
    assert set_time.is_wrapper(AttentionMixin.__dict__["set_attn_processor"])


def test_an_untested_release_warns_once_naming_it_and_everything_works(reprobe, tiny):
    reprobe.setattr(diffusers, "__version__", "0.99.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        register_mfa_backend()
        register_mfa_backend()
        result = probe()
        _assert_enable_matches_default(tiny, "flux")  # the dispatcher backend
    messages = _our_warnings(caught)
    assert len(messages) == 1, messages
    assert "diffusers 0.99.0 is not a release mfa_hf was tested against (tested: 0.42.x)" in messages[0]
    assert result.ok and not result.tested and result.version == "0.99.0"


def _assert_private_tier_off(tiny, probe_name: str) -> None:
    version = re.escape(diffusers.__version__)
    with pytest.raises(UnsupportedDiffusersInternals,
                       match=rf"the 'mfa' attention backend: .*got diffusers {version} failing the probe "
                             rf"'{re.escape(probe_name)}'.*MFAProcessor.*backend 'native'"):
        register_mfa_backend()
    flux, _ = tiny.build("flux")
    with pytest.raises(UnsupportedDiffusersVersion):  # the old name still catches it
        enable(flux)
    assert all("_attention_backend" not in p.__dict__ for p in flux.attn_processors.values())
    assert "mfa" not in {member.value for member in AttentionBackendName}, "diffusers' own entry points must refuse it"
    assert not set_time.is_wrapper(AttentionMixin.__dict__["set_attn_processor"])
    _assert_processor_works(tiny)


def _assert_processor_works(tiny) -> None:
    """MFAProcessor, set through diffusers' own set_processor, computes what AttnProcessor2_0 does."""
    torch.manual_seed(0)
    module, hidden = Attention(query_dim=16, heads=2, dim_head=8).eval(), torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = module(hidden)
        module.set_processor(MFAProcessor())
        with trace.capture() as captured:
            actual = module(hidden)
    assert tiny.kernel_forward_calls(captured) == 1
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_a_missing_private_name_turns_the_private_tier_off_with_our_error(reprobe, tiny):
    reprobe.delattr(_AttentionBackendRegistry, "register")
    with pytest.warns(RuntimeWarning, match=rf"diffusers {re.escape(diffusers.__version__)} \(a tested release\) "
                                            r"failed the probe '_AttentionBackendRegistry\.register'"):
        result = probe()
    assert not result.ok and result.failed == "_AttentionBackendRegistry.register"
    assert "has no attribute 'register'" in result.reason
    _assert_private_tier_off(tiny, "_AttentionBackendRegistry.register")


def test_a_backend_that_disagrees_with_native_is_refused(reprobe, tiny):
    original = dispatcher.attend_bshd

    def off_by_one_percent(*args, **kwargs):
        result = original(*args, **kwargs)
        return (result[0] * 1.01, result[1]) if isinstance(result, tuple) else result * 1.01

    reprobe.setattr(dispatcher, "attend_bshd", off_by_one_percent)
    with pytest.warns(RuntimeWarning, match="failed the probe 'equality with 'native''"):
        result = probe()
    assert result.failed == "equality with 'native'" and "max difference" in result.reason
    _assert_private_tier_off(tiny, "equality with 'native'")


def test_importing_never_raises_on_a_broken_contract_even_with_warnings_as_errors(reprobe):
    reprobe.delattr(_AttentionBackendRegistry, "register")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(integration)
    assert not probe().ok


def test_diffusers_attn_backend_mfa_is_named_as_the_cause():
    """DIFFUSERS_ATTN_BACKEND=mfa makes diffusers fail its own import ('mfa' is not yet one of its backend names):
    the warning names the variable and the ways to select the backend in code, not the release."""
    import os
    import subprocess
    import sys

    code = "import warnings; warnings.simplefilter('always'); import mfa_hf.integrations.diffusers"
    env = dict(os.environ, DIFFUSERS_ATTN_BACKEND="mfa")
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-2000:]
    assert "failed the probe 'DIFFUSERS_ATTN_BACKEND'" in found.stderr and "Unset it" in found.stderr, found.stderr
