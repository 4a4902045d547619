"""Diffusers pipelines (not only their transformers) under context parallelism with the "mfa" backend,
2 gloo ranks on the CPU: a tiny FluxPipeline and a tiny WanPipeline built from configs, `enable(pipe)`
and `pipe.transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=2))` (and Ulysses),
a few denoising steps; the final latents equal the single-process pipeline's. One pool per module.
"""

import pytest
import torch

pytest.importorskip("diffusers")

from mfa_hf.distributed.testing import Pool, raise_failures  # noqa: E402
from mfa_hf.distributed.testing_pipelines import run_pipeline  # noqa: E402

RING, ULYSSES = {"ring_degree": 2}, {"ulysses_degree": 2}


@pytest.fixture(scope="module")
def pool():
    workers = Pool(2)
    yield workers
    workers.close()


@pytest.mark.parametrize("name, config", [("flux", RING), ("wan", RING), ("wan", ULYSSES)],
                         ids=["flux-ring2", "wan-ring2", "wan-ulysses2"])
def test_parallel_pipeline_equals_the_single_process_pipeline(pool, name, config):
    for single, parallel, calls in raise_failures(pool.run(run_pipeline, (name, config))):
        assert calls["mfa_forward_op"] > 0, calls  # diffusers' templates ran our op
        assert parallel.shape == single.shape and torch.isfinite(single).all()
        torch.testing.assert_close(parallel, single, rtol=1e-4, atol=1e-5)
