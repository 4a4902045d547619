"""The native route (mfa_hf/routes.py): the platform's fused attention serves a call only where its result is
ours, exactly in the sense of DESIGN.md's tolerance rule.

For every class the issue names (causal alignment when Lq != Lk, masks, fully masked rows, GQA, precision,
gradients) and every feature SDPA lacks, a call through flash_attn_func is checked three ways:
- which path served it (MFA_TRACE's route counts), native or ours with the stated reason;
- that the native path ran torch's fused CPU kernel, not its O(N^2) math (profiler);
- output and every input gradient against the float64 reference, on fresh random inputs.
The gate tables of the other devices are checked as data on described problems; the per-machine table
round-trips through its file.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import profile

import mfa_hf
from mfa_hf import native_table, routes, trace
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.problem import AttentionProblem, MaskKind
from mfa_hf.testing import Case, assert_close_to_reference, make_inputs
from mfa_hf.testing_routes import MATH, assert_nonfinite_rows_match, check_route, default_routing, \
    infinite_score_case, nonfinite_query_case, run_routed, sdpa_switches

FUSED_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"


@pytest.fixture(autouse=True)
def auto_routing(monkeypatch):
    default_routing(monkeypatch)


def _check(case: Case, expect_native: bool, reason_part: str = "", grads: bool = True, seed: int = 0):
    if expect_native:
        check_route(case, "sdpa-cpu-flash", ran=(FUSED_CPU,), not_ran=(MATH,), grads=grads, seed=seed)
    else:
        check_route(case, routes.OURS, reason_part, not_ran=(FUSED_CPU,), grads=grads, seed=seed)


NATIVE_CLASSES = {
    "causal-square": Case(lq=45, lk=45, causal=True),
    "causal-square-mha": Case(lq=33, lk=33, heads_kv=4, causal=True),
    "full-lq<lk": Case(lq=19, lk=50),
    "full-lq>lk": Case(lq=50, lk=29),
    "gqa": Case(lq=40, lk=40, heads_q=4, heads_kv=2, causal=True),
    "mqa": Case(lq=40, lk=40, heads_q=4, heads_kv=1, causal=True),
    "one-row-causal": Case(lq=1, lk=50, causal=True),  # bottom-right: the row sees every key
    "one-row-left-window": Case(lq=1, lk=50, causal=True, window=(6, -1)),  # a slice of the keys
    "one-row-two-sided": Case(lq=1, lk=50, window=(9, 4)),
    "one-row-mqa-window-bf16": Case(dtype=torch.bfloat16, lq=1, lk=50, heads_q=6, heads_kv=1, causal=True,
                                    window=(6, -1)),
    "one-row-gqa-fp16": Case(dtype=torch.float16, lq=1, lk=33, heads_q=6, heads_kv=3),
    "one-row-mha": Case(lq=1, lk=50, heads_q=3, heads_kv=3, causal=True),
    "bool-mask-fully-masked-rows": Case(lq=37, lk=50, mask="bool"),
    "additive-mask-fully-masked-rows": Case(lq=37, lk=50, mask="additive"),
    "one-row-window-and-mask": Case(lq=1, lk=50, window=(9, 0), mask="bool"),
    "bf16": Case(dtype=torch.bfloat16, lq=45, lk=45, causal=True),
    "fp16-mask": Case(dtype=torch.float16, lq=37, lk=50, mask="bool"),
    "bf16-additive": Case(dtype=torch.bfloat16, lq=37, lk=50, mask="additive"),
    "head-dim-odd": Case(lq=30, lk=30, dim=59, dim_v=59, causal=True),
}


@pytest.mark.parametrize("name", sorted(NATIVE_CLASSES))
def test_native_serves_with_our_semantics(name):
    case = NATIVE_CLASSES[name]
    # float16 training on CPU takes ours (test_cpu_training_in_float16_takes_ours): its native class is forward-only
    _check(case, expect_native=True, grads=case.dtype != torch.float16)


OURS_CLASSES = {
    "causal-lq<lk": (Case(lq=19, lk=50, causal=True), "top-left"),
    "causal-lq>lk": (Case(lq=50, lk=29, causal=True), "top-left"),
    "window": (Case(lq=40, lk=40, window=(5, 3)), "sliding window"),
    "causal-left-window": (Case(lq=40, lk=40, causal=True, window=(6, -1)), "sliding window"),
    "softcap": (Case(lq=30, lk=30, softcap=3.0), "softcap"),
    "sinks": (Case(lq=30, lk=30, sinks=True), "sinks"),
    "alibi": (Case(lq=30, lk=30, alibi=True), "ALiBi"),
    "head-dim-v": (Case(lq=30, lk=30, dim=33, dim_v=24), "head_dim_v"),
    "mask-and-causal": (Case(lq=30, lk=30, causal=True, mask="bool"), "mask together with causal"),
    "float64": (Case(dtype=torch.float64, lq=30, lk=30), "dtype"),
    "last-dim-strided": (Case(lq=33, lk=40, strided=True), "last dim is strided"),
}


@pytest.mark.parametrize("name", sorted(OURS_CLASSES))
def test_ours_serves_what_native_cannot(name):
    case, reason = OURS_CLASSES[name]
    _check(case, expect_native=False, reason_part=reason)


def test_lse_dropout_mask_grad_and_mask_dtype_stay_ours():
    case = Case(lq=20, lk=20)
    inputs = make_inputs(case)
    with trace.capture_routes() as decided:
        run_routed(case, inputs, return_lse=True)
        mfa_hf.flash_attn_func(inputs["q"], inputs["k"], inputs["v"], dropout_p=0.1, dropout_seed=3)
        mask = torch.zeros(1, 1, 20, 20, requires_grad=True)
        mfa_hf.flash_attn_func(inputs["q"].requires_grad_(), inputs["k"], inputs["v"], attn_mask=mask)
        low = make_inputs(Case(dtype=torch.bfloat16, lq=20, lk=20))
        mfa_hf.flash_attn_func(low["q"], low["k"], low["v"], attn_mask=torch.zeros(20, 20))  # float32 mask, bf16 q
    reasons = [reason for (path, reason) in decided if path == routes.OURS]
    for part in ("return_lse", "dropout", "requires grad", "additive mask in torch.float32"):
        assert any(part in r for r in reasons), (part, reasons)


def test_varlen_and_quantized_kv_stay_ours():
    q = torch.randn(12, 4, 32)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with trace.capture_routes() as decided:
        mfa_hf.flash_attn_varlen_func(q, q, q, cu, cu, 7, 7)
        kv = mfa_hf.quantize_kv(torch.randn(1, 16, 4, 32), "int8")
        mfa_hf.flash_attn_func(torch.randn(1, 1, 4, 32), kv, kv)
    reasons = " | ".join(reason for (path, reason) in decided if path == routes.OURS)
    assert "varlen" in reasons


@pytest.mark.parametrize("dtype, native", [(torch.float16, False), (torch.bfloat16, True), (torch.float32, True)])
def test_cpu_training_in_float16_takes_ours(dtype, native):
    """torch's CPU float16 backward is 7-9x slower than ours with up to 2x PyTorch math's dV error: calls that
    record autograd in float16 take ours (the reason says why), forward-only ones stay native; bf16/fp32 train
    natively. Both ways the gradients hold the tolerance rule against float64."""
    case = Case(lq=48, lk=48, causal=True, dtype=dtype)
    inputs = make_inputs(case)
    with trace.capture_routes() as trained:
        run_routed(case, {**inputs, "q": inputs["q"].detach().requires_grad_()})
    with trace.capture_routes() as forward:
        run_routed(case, inputs)
    ((trained_path, trained_reason),), ((forward_path, _),) = trained.keys(), forward.keys()
    assert (trained_path != routes.OURS) == native and forward_path != routes.OURS
    if not native:
        assert "float16 backward" in trained_reason
    _check(case, expect_native=native)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("options", [dict(causal=True), dict(window_size=(7, 0), softcap=5.0),
                                     dict(alibi_slopes="slopes"), dict(sinks="sinks", causal=True),
                                     dict(return_lse=True, causal=True), dict(grad=True, causal=True)],
                         ids=["causal", "window_softcap", "alibi", "sinks", "lse", "grad"])
def test_one_sequence_varlen_is_the_dense_call(dtype, options):
    """A varlen call holding one sequence (offsets read: CPU) is the dense problem of a batch of one and takes the
    same route: out, lse and gradients equal flash_attn_func's on q[None] bitwise (a peer's suite compares them at
    fp16 rounding; before, varlen took our kernel and dense the native one). Lq != Lk, GQA."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(40, 4, 32, generator=g).to(dtype)
    k, v = (torch.randn(57, 2, 32, generator=g).to(dtype) for _ in range(2))
    options = dict(options)
    grad = options.pop("grad", False)
    if options.get("alibi_slopes") == "slopes":
        options["alibi_slopes"] = torch.rand(4, generator=g)
    if options.get("sinks") == "sinks":
        options["sinks"] = torch.randn(4, generator=g)
    cu_q, cu_k = torch.tensor([0, 40], dtype=torch.int32), torch.tensor([0, 57], dtype=torch.int64)
    results = []
    for packed in (True, False):
        leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        with trace.capture_routes() as decided:
            if packed:
                found = mfa_hf.flash_attn_varlen_func(*leaves, cu_q, cu_k, 40, 57, **options)
            else:
                found = mfa_hf.flash_attn_func(*(t[None] for t in leaves), **options)
                found = (found[0][0], found[1][0]) if options.get("return_lse") else found[0]
        found = found if isinstance(found, tuple) else (found,)
        if grad:
            found[0].float().square().sum().backward()
            found = (*found, *(t.grad for t in leaves))
        results.append((found, decided))
    (packed, packed_routes), (dense, dense_routes) = results
    assert packed_routes == dense_routes
    for a, b in zip(packed, dense):
        assert torch.equal(a, b)


def test_forced_backend_turns_routing_off_and_native_can_be_forced(monkeypatch):
    case = Case(lq=30, lk=30, causal=True)
    inputs = make_inputs(case)
    monkeypatch.setenv("MFA_BACKEND", "torch")
    with trace.capture() as served:
        run_routed(case, inputs)
    assert trace.served_by(served)[("torch", "fwd")] == 1
    monkeypatch.setenv("MFA_BACKEND", "native")
    with trace.capture() as served:
        run_routed(case, inputs)
    assert trace.served_by(served)[("native", "fwd")] == 1
    with pytest.raises(routes.NativeUnavailable, match="MFA_BACKEND=native.*sliding window"):
        mfa_hf.flash_attn_func(inputs["q"], inputs["k"], inputs["v"], window_size=(3, 3))


def test_native_under_torch_compile_fullgraph():
    q, k, v = (torch.randn(1, 24, 4, 32) for _ in range(3))
    compiled = torch.compile(lambda a, b, c: mfa_hf.flash_attn_func(a, b, c, causal=True), fullgraph=True,
                             backend="eager")
    torch.testing.assert_close(compiled(q, k, v), mfa_hf.flash_attn_func(q, k, v, causal=True))


def test_sdpa_patch_never_loops_back():
    from mfa_hf.integrations import sdpa_patch

    q, k, v = (torch.randn(1, 4, 64, 32) for _ in range(3))
    with sdpa_patch.sdpa_patched(devices=("cpu",), min_scores=1):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, torch._C._nn.scaled_dot_product_attention(q, k, v, is_causal=True))


# --- the gate tables, as data -------------------------------------------------------------------------------

def _problem(device="mps", dtype=torch.float16, lq=512, lk=512, hq=8, hkv=8, d=128, **kw) -> AttentionProblem:
    return AttentionProblem(device_type=device, dtype=dtype, batch=1, seqlen_q=lq, seqlen_k=lk, heads_q=hq,
                            heads_kv=hkv, head_dim_qk=d, head_dim_v=kw.pop("dv", d), **kw)


@pytest.mark.parametrize("problem, path", [
    (_problem(causal=True, window=(-1, 0)), "sdpa-mps-prefill"),
    (_problem(lq=1, lk=4000, d=64), "sdpa-mps-vector-decode"),
    (_problem(lq=1, lk=4000, d=64, hkv=2), None),  # decode GQA: the open two-pass out-of-bounds bug
    (_problem(d=192), None),  # MPSGraph fallback head dim: O(N^2), bf16 softmax loses precision
    (_problem(needs_grad=True), None),  # training falls back to O(N^2) math on mps
    (_problem(mask=MaskKind.BOOL), None),  # not verified on hardware yet
    (_problem(lk=65536, lq=65536), None),
    (_problem(device="cuda", dtype=torch.float32), None),
    (_problem(device="cuda", d=100), None),
    (_problem(device="cuda", hkv=2, needs_grad=True), "sdpa-cuda-flash"),
    (_problem(device="cpu", d=100, mask=MaskKind.ADDITIVE), "sdpa-cpu-flash"),
    (_problem(device="xpu"), None),
])
def test_gate_tables(problem, path, monkeypatch):
    route = routes.choose(problem, "auto", mask_dtype=problem.dtype)
    assert route.path == (path or routes.OURS), route.reason
    assert route.reason


def test_per_machine_table_round_trip_and_measurement_rule(tmp_path, monkeypatch):
    rows = [dict(path="sdpa-mps-prefill", dtype="float16", head_dim=d, q_len=512, exact=exact, native_s=n, ours_s=o)
            for d, exact, n, o in ((64, True, 1.0, 2.0), (128, True, 3.0, 2.0), (256, False, 1.0, 2.0),
                                   (80, True, 1.0, 1.5))]
    table = native_table.from_measurements("mps", rows)
    (gate,) = table["mps"]  # the decode gate had no rows: it is not listed, so its calls stay ours
    assert gate.head_dims == (64, 80)  # 128 slower, 256 inexact
    path = tmp_path / "routes.json"
    native_table.write(path, table)
    monkeypatch.setenv("MFA_ROUTE_TABLE", str(path))
    assert native_table.gates("mps") == (gate,)
    assert native_table.gates("cpu") == native_table.DEFAULT["cpu"]
    assert routes.choose(_problem(d=80), "auto").native and not routes.choose(_problem(d=128), "auto").native
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv("MFA_ROUTE_TABLE", str(bad))
    with pytest.raises(ValueError, match="native route table .*bad.json"):
        native_table.gates("mps")


@pytest.mark.parametrize("lq, held", [(1, "flash"), (16, "flash"), (17, None), (512, None)])
def test_cuda_decode_rows_are_held_to_the_flash_kernel(lq, held):
    """cuDNN, SDPA's choice for a one-row decode on cuda (torch 2.11), builds a graph for every new key length, i.e.
    for every generated token; decode-sized queries are held to the flash kernel, longer ones keep SDPA's choice.
    Neither restores NaN query rows: both kernels keep them NaN on the GPU (native_route_check.py 1 and 1b)."""
    route = routes.choose(_problem(device="cuda", lq=lq, lk=4096, hq=32, hkv=8, d=64), "auto")
    assert route.path == "sdpa-cuda-flash" and route.gate.sdpa_backend == held
    assert not route.gate.zeroes_nan_query_rows


@pytest.mark.parametrize("backend, op", [("math", MATH), ("flash", FUSED_CPU), ("cudnn", FUSED_CPU)])
@pytest.mark.parametrize("heads, window", [((4, 4), None), ((8, 2), 5)])
def test_a_gate_holds_sdpa_to_its_backend(backend, op, heads, window, monkeypatch):
    """A gate's sdpa_backend holds SDPA to that kernel (the CPU has math and flash: the profiler names which ran);
    one that cannot run here (cuDNN on a CPU) leaves the choice to SDPA. Each equals the float64 reference, on
    the decode plan's path and on the heads-first replay of transformers' decode layers, and SDPA's backend switches
    are as they were after each call."""
    import dataclasses

    from mfa_hf import decode_plan
    from mfa_hf.integrations.transformers import decode

    cpu = tuple(dataclasses.replace(gate, sdpa_backend=backend, stacks_query_groups=False)
                for gate in native_table.DEFAULT["cpu"])
    monkeypatch.setitem(native_table.DEFAULT, "cpu", cpu)
    monkeypatch.setattr(native_table, "_loaded", {})
    monkeypatch.setattr(decode_plan, "_decisions", decode_plan.Decisions())  # decided under the default table
    decode._native_kinds.clear()
    g = torch.Generator().manual_seed(heads[0] + (window or 0))
    switches = sdpa_switches()
    for layer in range(2):  # the first layer takes the plan, the second the replay
        q = torch.randn(2, heads[0], 1, 16, generator=g)
        k, v = (torch.randn(2, heads[1], 30, 16, generator=g) for _ in range(2))
        with profile() as prof:
            out = decode.plain_decode(q, k, v, sliding_window=window)
        ops = {event.key for event in prof.key_averages()}
        assert op in ops and (MATH not in ops or op == MATH), sorted(o for o in ops if "scaled_dot" in o)
        left = -1 if window is None else window - 1
        args = [x.transpose(1, 2) for x in (q, k, v)]
        ref, _ = attention_reference(*(x.double() for x in args), causal=True, window_size=(left, 0))
        base, _ = attention_reference(*args, causal=True, window_size=(left, 0), upcast=False)
        assert_close_to_reference(out, ref, base)
        assert sdpa_switches() == switches, "the held call left SDPA's backend switches changed"
    decode._native_kinds.clear()


def test_every_table_backend_has_its_switch():
    from mfa_hf import native

    assert set(native._SWITCHES) == set(native_table.SDPA_BACKENDS)


def test_a_table_file_names_a_known_sdpa_backend(tmp_path, monkeypatch):
    gate = native_table.NativeGate("sdpa-cuda-flash", (torch.bfloat16,), max_q=16, sdpa_backend="flash")
    path = tmp_path / "routes.json"
    native_table.write(path, {"cuda": (gate,)})
    monkeypatch.setenv("MFA_ROUTE_TABLE", str(path))
    assert native_table.gates("cuda") == (gate,)
    path.write_text(path.read_text().replace('"flash"', '"fastest"'))
    monkeypatch.delitem(native_table._loaded, str(path))  # read the file again
    with pytest.raises(ValueError, match="sdpa_backend: expected one of"):
        native_table.gates("cuda")


def test_table_cannot_widen_the_semantics():
    wide = native_table.NativeGate("anything", (torch.float16,), masks=native_table.MASK_KINDS)
    for problem in (_problem(softcap=2.0), _problem(window=(3, 0)), _problem(has_sinks=True),
                    _problem(lq=3, lk=9, window=(-1, 0)), _problem(kv_format="int8"), _problem(dv=64)):
        assert routes.semantic_reason(problem, wants_lse=False, mask_dtype=torch.float16)
    assert routes.gate_reason(wide, _problem()) == ""


@pytest.mark.parametrize("lk, left", [(50, 6), (50, 0), (50, 60), (7, 2)])
def test_one_row_window_is_a_key_slice(lk, left):
    q, k, v = torch.randn(2, 1, 4, 16), torch.randn(2, lk, 2, 16), torch.randn(2, lk, 2, 16)
    with trace.capture_routes() as decided:
        out = mfa_hf.flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
    assert next(iter(decided))[0] == "sdpa-cpu-flash"
    start = max(0, lk - 1 - left)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).double(), k[:, start:].transpose(1, 2).double(), v[:, start:].transpose(1, 2).double(),
        enable_gqa=True).transpose(1, 2)
    assert (out.double() - want).abs().max() < 1e-5
    assert math.isfinite(float(out.abs().max()))


# Every shape a mask may broadcast from, its key dimension whole or of size 1 (the latter the same over any keys).
MASK_SHAPES = [(), (1,), (50,), (1, 1, 1, 1), (2, 4, 1, 1), (1, 1, 1, 50), (2, 1, 1, 50), (2, 4, 1, 50), (4, 1, 1)]


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("heads_first", [False, True])
def test_one_row_key_slice_keeps_every_mask_broadcast(shape, dtype, heads_first):
    """A left window over one query row runs native on a slice of the keys (route.key_start): the mask is cut with
    them, except along a key dimension that broadcasts (it crashed there: session 25)."""
    g = torch.Generator().manual_seed(len(shape) * 5 + shape[-1] if shape else 1)
    q, k, v = torch.randn(2, 1, 4, 16, generator=g), torch.randn(2, 50, 4, 16, generator=g), \
        torch.randn(2, 50, 4, 16, generator=g)
    mask = torch.rand(shape, generator=g) > 0.3
    if dtype != torch.bool:
        mask = torch.randn(shape, generator=g).masked_fill(~mask, -math.inf)
    with trace.capture_routes() as decided:
        if heads_first:
            out = mfa_hf.flash_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                         window_size=(6, 0)).transpose(1, 2)
        else:
            out = mfa_hf.flash_attn_func(q, k, v, window_size=(6, 0), attn_mask=mask)
    assert next(iter(decided))[0] == "sdpa-cpu-flash"
    ref, _ = attention_reference(q.double(), k.double(), v.double(), window_size=(6, 0), attn_mask=mask)
    base, _ = attention_reference(q, k, v, window_size=(6, 0), attn_mask=mask, upcast=False)
    assert_close_to_reference(out, ref, base)


@pytest.mark.parametrize("heads, mask, threads, stacked", [
    ((8, 2), False, 1, True), ((6, 1), False, 1, True), ((4, 4), False, 1, False), ((8, 2), True, 1, False),
    ((6, 1), False, 4, False), ((9, 3), False, 2, True)])
def test_one_row_gqa_passes_query_groups_as_rows(heads, mask, threads, stacked, monkeypatch):
    """On CPU one query row with GQA runs as G rows per KV head (native_table's stacks_query_groups) where that
    fills the kernel's threads (native.stacking_pays), never for MHA or with a mask; either way the result
    equals the float64 reference, a NaN query head stays NaN, the others do not."""
    from mfa_hf import native

    calls = []
    as_rows = native._query_groups_as_rows
    monkeypatch.setattr(native, "_query_groups_as_rows", lambda *a: calls.append(1) or as_rows(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_one_row_gqa(heads, mask, stacked, calls)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("batch, heads, head_dim, threads, pays", [
    (1, (9, 3), 64, 1, True), (1, (9, 3), 64, 2, False), (4, (9, 3), 64, 2, True), (1, (32, 8), 64, 2, True),
    (1, (32, 8), 128, 8, True), (1, (16, 2), 128, 2, True), (1, (16, 2), 64, 8, False), (1, (9, 3), 64, 8, False)])
def test_stacking_pays_where_the_kv_heads_fill_the_threads(batch, heads, head_dim, threads, pays):
    """The cases measured on torch's CPU kernel: 3 KV heads on 2 threads ran 1.2x slower stacked, one thread and
    KV heads that split evenly over the threads gained (native.stacking_pays)."""
    from mfa_hf.native import stacking_pays

    assert stacking_pays(batch, *heads, head_dim, threads) == pays


def _check_one_row_gqa(heads, mask, stacked, calls):

    g = torch.Generator().manual_seed(heads[0])
    q = torch.randn(3, 1, heads[0], 32, generator=g)
    k, v = (torch.randn(3, 45, heads[1], 32, generator=g) for _ in range(2))
    q[1, 0, heads[0] - 1, 4] = float("nan")
    attn_mask = (torch.rand(3, 1, 1, 45, generator=g) > 0.3) if mask else None
    with trace.capture_routes() as decided:
        out = mfa_hf.flash_attn_func(q, k, v, causal=True, window_size=(20, 0), attn_mask=attn_mask)
    assert next(iter(decided))[0] == "sdpa-cpu-flash" and bool(calls) == stacked
    ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=True, window_size=(20, 0),
                                 attn_mask=attn_mask)
    base, _ = attention_reference(q, k, v, causal=True, window_size=(20, 0), attn_mask=attn_mask, upcast=False)
    assert bool(out[1, 0, heads[0] - 1].isnan().all()) and bool(torch.isfinite(out[:, :, :heads[0] - 1]).all())
    keep = ~ref.isnan()
    assert_close_to_reference(out[keep], ref[keep], base[keep])


@pytest.mark.parametrize("layout", ["bhsd-view", "sliced-batch", "expanded-mask"])
def test_native_reads_unusual_unit_stride_layouts(layout):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 4, 40, 32, generator=g).transpose(1, 2) for _ in range(3))  # (B, S, H, D) views
    mask = None
    if layout == "sliced-batch":
        q, k, v = q[::2], k[::2], v[::2]
    if layout == "expanded-mask":
        mask = (torch.rand(1, 1, 40, 40, generator=g) > 0.4).expand(3, 4, 40, 40)
    with trace.capture_routes() as decided:
        out = mfa_hf.flash_attn_func(q, k, v, attn_mask=mask)
    assert next(iter(decided))[0] == "sdpa-cpu-flash"

    ref, _ = attention_reference(q.double(), k.double(), v.double(), attn_mask=mask)
    base, _ = attention_reference(q, k, v, attn_mask=mask, upcast=False)
    assert_close_to_reference(out, ref, base)


# --- decode steps (mfa_hf/decode_plan.py): plain caches route too, decided once per kind of layer ----------------

@pytest.mark.parametrize("window, length", [(None, 40), (7, 40), (None, 29), (3, 29)])
def test_plain_decode_routes_one_row_exactly(window, length, monkeypatch):
    """One query row over a plain cache (B, Hkv, S, D) whose first `length` slots hold keys (a StaticCache's
    buffer is longer): native with a key slice, equal to the float64 reference over the valid keys."""
    from mfa_hf import dispatch
    from mfa_hf.decode_plan import DecodePlan, LayerKV
    from mfa_hf.kernels.contract import CacheSide

    g = torch.Generator().manual_seed(length)
    q = torch.randn(2, 1, 8, 32, generator=g)
    k, v = (torch.randn(2, 40, 2, 32, generator=g) for _ in range(2))
    layer = LayerKV(CacheSide(k, None, "none", 32), CacheSide(v, None, "none", 32), length)
    left = -1 if window is None else window - 1
    chosen = []
    route = dispatch.route
    monkeypatch.setattr(dispatch, "route", lambda *a, **kw: chosen.append(1) or route(*a, **kw))
    with trace.capture_routes() as decided:
        outs = [DecodePlan(2, 1).run(q, layer, scale=0.2, window_left=left) for _ in range(3)]  # three "layers"
    assert list(decided) == [("sdpa-cpu-flash", "native has our semantics here")] and len(chosen) <= 1
    window_size = (left, 0)
    ref, _ = attention_reference(q.double(), k[:, :length].double(), v[:, :length].double(), softmax_scale=0.2,
                                 causal=True, window_size=window_size)
    base, _ = attention_reference(q, k[:, :length], v[:, :length], softmax_scale=0.2, causal=True,
                                  window_size=window_size, upcast=False)
    for out in outs:
        assert_close_to_reference(out, ref, base)


def _heads_first_cache(layout: str, g, batch=2, heads_kv=2, length=37, dim=16):
    """Plain cached K/V (B, Hkv, S, D) as transformers hands them over, in the layouts caches produce."""
    if layout == "contiguous":
        return torch.randn(batch, heads_kv, length, dim, generator=g)
    if layout == "buffer-prefix":  # a longer buffer's first `length` slots (strides of the buffer)
        return torch.randn(batch, heads_kv, length + 9, dim, generator=g)[:, :, :length]
    if layout == "sequence-major":  # (B, S, Hkv, D) storage seen heads first
        return torch.randn(batch, length, heads_kv, dim, generator=g).transpose(1, 2)
    if layout == "expanded-batch":  # one row broadcast over the batch (stride 0)
        return torch.randn(1, heads_kv, length, dim, generator=g).expand(batch, -1, -1, -1)
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["contiguous", "buffer-prefix", "sequence-major", "expanded-batch"])
@pytest.mark.parametrize("heads, window, scaling, nonfinite", [
    ((8, 2), None, None, False), ((8, 2), 5, 0.3, False), ((4, 4), None, 0.3, True), ((6, 1), 40, None, True)])
def test_plain_decode_layers_replay_the_native_route_exactly(layout, heads, window, scaling, nonfinite,
                                                             monkeypatch):
    """transformers' unmasked decode step (integrations/transformers/decode.py plain_decode): the first layer of a
    kind takes the plan (checks, route), the other layers of that kind call the route in transformers' heads-first
    layout directly. Every layer equals the float64 reference (non-finite query rows included: the host check),
    whatever the layout of q, K and V; a traced call, another scale or another backend takes the plan again."""
    from mfa_hf.decode_plan import DecodePlan
    from mfa_hf.integrations.transformers import decode

    planned = []
    run = DecodePlan.run
    monkeypatch.setattr(DecodePlan, "run", lambda self, *a, **kw: planned.append(1) or run(self, *a, **kw))
    decode._native_kinds.clear()
    g = torch.Generator().manual_seed(heads[0] * 31 + (window or 0))
    options = dict(scaling=scaling, sliding_window=window)
    for layer in range(4):
        q = torch.randn(2, 1, heads[0], 16, generator=g).transpose(1, 2)  # (B, Hq, 1, D) from (B, 1, Hq, D)
        if nonfinite:
            q[0, heads[0] - 1, 0, 3] = float("nan")
            q[1, 0, 0, 5] = float("inf")
        k, v = _heads_first_cache(layout, g, heads_kv=heads[1]), _heads_first_cache(layout, g, heads_kv=heads[1])
        out = decode.plain_decode(q, k, v, **options)
        assert out.shape == (2, 1, heads[0], 16)
        scale = 16 ** -0.5 if scaling is None else scaling
        left = -1 if window is None or window >= k.shape[2] + 1 else window - 1
        args = [x.transpose(1, 2) for x in (q, k, v)]
        ref, _ = attention_reference(*(x.double() for x in args), softmax_scale=scale, causal=True,
                                     window_size=(left, 0))
        base, _ = attention_reference(*args, softmax_scale=scale, causal=True, window_size=(left, 0), upcast=False)
        assert torch.equal(out.isnan(), ref.isnan()), f"layer {layer}"
        keep = ~ref.isnan()
        assert_close_to_reference(out[keep], ref[keep], base[keep])
    assert len(planned) == 1, f"{len(planned)} layers of one kind took the plan"
    with trace.capture_routes() as decided:  # traced: the plan, which records the route
        decode.plain_decode(q, k, v, **options)
    assert len(planned) == 2 and list(decided)[0][0] == "sdpa-cpu-flash"
    decode.plain_decode(q, k, v, scaling=0.125, sliding_window=window)  # another kind
    assert len(planned) == 3
    monkeypatch.setenv("MFA_BACKEND", "torch")  # untraced: a replay of the native route would skip the plan
    forced = decode.plain_decode(q, k, v, **options)
    assert len(planned) == 4 and torch.equal(forced.isnan(), out.isnan())
    with trace.capture() as served:
        decode.plain_decode(q, k, v, **options)
    assert trace.served_by(served) == {("torch", "decode"): 1}
    decode._native_kinds.clear()


def test_decode_steps_that_native_cannot_serve_stay_ours():
    from mfa_hf.decode_plan import DecodePlan, LayerKV, group_rows
    from mfa_hf.kernels.contract import CacheSide

    q = torch.randn(2, 1, 4, 16)
    k = torch.randn(2, 20, 2, 16)
    plain = LayerKV(CacheSide(k, None, "none", 16), CacheSide(k, None, "none", 16), 20)
    kv = mfa_hf.quantize_kv(k, "int8")
    from mfa_hf.kvcache import cache_side

    quantized = LayerKV(cache_side(kv), cache_side(kv), 20)
    with trace.capture_routes() as decided, trace.capture() as served:
        DecodePlan(2, 1).run(q, plain, scale=0.25, softcap=5.0)  # softcap
        DecodePlan(2, 1).run(q, plain, scale=0.25, sinks=torch.zeros(4))  # sinks
        DecodePlan(2, 1, group_rows([0, 3], "cpu")).run(q, plain, scale=0.25)  # left padding: row groups
        DecodePlan(2, 2).run(torch.randn(2, 2, 4, 16), plain, scale=0.25)  # two rows: bottom-right causal
        DecodePlan(2, 1).run(q, quantized, scale=0.25)  # quantized cache: never routed
    reasons = [reason for (path, reason) in decided]
    assert all(path == routes.OURS for (path, _) in decided), decided
    assert any("softcap" in r for r in reasons) and any("sinks" in r for r in reasons)
    assert any("top-left" in r for r in reasons)
    assert trace.served_by(served)[("torch", "decode")] == 6  # padding: two groups, two calls


def test_tiny_llama_generate_routes_prefill_and_decode_and_matches_eager():
    transformers = pytest.importorskip("transformers")
    from mfa_hf.integrations.transformers import cache_kwargs  # noqa: F401  registers mps_flash

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    outputs = {}
    for attn in ("eager", "mps_flash"):
        model.set_attn_implementation(attn)
        with torch.no_grad(), trace.capture_routes() as decided:
            outputs[attn] = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(outputs["eager"], outputs["mps_flash"])
    assert decided[("sdpa-cpu-flash", "native has our semantics here")] >= 2, decided


def test_doctor_route_table_measures_checks_and_refuses_off_a_mac(tmp_path):
    """The opt-in per-machine table: rows from a real measurement (here the CPU gate against the torch backend,
    small shapes: the code path, not a figure), the selection rule, and no table written without a Mac."""
    from mfa_hf.doctor import route_table

    rows = route_table.measure("cpu", native_table.DEFAULT["cpu"][:1], "torch", runs=1, lengths=(32, 64))
    assert [r["head_dim"] for r in rows] == [64, 128] and all(r["exact"] for r in rows), rows
    assert all(0 < r["native_s"] < float("inf") and 0 < r["ours_s"] < float("inf") for r in rows)
    if torch.backends.mps.is_available():
        pytest.skip("a Mac: writing the table is the doctor's opt-in, not a test's")
    with pytest.raises(RuntimeError, match="--write-route-table: expected a Mac"):
        route_table.write_for_this_mac(runs=1, path=tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("mask_kind, rows, heads", [("none", 5, (4, 4)), ("none", 1, (4, 2)), ("bool", 5, (4, 2)),
                                                    ("additive", 5, (2, 2)), ("bool", 1, (4, 4))])
def test_nonfinite_query_rows_match_the_reference(mask_kind, rows, heads, compiled):
    """The fused CPU kernel zeroes a NaN query row that sees keys and gives NaN for a non-finite row its mask
    hides; the route restores the reference on each, in eager code (one host read, CPU only: our kernel serves
    the non-finite rows) and compiled with fullgraph (device ops only: no data-dependent branch)."""
    q, k, v, mask, call = nonfinite_query_case(mask_kind, rows, heads, compiled)
    with trace.capture_routes() as decided:
        out = call(q, k, v)
    if not compiled:
        assert next(iter(decided))[0] == "sdpa-cpu-flash"
    ref = assert_nonfinite_rows_match(out, q, k, v, mask)
    assert bool(ref.isnan().any()) and bool((ref == 0).all(-1).any()) == (mask_kind != "none" or not compiled)


def test_the_finiteness_check_reads_the_host_on_cpu_only(monkeypatch):
    """On CPU one host read skips the row fix; off the CPU (meta tensors stand for mps/cuda here), under a
    dispatch mode or compiling, the fix is device ops alone: no read that would wait for a device."""
    from mfa_hf import native

    reads = []
    for name in ("item", "__bool__", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
    q, k, v = (torch.randn(1, 2, 3, 8) for _ in range(3))  # heads first (B, H, L, D), as SDPA takes them
    out = torch.randn(1, 2, 3, 8)
    assert native._nonfinite_rows_restored(q, k, v, None, False, 0.35, out) is out and reads == ["__float__"]
    reads.clear()
    meta = [t.to("meta") for t in (q, k, v, out)]
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool, device="meta")
    fixed = native._nonfinite_rows_restored(*meta[:3], mask, False, 0.35, meta[3])
    assert fixed.shape == out.shape and fixed.device.type == "meta" and reads == []
    # the infinite-score check likewise: one read on CPU, none off it (a bool and an additive mask)
    assert native._infinite_score_rows_restored(q, k, v, None, False, 0.35, out) is out and reads == ["__float__"]
    reads.clear()
    for mask in (mask, torch.zeros(1, 1, 3, 3, device="meta")):
        fixed = native._infinite_score_rows_restored(*meta[:3], mask, False, 0.35, meta[3])
        assert fixed.shape == out.shape and fixed.device.type == "meta" and reads == []


@pytest.mark.parametrize("compiled", [False, True])
# native.py tests the output's rows first for an output 8x smaller than k (the first), k first otherwise
@pytest.mark.parametrize("rows, heads_kv, dim", [(1, 4, 32), (1, 2, 32), (6, 2, 16), (6, 4, 32), (20, 1, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("corrupt, mask_kind", [("k+inf", "none"), ("k-inf", "bool"), ("k-nan", "none"),
                                                ("v+inf", "none"), ("k+inf", "additive"), ("mask+inf", "additive"),
                                                ("mask-nan", "additive")])
def test_infinite_scores_match_the_reference(corrupt, mask_kind, dtype, rows, heads_kv, dim, compiled):
    """A non-finite key or a +inf in an additive mask gives a row an infinite score: the reference's NaN (or, for
    a -inf score, a hidden key). torch's CPU kernel returned 0 for such rows in float16 and bfloat16, and NaN in
    every dtype where a bool mask hid a key of +inf score (session 25); the route restores the reference, eager (our
    kernel serves those rows) and compiled (device ops only; the hidden key's NaN stays, as native.py says). Rows
    that hide every key stay 0."""
    q, k, v, mask = infinite_score_case(corrupt, mask_kind, dtype, rows, heads_kv, dim)
    call = lambda q, k, v: mfa_hf.flash_attn_func(q, k, v, attn_mask=mask)  # noqa: E731
    if compiled:
        torch._dynamo.reset()  # one lambda's code object over many cases: past dynamo's recompile limit
        call = torch.compile(call, fullgraph=True, backend="eager")
    with trace.capture_routes() as decided:
        out = call(q, k, v)
    if not compiled:
        assert next(iter(decided))[0] == "sdpa-cpu-flash"
    if compiled and mask_kind == "bool" and corrupt.startswith("k"):
        # a +inf score that the bool mask hides stays NaN compiled (native._infinite_score_rows_restored): every
        # NaN of the reference is one here, and every other row is the reference's
        ref, _ = attention_reference(q.double(), k.double(), v.double(), attn_mask=mask)
        hidden = out.isnan().any(-1) & ~ref.isnan().any(-1)
        assert bool(ref.isnan().any()) and not bool((ref.isnan() & ~out.isnan()).any())
        base, _ = attention_reference(q, k, v, attn_mask=mask, upcast=False)
        keep = ~(ref.isnan() | hidden[..., None]).expand_as(ref)
        assert_close_to_reference(out[keep], ref[keep], base[keep])
        return
    ref = assert_nonfinite_rows_match(out, q, k, v, mask)
    assert not bool(ref.isfinite().all())
