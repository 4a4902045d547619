#!/usr/bin/env python
"""Plain-bf16 Triton decode at 4k keys, H200: why device_bench's 'ms' went 0.051 (2026-12-04 session 3) ->
0.081 (2026-12-05 session 9) while fp8/int8 at 4k and bf16 at 16k/64k did not move.

Written 2026-12-05 without a GPU (compiled, its imports tried on CPU): not yet run on one. The code history between
the two sessions shows no change to this call's work on the GPU (same launch config, splits and plan; 16k/64k
unchanged to 0.3%), so the first thing it checks is whether 0.081 was host time exposed by one noisy sample.

One process, the variants side by side, in several rounds of shuffled order, over the exact problem of
benchmarks/triton/device_bench.py decode (B=8, Hq=32, Hkv=8, D=128, q_len 1, full int32 lengths, bf16 cache):

  sdpa                 SDPA bf16 (enable_gqa), as device_bench
  direct               kernels/triton/decode.decode(DecodeCall...)  == device_bench's 'ms' column (cfg None)
  direct_splits8/32    the same, num_splits forced (default at 4k: 16 splits + merge)
  direct_bn128w4s3     the quantized caches' launch config on the bf16 cache (default bf16: 64 keys, 4 warps, 3 st.)
  direct_bn128w8s2     the 64k sweep's best bf16 config (h200-triton-decode-sweep-2026-12-04-session3.log)
  direct_nodl          MFA_TRITON_DIRECT_LAUNCH=0 (Triton's own binding per launch: more host time)
  fp8_direct           the fp8_e4m3 cache through the same direct call (the control that did not regress)
  api_tensor/api_int   mfa_hf.flash_attn_with_kvcache, tensor / int cache_seqlens (device_bench's api columns)

Per variant three numbers:
  bench   triton.testing.do_bench median (L2 flushed before each call) == how device_bench times; median over
          rounds and its min..max (the spread between rounds is the first thing to read);
  graph   GPU time only: (flush + call) and (flush) captured in CUDA graphs, replayed, subtracted: no host cost;
  host    host µs per call (enqueue wall time of back-to-back calls).
If bench >> graph for 'direct' while graph ~ 50 µs, the 0.081 was host time exposed by do_bench (noise or a
slower/loaded host), not the kernel. If graph itself is ~80 µs, the GPU side changed: compare the config/split
variants, and an old tree (--compare-tree, below).

Usage (from the repository root, on a CUDA machine; writes nothing into the repository):
    MFA_BACKEND=triton python /path/to/check_bf16_decode.py [--rounds 5] [--lengths 4096,16384] [--json FILE]
    # optionally the session-3 code side by side (children alternate, one round each):
    #   git archive becabc1 | tar -x -C <DIR>     (DIR reachable on the GPU machine)
    MFA_BACKEND=triton python check_bf16_decode.py --compare-tree <DIR> --rounds 4
If mfa_hf.kernels is not importable (a plain checkout without gpu_run.sh's symlinks), a shadow package of
symlinks is built in a temporary folder; bytecode writing is off.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True

B, HQ, HKV, D = 8, 32, 8, 128


def _import_mfa(root: str):
    """Import mfa_hf (with mfa_hf.kernels) from `root`, through a symlink shadow package when needed."""
    root = os.path.abspath(root)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import mfa_hf.kernels.triton.decode as td  # editable install or gpu_run.sh's symlinks
        import mfa_hf
        # both from `root` (an editable install elsewhere can supply mfa_hf.kernels from another tree)
        if all(os.path.realpath(f).startswith(os.path.realpath(root) + os.sep) for f in (mfa_hf.__file__, td.__file__)):
            return mfa_hf
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "mfa_hf" or m.startswith("mfa_hf.") or m == "kernels"
                 or m.startswith("kernels.")]:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
    shadow = tempfile.mkdtemp(prefix="hC_shadow_")
    pkg = os.path.join(shadow, "mfa_hf")
    os.mkdir(pkg)
    for name in os.listdir(os.path.join(root, "mfa_hf")):
        if name not in ("kernels", "integrations", "__pycache__"):
            os.symlink(os.path.join(root, "mfa_hf", name), os.path.join(pkg, name))
    for sub in ("kernels", "integrations"):
        if os.path.isdir(os.path.join(root, sub)):
            os.symlink(os.path.join(root, sub), os.path.join(pkg, sub))
    sys.path.insert(0, shadow)
    import mfa_hf
    import mfa_hf.kernels.triton.decode as td
    if not os.path.realpath(td.__file__).startswith(os.path.realpath(root) + os.sep):
        raise ImportError(f"mfa_hf.kernels came from {td.__file__}, not from {root}")
    return mfa_hf


def _env_info():
    import torch
    import triton

    info = dict(torch=torch.__version__, triton=triton.__version__, gpu=torch.cuda.get_device_name(),
                sms=torch.cuda.get_device_properties(0).multi_processor_count, cpus=len(os.sched_getaffinity(0)),
                loadavg=os.getloadavg(), MFA_BACKEND=os.environ.get("MFA_BACKEND"))
    for query in ("name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu",):
        try:
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                                capture_output=True, text=True, timeout=10).stdout.strip()
            info["gpu_apps"] = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception as error:  # noqa: BLE001
            info["nvidia_smi"] = f"unavailable: {error}"
    return info


def _flush_buffer():
    import torch

    return torch.empty(int(256e6 // 4), dtype=torch.int, device="cuda")  # what do_bench zeroes per call


def _graph_us(fn, flush, replays: int = 50):
    """GPU µs of fn with the L2 flushed before it, host excluded: graphs of (flush; fn) and (flush) replayed."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    both, alone = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(both):
        flush.zero_()
        fn()
    with torch.cuda.graph(alone):
        flush.zero_()

    def timed(graph):
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / replays

    flush_us = timed(alone)
    return timed(both) - flush_us, flush_us


def _host_us(fn, calls: int = 200):
    import torch

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


class _Env:
    def __init__(self, env):
        self.env, self.old = env or {}, {}

    def __enter__(self):
        for name, value in self.env.items():
            self.old[name] = os.environ.get(name)
            os.environ[name] = value

    def __exit__(self, *exc):
        for name, value in self.old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def measure(length: int, rounds: int, seed: int, mfa_hf) -> dict:
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    from mfa_hf.kernels.contract import DecodeCall
    from mfa_hf.kernels.triton import decode as td

    g = torch.Generator(device="cuda").manual_seed(length)  # device_bench._decode_problem
    q = torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, length, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, length, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    seqlens = torch.full((B,), length, dtype=torch.int32, device="cuda")
    kh, vh, qh = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), q.transpose(1, 2)
    k8, v8 = mfa_hf.quantize_kv(k, "fp8_e4m3"), mfa_hf.quantize_kv(v, "fp8_e4m3")

    def direct(cfg=None, splits=0, kc=k, ks=None, vc=v, vs=None, fmt="none", group=D):
        def call():
            return td.decode(DecodeCall.from_op_args((q, kc, ks, vc, vs, seqlens, None, None, None, fmt, fmt, group,
                                                      group, 1 / math.sqrt(D), -1, 0, 0.0, splits)), config=cfg)
        return call

    fp8 = direct(kc=k8.codes, ks=k8.scales, vc=v8.codes, vs=v8.scales, fmt=k8.format.value, group=k8.group_size)
    variants = {  # name -> (fn, environment, graph-capturable)
        "sdpa": (lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True), None, True),
        "direct": (direct(), None, True),
        "direct_splits8": (direct(splits=8), None, True),
        "direct_splits32": (direct(splits=32), None, True),
        "direct_bn128w4s3": (direct(dict(block_n=128, num_warps=4, num_stages=3)), None, True),
        "direct_bn128w8s2": (direct(dict(block_n=128, num_warps=8, num_stages=2)), None, True),
        "direct_nodl": (direct(), {"MFA_TRITON_DIRECT_LAUNCH": "0"}, False),
        "fp8_direct": (fp8, None, True),
        "api_tensor": (lambda: mfa_hf.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens), None, False),
        "api_int": (lambda: mfa_hf.flash_attn_with_kvcache(q, k, v, cache_seqlens=length), None, False),
    }
    # what the default plan is (the same in session 3 and 9 by the code: 64 keys, 4 warps, 3 stages, 16 splits)
    policy = td.split_policy(q.device)
    plan = dict(DECODE_CONFIG=dict(td.DECODE_CONFIG), DECODE_CONFIG_QUANT=dict(td.DECODE_CONFIG_QUANT),
                PROGRAMS_PER_SM=td.PROGRAMS_PER_SM, policy=repr(policy),
                splits_bf16=policy.splits(B * HKV, length, td.DECODE_CONFIG["block_n"]),
                splits_quant=policy.splits(B * HKV, length, td.DECODE_CONFIG_QUANT["block_n"]))
    ref = F.scaled_dot_product_attention(qh.float(), kh.float(), vh.float(), enable_gqa=True).transpose(1, 2)
    checks = {}
    for name, (fn, env, _) in variants.items():  # correctness, and compiles everything before timing
        with _Env(env):
            out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out = out.transpose(1, 2) if name == "sdpa" else out
        checks[name] = round(((out.float() - ref).norm() / ref.norm()).item(), 5)
    bench = {name: [] for name in variants}
    host = {name: [] for name in variants}
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            fn, env, _ = variants[name]
            with _Env(env):
                bench[name].append(do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3)
                host[name].append(_host_us(fn))
    flush = _flush_buffer()
    graph, flush_us = {}, None
    for name, (fn, env, capturable) in variants.items():
        if not capturable:
            continue
        try:
            graph[name], flush_us = _graph_us(fn, flush)
        except Exception as error:  # noqa: BLE001 - report, keep going
            graph[name] = f"{type(error).__name__}: {str(error)[:120]}"
            torch.cuda.synchronize()
    rows = {}
    for name in variants:
        times = bench[name]
        rows[name] = dict(bench_us=round(statistics.median(times), 1), bench_min=round(min(times), 1),
                          bench_max=round(max(times), 1), bench_all=[round(t, 1) for t in times],
                          graph_us=graph.get(name) if isinstance(graph.get(name), str) else
                          (None if name not in graph else round(graph[name], 1)),
                          host_us=round(statistics.median(host[name]), 1), rel_err=checks[name])
    return dict(length=length, plan=plan, flush_us=None if flush_us is None else round(flush_us, 1), rows=rows)


def _print(result: dict, label: str = ""):
    rows, sdpa = result["rows"], result["rows"]["sdpa"]["bench_us"]
    print(f"\n{label}L={result['length']}: plan {result['plan']}\n  do_bench's L2 flush alone: {result['flush_us']} µs "
          "(host time per call above about this is exposed in 'bench')")
    print(f"  {'variant':18s} {'bench µs (min..max)':>26s} {'graph µs':>9s} {'host µs':>8s} {'x sdpa':>7s} {'rel err':>8s}")
    for name, r in rows.items():
        graph = r["graph_us"] if not isinstance(r["graph_us"], str) else "fail"
        print(f"  {name:18s} {r['bench_us']:>9} ({r['bench_min']}..{r['bench_max']}){'':>3s} {str(graph):>9s} "
              f"{r['host_us']:>8} {sdpa / r['bench_us']:>7.2f} {r['rel_err']:>8}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=".", help="tree to import mfa_hf from (default: the current folder)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here (never inside the repository)")
    parser.add_argument("--compare-tree", default=None, help="a second tree (e.g. git archive becabc1), alternated")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]

    if args.compare_tree and not args.child:
        results = {}
        for r in range(args.rounds):
            for tree in ((".", args.compare_tree) if r % 2 == 0 else (args.compare_tree, ".")):
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--root", tree, "--rounds", "1",
                       "--lengths", args.lengths, "--seed", str(r)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"child {tree} failed:\n{done.stderr[-3000:]}")
                    continue
                out = json.loads(done.stdout.strip().splitlines()[-1])
                results.setdefault(tree, []).append(out)
                for res in out["results"]:
                    _print(res, label=f"[{tree} round {r}] ")
        print("\nsummary, median over children of 'direct' bench / graph µs per tree and length:")
        for tree, outs in results.items():
            for i, length in enumerate(lengths):
                b = [o["results"][i]["rows"]["direct"]["bench_us"] for o in outs]
                g = [o["results"][i]["rows"]["direct"]["graph_us"] for o in outs
                     if isinstance(o["results"][i]["rows"]["direct"]["graph_us"], float)]
                print(f"  {tree:30s} L={length}: bench {statistics.median(b):.1f}  graph "
                      f"{statistics.median(g) if g else None}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return

    import torch

    mfa_hf = _import_mfa(args.root)
    info = _env_info()
    info["mfa_hf_from"] = os.path.dirname(mfa_hf.__file__)
    results = [measure(length, args.rounds, args.seed, mfa_hf) for length in lengths]
    torch.cuda.synchronize()
    if args.child:
        print(json.dumps(dict(info=info, results=results)))
        return
    print(json.dumps(info))
    for res in results:
        _print(res)
    print("\nreading: 'direct' is device_bench's 'ms' column. bench ~ graph ~ 50 µs: no regression on this machine, "
          "the 0.081 was one noisy sample; bench >> graph: host time exposed (see host µs vs the flush time); "
          "graph ~ 80 µs: the GPU side changed (compare config/split variants, --compare-tree becabc1).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, results=results), f, indent=1)


if __name__ == "__main__":
    main()
