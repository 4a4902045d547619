"""Worker tasks for the Diffusers context-parallel tests: tiny Flux and Wan transformers built from
configs (the same seed on every rank), run once single-process and once under
`enable_parallelism(config=ContextParallelConfig(...))` with the "mfa" backend; and the dispatcher's
causal / GQA calls, which go through our ring, with their gradients.
"""

from __future__ import annotations

import torch

from .testing import Context


def cpu_only_accelerator_count() -> None:
    """diffusers' enable_parallelism places rank r on device r % torch.accelerator.device_count(), which is
    0 on a CPU-only host (ZeroDivisionError); the CPU has one device."""
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1


def build(name: str):
    import diffusers

    torch.manual_seed(0)
    if name == "flux":
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
        image, text = 16, 8
        inputs = dict(hidden_states=torch.randn(1, image, 4), encoder_hidden_states=torch.randn(1, text, 32),
                      pooled_projections=torch.randn(1, 16), timestep=torch.tensor([0.3]),
                      img_ids=torch.randn(image, 3), txt_ids=torch.randn(text, 3))
    else:
        model = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
        inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.tensor([10]),
                      encoder_hidden_states=torch.randn(1, 8, 16))
    return model.eval(), inputs


class Counted:
    """Counts the calls of the context-parallel entry points of the integration (the tests assert that
    the path they mean to test really ran)."""

    NAMES = ("mfa_forward_op", "mfa_backward_op", "ring_flash_attn_func", "ulysses_flash_attn_func")

    def __init__(self):
        from mfa_hf.integrations.diffusers import context_parallel

        self.module, self.calls = context_parallel, dict.fromkeys(self.NAMES, 0)
        for name in self.NAMES:
            setattr(context_parallel, name, self._counting(name, getattr(context_parallel, name)))

    def _counting(self, name, function):
        def counted(*args, **kwargs):
            self.calls[name] += 1
            return function(*args, **kwargs)

        return counted


def run_model(context: Context, payload: tuple):
    """Every rank: (single-process output, context-parallel output, calls of our CP entry points) of
    model `name` under `config`."""
    from diffusers import ContextParallelConfig

    from mfa_hf.integrations.diffusers import enable

    name, config = payload
    cpu_only_accelerator_count()
    counted = Counted()
    model, inputs = build(name)
    with torch.no_grad():
        single = model(**inputs, return_dict=False)[0]
        enable(model)
        model.enable_parallelism(config=ContextParallelConfig(**config))
        parallel = model(**inputs, return_dict=False)[0]
    return single, parallel, counted.calls


def run_dispatcher(context: Context, payload: tuple):
    """Every rank: its shard of out and of dq, dk, dv for a dispatcher call under a ring of all ranks
    (is_causal / enable_gqa as given); the whole inputs come in the payload."""
    from diffusers import ContextParallelConfig, ParallelConfig
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from torch.distributed.device_mesh import init_device_mesh

    from mfa_hf.integrations.diffusers import internals

    tensors, options, config = payload
    internals.register_mfa_backend()
    counted = Counted()
    cp = ContextParallelConfig(**config)
    parallel = ParallelConfig(context_parallel_config=cp)
    mesh = init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    parallel.setup(context.rank, context.size, torch.device("cpu"), mesh=mesh)
    size, rank = context.size, context.rank
    shards = [t.chunk(size, dim=1)[rank].clone().requires_grad_() for t in tensors[:3]]
    out = dispatch_attention_fn(*shards, backend="mfa", parallel_config=parallel, **options)
    grads = torch.autograd.grad(out, shards, tensors[3].chunk(size, dim=1)[rank])
    return (out.detach(), *grads), counted.calls
