"""Regenerates the cost tables of kernels/metal/README.md: ours against MLX, per counter.

    python -m mfa_hf.kernels.metal.emulator.cost_table            # measure, rewrite the README section
    python -m mfa_hf.kernels.metal.emulator.cost_table --print    # measure, print only

Needs clang (the emulator) and MLX's headers (mlx_wheel.py: downloaded once, then cached).
About a minute on one core.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from .apple_gpus import CHIPS, FAMILIES
from .cost_cases import Shape, decode_shape, forward_shape, mlx, ours
from .cost_counters import COUNTERS, LaunchCounters, total
from .cost_model import device_bytes, flops, launch_occupancy, roofline
from .mlx_wheel import mlx_kernels_dir

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- cost-table:begin -->", "<!-- cost-table:end -->"
FORWARD_SHAPES = tuple(forward_shape(d, n) for d in (64, 128, 256) for n in (128, 256))
DECODE_SHAPES = tuple(decode_shape(d, n) for d in (64, 128, 256) for n in (256, 1024))
ROWS = ("simdgroup_mmas",) + tuple(c for c in COUNTERS if c != "mma_lane_calls")


@dataclass(frozen=True)
class Comparison:
    shape: Shape
    ours: list[LaunchCounters]
    mlx: list[LaunchCounters]

    def problem_flops(self) -> int:
        s = self.shape
        return 4 * s.queries * s.keys * s.head_dim * s.heads_q


def measure(shapes, kernels_dir: Path) -> list[Comparison]:
    return [Comparison(s, ours(s), mlx(s, kernels_dir)) for s in shapes]


def short_number(x: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def ratio_text(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else ("=" if a == b else "inf")


def counter_table(comparisons: list[Comparison]) -> list[str]:
    """Rows: counters (totals over the call's launches); cells: ours / MLX (ours / MLX ratio)."""
    head = "| counter | " + " | ".join(c.shape.label for c in comparisons) + " |"
    lines = [head, "|---" * (len(comparisons) + 1) + "|"]
    for row in ROWS:
        cells = []
        for c in comparisons:
            a, b = total(c.ours, row), total(c.mlx, row)
            cells.append(f"{short_number(a)} / {short_number(b)} ({ratio_text(a, b)})")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    kernels = lambda launches: " + ".join(f"`{l.kernel}` ({l.threads_per_threadgroup} thr)" for l in launches)  # noqa: E731
    lines.append(f"\nLaunches at {comparisons[-1].shape.label}: ours {kernels(comparisons[-1].ours)}; "
                 f"MLX {kernels(comparisons[-1].mlx)}"
                 + (" (decode: our split count follows `plan_splits`, so longer caches add the merge kernel)"
                    if comparisons[0].shape.kind == "decode" else "") + ".")
    return lines


def _largest_per_dim(comparisons: list[Comparison]) -> list[Comparison]:
    best: dict[int, Comparison] = {}
    for c in comparisons:
        if c.shape.head_dim not in best or c.shape.keys > best[c.shape.head_dim].shape.keys:
            best[c.shape.head_dim] = c
    return [best[d] for d in sorted(best)]


def targets_table(forward: list[Comparison], decode: list[Comparison]) -> list[str]:
    """The issue's three targets as counter ratios, at the longest measured length per head dim."""
    lines = ["| head dim | forward threadgroup bytes / FLOP: ours, MLX, target ours <= MLX | "
             "decode device bytes / K+V bytes: ours, MLX, target ours <= 1.05 | "
             "forward simdgroups per core (Apple7): ours, MLX, target ours >= MLX |", "|---|---|---|---|"]
    by_dim = {c.shape.head_dim: c for c in _largest_per_dim(decode)}
    apple7 = FAMILIES[0]
    for f in _largest_per_dim(forward):
        tg = lambda launches: (total(launches, "threadgroup_bytes_read")  # noqa: E731
                               + total(launches, "threadgroup_bytes_written")) / f.problem_flops()
        ours_tg, mlx_tg = tg(f.ours), tg(f.mlx)
        d = by_dim.get(f.shape.head_dim)
        ours_dev, mlx_dev = (device_bytes(d.ours) / d.shape.kv_bytes, device_bytes(d.mlx) / d.shape.kv_bytes) if d \
            else (float("nan"),) * 2
        ours_occ = launch_occupancy(f.ours[0], apple7).simdgroups_per_core
        mlx_occ = launch_occupancy(f.mlx[0], apple7).simdgroups_per_core
        mark = lambda ok: "met" if ok else "**not met**"  # noqa: E731
        lines.append(f"| {f.shape.head_dim} | {ours_tg:.3f}, {mlx_tg:.3f}: {mark(ours_tg <= mlx_tg)} | "
                     f"{ours_dev:.3f}, {mlx_dev:.3f}: {mark(ours_dev <= 1.05)} | "
                     f"{ours_occ}, {mlx_occ}: {mark(ours_occ >= mlx_occ)} |")
    return lines


def occupancy_table(forward: list[Comparison], decode: list[Comparison]) -> list[str]:
    lines = ["| kernel | head dim | threads / TG | peak TG memory | " + " | ".join(
        f"{g.name} ({g.chips})" for g in FAMILIES) + " |", "|---" * (4 + len(FAMILIES)) + "|"]
    for who in ("ours", "mlx"):
        for c in _largest_per_dim(forward) + _largest_per_dim(decode):
            launch = getattr(c, who)[0]
            cells = [launch_occupancy(launch, g).describe for g in FAMILIES]
            lines.append(f"| {who} {c.shape.kind} `{launch.kernel}` | {c.shape.head_dim} | "
                         f"{launch.threads_per_threadgroup} | {launch['peak_threadgroup_bytes']} B | "
                         + " | ".join(cells) + " |")
    return lines


def roofline_table(comparisons: list[Comparison]) -> list[str]:
    lines = ["| call | FLOPs | device bytes | FLOP / byte | " + " | ".join(
        f"{c.name} ({c.peak_fp32_tflops.value:g} TFLOPS, {c.memory_gb_per_s.value:g} GB/s)" for c in CHIPS) + " |",
             "|---" * (4 + len(CHIPS)) + "|"]
    for c in _largest_per_dim(comparisons):
        for who in ("ours", "mlx"):
            launches = getattr(c, who)
            f, b = flops(launches), device_bytes(launches)
            cells = [f"{r.time_us:.3g} us ({r.bound})" for r in (roofline(launches, chip) for chip in CHIPS)]
            lines.append(f"| {who} {c.shape.kind} {c.shape.label} | {short_number(f)} | {short_number(b)} | {f / b:.1f} | "
                         + " | ".join(cells) + " |")
    return lines


def render(forward: list[Comparison], decode: list[Comparison]) -> str:
    shape = lambda s: f"B=1, Hq={s.heads_q}, Hkv={s.heads_kv}, Lq={s.queries if s.kind == 'decode' else 'L'}"  # noqa: E731
    parts = [
        BEGIN,
        "Generated by `python -m mfa_hf.kernels.metal.emulator.cost_table` (emulator counters, fp16, not causal, "
        "no mask; definitions in `emulator/cost_counters.py` and `emulator/cost_instrument.py`). Cells: "
        "ours / MLX (ratio).",
        "",
        f"**Forward** (ours `attention_forward` vs MLX steel attention; {shape(forward[0].shape)}):",
        "", *counter_table(forward), "",
        f"**Decode** (ours `attention_decode` vs MLX 2-pass `sdpa_vector`, blocks = 64; {shape(decode[0].shape)}):",
        "", *counter_table(decode), "",
        "**Targets of issue 20 as counter ratios** (longest measured length per head dim):", "",
        *targets_table(forward, decode), "",
        "**Occupancy estimate** (resident simdgroups per core; `cost_model.py`, inputs in `apple_gpus.py`):", "",
        *occupancy_table(forward, decode), "",
        "**Roofline estimate** per call (no cache reuse; `cost_model.py`; chip figures and sources in "
        "`apple_gpus.py`):", "",
        *roofline_table(forward), *roofline_table(decode)[2:], "",
        END,
    ]
    return "\n".join(parts)


def write_readme(section: str, path: Path = README, begin: str = BEGIN, end: str = END) -> None:
    """Replace the README's section between `begin` and `end` (markers included in `section`), or append it."""
    text = path.read_text()
    if begin in text and end in text:
        start, stop = text.index(begin), text.index(end) + len(end)
        text = text[:start] + section + text[stop:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def section_cli(argv: list[str] | None, doc: str, make_section, write) -> int:
    """`--print` prints the section; otherwise `write(section)` puts it into the README."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--print", action="store_true", help="print the section instead of writing the README")
    args = parser.parse_args(argv)
    section = make_section()
    if args.print:
        print(section)
    else:
        write(section)
        print(f"wrote the section into {README}")
    return 0


def main(argv: list[str] | None = None) -> int:
    def section() -> str:
        kernels_dir = mlx_kernels_dir()
        return render(measure(FORWARD_SHAPES, kernels_dir), measure(DECODE_SHAPES, kernels_dir))

    return section_cli(argv, __doc__, section, write_readme)


if __name__ == "__main__":
    sys.exit(main())
