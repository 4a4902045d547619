"""The "mfa" backend under Diffusers' context parallelism, 2 gloo ranks on the CPU (one pool per module).

- A tiny Flux and a tiny Wan transformer (built from configs) with `enable(model)` and
  `enable_parallelism(config=ContextParallelConfig(ring_degree=2))` (and Ulysses for Flux) give the
  single-process output: Diffusers' templates drive our forward op.
- A tiny FluxPipeline and WanPipeline (from configs; mfa_hf.distributed.testing_pipelines): `enable(pipe)` and
  `pipe.transformer.enable_parallelism(...)`; the latents after a few denoising steps equal the
  single-process pipeline's.
- Dispatcher calls: full MHA through Diffusers' ring and Ulysses templates (our forward and backward
  ops), causal GQA (which the templates refuse) through our ring; outputs and dq/dk/dv against the
  float64 reference by DESIGN.md's rule.
"""

import pytest
import torch

pytest.importorskip("diffusers")

from mfa_hf.distributed.testing import Pool, raise_failures  # noqa: E402
from mfa_hf.distributed.testing_diffusers import run_dispatcher, run_model  # noqa: E402
from mfa_hf.distributed.testing_pipelines import run_pipeline  # noqa: E402
from mfa_hf.kernels.reference import attention_reference  # noqa: E402
from mfa_hf.testing import FORWARD_FACTOR, GRADIENT_FACTOR, assert_close_to_reference  # noqa: E402

RING, ULYSSES = {"ring_degree": 2}, {"ulysses_degree": 2}


@pytest.fixture(scope="module")
def pool():
    workers = Pool(2)
    yield workers
    workers.close()


@pytest.mark.parametrize("name, config", [("flux", RING), ("wan", RING), ("flux", ULYSSES)],
                         ids=["flux-ring2", "wan-ring2", "flux-ulysses2"])
def test_parallel_model_equals_the_single_process_model(pool, name, config):
    _assert_parallel_equals_single(raise_failures(pool.run(run_model, (name, config))))


@pytest.mark.parametrize("name, config", [("flux", RING), ("wan", RING), ("wan", ULYSSES)],
                         ids=["flux-ring2", "wan-ring2", "wan-ulysses2"])
def test_parallel_pipeline_equals_the_single_process_pipeline(pool, name, config):
    _assert_parallel_equals_single(raise_failures(pool.run(run_pipeline, (name, config))))


def _assert_parallel_equals_single(results):
    for single, parallel, calls in results:
        assert calls["mfa_forward_op"] > 0, calls  # diffusers' templates ran our op
        assert parallel.shape == single.shape and torch.isfinite(single).all()
        torch.testing.assert_close(parallel, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options, heads_kv, config, path", [
    ({}, 4, RING, "mfa_backward_op"), ({}, 4, ULYSSES, "mfa_backward_op"),
    ({"is_causal": True, "enable_gqa": True}, 2, RING, "ring_flash_attn_func"),
    ({"is_causal": True}, 4, ULYSSES, "ulysses_flash_attn_func")],
    ids=["template-ring", "template-ulysses", "causal-gqa-our-ring", "causal-our-ulysses"])
def test_dispatcher_call_and_gradients_equal_the_whole_problem(pool, options, heads_kv, config, path):
    g = torch.Generator().manual_seed(len(options) * 10 + heads_kv)
    q = torch.randn(1, 16, 4, 8, generator=g)
    k, v = (torch.randn(1, 16, heads_kv, 8, generator=g) for _ in range(2))
    grad = torch.randn(1, 16, 4, 8, generator=g)
    results = raise_failures(pool.run(run_dispatcher, ((q, k, v, grad), options, config)))
    assert all(calls[path] > 0 for _, calls in results), [calls for _, calls in results]
    got = [torch.cat(parts, dim=1) for parts in zip(*(tensors for tensors, _ in results))]
    causal = options.get("is_causal", False)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = attention_reference(*leaves64, causal=causal)
    base, _ = attention_reference(*leaves, causal=causal, upcast=False)
    assert_close_to_reference(got[0], ref, base, FORWARD_FACTOR, "out")
    want = torch.autograd.grad(ref, leaves64, grad.double())
    baseline = torch.autograd.grad(base, leaves, grad)
    for name, ours, expected, base_grad in zip("qkv", got[1:], want, baseline):
        assert_close_to_reference(ours, expected, base_grad, GRADIENT_FACTOR, f"d{name}")
