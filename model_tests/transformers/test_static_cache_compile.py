"""generate over a StaticCache, which transformers compiles on cuda and mps: the decode steps must get inputs of one
shape, as under sdpa, or every step recompiles the model until dynamo's recompile limit (then runs uncompiled).

The mask is the input that differed: the compact key mask of "mfa" and FA's 2-D mask under "mps_flash" grew by a key
every step. Both names now give a compileable cache's decode steps the dense row of the buffer's fixed size, which
the attention function reads back as key validity when not compiling (the decode op still serves those steps).
"""

from __future__ import annotations

import pytest
import torch
from conftest import IMPLEMENTATIONS, padded_batch, twin_models
from families import DECODERS

from mfa_hf import trace

STEPS = 5


def _ids(fams):
    return [pytest.param(f, id=f.name) for f in fams if f.static_cache]


def _shapes(mask):
    """A mask's shape; a hybrid model's masks (one per layer type) as (type, shape) pairs."""
    if isinstance(mask, dict):
        return tuple(sorted((kind, _shapes(value)) for kind, value in mask.items()))
    return None if mask is None else tuple(mask.shape)


def _decode_mask_shapes(model, ids, mask) -> tuple[torch.Tensor, list]:
    """generate's tokens, and the shape of the attention_mask each one-token step's forward received."""
    shapes = []

    def record(_, args, kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            shapes.append(_shapes(kwargs.get("attention_mask")))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS + 1, do_sample=False,
                                    pad_token_id=0, cache_implementation="static")
    finally:
        handle.remove()
    return tokens, shapes


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("padding", ["left", "none"])
@pytest.mark.parametrize("family", _ids(DECODERS))
def test_static_decode_steps_get_one_mask_shape(family, padding, implementation):
    reference, model = twin_models(family, implementation)
    ids, mask = padded_batch("left")
    if padding == "none":
        ids, mask = ids[:, 4:], mask[:, 4:]
    expected, reference_shapes = _decode_mask_shapes(reference, ids, mask)
    with trace.capture() as calls:
        tokens, shapes = _decode_mask_shapes(model, ids, mask)
    assert torch.equal(tokens, expected), f"{family.name}: {tokens.tolist()} != {expected.tolist()}"
    assert len(shapes) == STEPS and len(set(shapes)) == 1, f"{family.name}: decode steps got masks {shapes}"
    assert len(set(reference_shapes)) == 1, f"eager's masks changed shape too: {reference_shapes}"
    # Uncompiled, the dense row is read back as key validity: the decode steps stay on the decode op (MLA's
    # D_v != D_qk stays on the forward op, as in test_models.py).
    decode_calls = sum(n for (_, op), n in trace.served_by(calls).items() if op == "decode")
    assert family.name == "deepseek_v3" or decode_calls >= 2 * STEPS, trace.served_by(calls)


@pytest.mark.parametrize("implementation", ["sdpa", *IMPLEMENTATIONS])
@pytest.mark.parametrize("padding", ["left", "none"])
def test_compiled_static_generate_compiles_once(padding, implementation):
    """The step generate compiles (forced on CPU by the compile config's all-devices switch, as transformers'
    own tests do) compiles one graph for Llama, as under sdpa, with eager's tokens."""
    from families import BY_NAME
    from transformers import CompileConfig

    config = CompileConfig(backend="eager", fullgraph=False)
    if not hasattr(config, "_compile_all_devices"):
        pytest.skip("this transformers release compiles generate only on accelerators")
    config._compile_all_devices = True
    reference, model = twin_models(BY_NAME["llama"], "eager" if implementation == "sdpa" else implementation)
    if implementation == "sdpa":
        model.set_attn_implementation("sdpa")
    ids, mask = padded_batch("left")
    if padding == "none":
        ids, mask = ids[:, 4:], mask[:, 4:]
    kwargs = dict(attention_mask=mask, max_new_tokens=STEPS + 1, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    with torch.no_grad():
        expected = reference.generate(ids, **kwargs)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with trace.capture():  # counting routes while tracing recompiled every step (trace.py)
            tokens = model.generate(ids, compile_config=config, **kwargs)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert torch.equal(tokens, expected), f"{tokens.tolist()} != {expected.tolist()}"
    assert graphs == 1, f"{implementation}: the decode step compiled {graphs} graphs"


ROWS = {  # one decode step's dense mask row over 7 keys (6 cached + the step's own), per batch row
    "runs": [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]],
    "own key hidden": [[1, 1, 1, 1, 1, 1, 0]] * 3,
    "ends differ": [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]],
    "holes": [[1, 0, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 1]],
}


@pytest.mark.parametrize("kind", ["bool", "additive", "bias"])
@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", _ids([f for f in DECODERS if f.name in ("llama", "qwen3")]))
def test_a_dense_decode_row_means_what_eager_makes_of_it(family, implementation, rows, kind):
    """A one-query dense mask at a decode step (what a compileable cache's steps now get, or a user's own 4-D mask)
    is read back as key validity only where it is one run of keys per row ending at the same key; holes, rows
    ending apart and finite biases take the general path. Each gives eager's logits on the additive form of the
    mask (eager adds a mask to the scores: a bool one would add 0 and 1). Full-attention families only: a sliding
    layer's cache holds fewer keys than such a mask covers."""
    from transformers import DynamicCache

    reference, model = twin_models(family, implementation)
    ids = padded_batch("left")[0][:, 4:]  # (3, 6), no padding
    visible = torch.tensor(ROWS[rows], dtype=torch.bool)[:, None, None, :]
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    if kind == "bias":
        additive[:, :, :, 1] -= 0.5 * visible[:, :, :, 1]
    found = []
    for net, mask in ((reference, additive), (model, visible if kind == "bool" else additive)):
        cache = DynamicCache(config=net.config)
        with torch.no_grad():
            net(ids, past_key_values=cache, use_cache=True)
            with trace.capture() as calls:
                found.append(net(ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(found[1], found[0], atol=1e-5, rtol=1e-4)
    decode_calls = sum(n for (_, op), n in trace.served_by(calls).items() if op == "decode")
    key_validity = rows in ("runs", "own key hidden") and kind != "bias"
    assert (decode_calls >= 2) if key_validity else decode_calls == 0, trace.served_by(calls)  # a call per padding group
