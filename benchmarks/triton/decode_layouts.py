"""Decode split-kernel variants side by side (issue 19): the key tile as the MMA's M side (`keys_as_rows`), launch
configs around it, and optionally a baseline kernel file (the previous commit's decode_kernel.py), on one GPU.

    BASELINE_KERNEL=path/to/old_decode_kernel.py PYTHONPATH=. python benchmarks/triton/decode_layouts.py [--out DIR]

B=8, Hq=32, Hkv=8, D=128, q_len 1 (device_bench.py's decode problem). Every variant is checked at 4k against
float32 attention on the dequantized cache, then timed at 64k and 4k (do_bench medians, L2 flushed) beside SDPA
bf16 in the same process. For the int8 and nf4 kernels it also writes each variant's SASS opcode counts, registers
and spills, and whether the TTGIR holds Hopper's warp-group MMA, to DIR/decode_layouts_sass.txt.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import device_bench as bench  # noqa: E402

FORMATS = tuple(os.environ.get("DECODE_FORMATS", "bf16,int8,nf4").split(","))
LENGTHS = (65536, 4096)
ROWS = dict(keys_as_rows=True)
VARIANTS = {  # name -> (config override of the plan (None: the backend's default), forced split count (0: the policy's))
    "default": (None, 0),
    "rows": (dict(ROWS), 0),
    "rows-s4": (dict(ROWS, num_stages=4), 0),
    "rows-n64": (dict(ROWS, block_n=64), 0),
    "rows-p8": (dict(ROWS), 8),
}


def _baseline():
    """The kernel module at BASELINE_KERNEL, loaded inside mfa_hf.kernels.triton (its relative imports)."""
    path = os.environ.get("BASELINE_KERNEL")
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("mfa_hf.kernels.triton._baseline_decode_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass
class Kernel:
    """Which split kernel the decode launches: swapped in for the baseline (its plan without the constexprs the
    baseline does not have)."""

    td: object
    baseline: object

    def use(self, name):
        from mfa_hf.kernels.triton.direct_launch import DirectLauncher

        td = self.td
        if not hasattr(self, "_original"):
            self._original = (td._SPLIT, td._make_plan)
        td._plans.clear()
        if name == "baseline":
            original_plan = self._original[1]

            def plan_without_new_options(call, config):
                plan = original_plan(call, config)
                known = set(self.baseline.decode_split_kernel.arg_names) | {"num_warps", "num_stages"}
                options = {k: v for k, v in plan.split_options.items() if k in known}
                return dataclasses.replace(plan, split_options=options)

            td._SPLIT, td._make_plan = DirectLauncher(self.baseline.decode_split_kernel), plan_without_new_options
        else:
            td._SPLIT, td._make_plan = self._original


def _sass_summary(compiled) -> str:
    lines = [f"  registers {getattr(compiled, 'n_regs', '?')}, spills {getattr(compiled, 'n_spills', '?')}"]
    try:
        ttgir = compiled.asm["ttgir"]
        lines.append("  ttgir: warp_group_dot %d, tt.dot %d, mma v%s, local_alloc %d, convert_layout %d" % (
            ttgir.count("warp_group_dot"), ttgir.count("tt.dot "), ",".join(sorted(set(re.findall(
                r"versionMajor = (\d)", ttgir)))), ttgir.count("local_alloc"), ttgir.count("convert_layout")))
    except Exception as error:  # noqa: BLE001
        lines.append(f"  ttgir: {type(error).__name__}: {error}")
    try:
        sass = compiled.asm["sass"]
    except Exception:  # noqa: BLE001 - older Triton: disassemble the cubin ourselves
        try:
            from triton.tools.disasm import get_sass

            sass = get_sass(compiled.asm["cubin"])
        except Exception as error:  # noqa: BLE001
            return "\n".join(lines + [f"  sass: {type(error).__name__}: {error}"])
    ops = collections.Counter(m.group(1).split(".")[0] for m in re.finditer(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass))
    if not ops:  # session 21's H100 run: Triton's disassembly came back without instructions this regex reads
        return "\n".join(lines + [f"  sass: no instructions read ({len(sass)} characters)"])
    lines.append(f"  sass instructions {sum(ops.values())}: " + ", ".join(f"{op} {n}" for op, n in ops.most_common(30)))
    return "\n".join(lines)


def _compiled_for(td, fmt, config):
    """The split kernel kept for `fmt` under `config` (the launch key's format and config fields)."""
    want = None if config is None else tuple(sorted(config.items()))
    kernel_format = "none" if fmt == "bf16" else fmt
    for key, entry in td._SPLIT._by_known.items():
        if key[1][12] == kernel_format and key[1][-1] == want:
            return entry[0].compiled
    return None


def main(out_dir: str) -> None:
    from mfa_hf.kernels.triton import decode as td

    kernel = Kernel(td, _baseline())
    names = (["baseline"] if kernel.baseline is not None else []) + list(VARIANTS)
    copy = bench.copy_bandwidth()
    print(f"copy bandwidth: {copy:.0f} GB/s", flush=True)
    bad, sass, table = set(), [], []
    for length in LENGTHS:
        q, k, v, seqlens, sdpa_ms, _ = bench._decode_problem(length)
        print(f"\n{length} keys: SDPA bf16 {sdpa_ms:.4f} ms", flush=True)
        for fmt in FORMATS:
            k_cache, v_cache, nbytes, call = bench._decode_cache(q, k, v, seqlens, fmt)
            ref = bench._decode_reference(q, k, v, k_cache, v_cache, fmt) if length == LENGTHS[-1] else None
            for name in names:
                if (fmt, name) in bad:
                    continue
                kernel.use(name)
                config, splits = VARIANTS.get(name, (None, 0))
                try:
                    if ref is not None:
                        rel, ok = bench._checked(call(config, splits)[0], ref)
                        if not ok:
                            bad.add((fmt, name))
                            print(f"  {fmt} {name}: rel err {rel:.2e} FAILED", flush=True)
                            continue
                    ms = bench._ms(lambda: call(config, splits))
                    again = bench._ms(lambda: call(config, splits))
                except Exception as error:  # noqa: BLE001 - e.g. out of shared memory, a compile error
                    bad.add((fmt, name))
                    print(f"  {fmt} {name}: {type(error).__name__}: {str(error)[:300]}", flush=True)
                    continue
                best = min(ms, again)
                table.append((length, fmt, name, ms, again, nbytes / best / 1e6, 100 * nbytes / best / 1e6 / copy,
                              sdpa_ms / best))
                print("  {} {}: {:.4f} / {:.4f} ms, {:.0f} GB/s, {:.1f}% copy, x{:.2f} SDPA".format(
                    fmt, name, *table[-1][3:]), flush=True)
                if length == LENGTHS[0] and fmt in ("int8", "nf4", "bf16") and name in ("baseline", "default", "rows"):
                    compiled = _compiled_for(td, fmt, None if name == "baseline" else config)
                    if compiled is not None:
                        sass.append(f"{fmt} {name}\n{_sass_summary(compiled)}")
            kernel.use("default")
            del k_cache, v_cache, ref
        del q, k, v
        torch.cuda.empty_cache()
    print("\n| KV len | format | variant | ms | again | GB/s | % copy | x SDPA bf16 |\n|---|---|---|---|---|---|---|---|")
    for row in table:
        print("| {} | {} | {} | {:.4f} | {:.4f} | {:.0f} | {:.1f} | {:.2f} |".format(*row))
    text = "\n\n".join(sass)
    print("\n" + text)
    if out_dir:
        with open(os.path.join(out_dir, "decode_layouts_sass.txt"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", bench.RESULTS))
    main(parser.parse_args().out)
