"""The cost-table command on one tiny forward and decode shape: it measures ours and MLX's kernels
and renders every section; writing replaces only the marked README section. Needs MLX's headers
(mlx_dir: a failure, or a skip under MFA_MLX_METAL_OFFLINE=1)."""

from __future__ import annotations

from mfa_hf.kernels.metal.emulator import cost_table
from mfa_hf.kernels.metal.emulator.cost_cases import decode_shape, forward_shape


def test_the_table_renders_ours_against_mlx(emulator, mlx_dir):
    forward = cost_table.measure([forward_shape(64, 64)], mlx_dir)
    decode = cost_table.measure([decode_shape(64, 64)], mlx_dir)
    section = cost_table.render(forward, decode)
    assert section.startswith(cost_table.BEGIN) and section.endswith(cost_table.END)
    for row in cost_table.ROWS:
        assert f"| {row} |" in section
    assert "Targets of issue 20" in section and "Occupancy estimate" in section and "Roofline estimate" in section
    # Same work on both sides: the forward's MMAs agree exactly (4 L^2 D FLOPs / 1024 per MMA).
    assert forward[0].ours[0].simdgroup_mmas == forward[0].mlx[0].simdgroup_mmas == 4 * 64 * 64 * 64 // 1024


def test_writing_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{cost_table.BEGIN}\nold\n{cost_table.END}\noutro\n")
    cost_table.write_readme(f"{cost_table.BEGIN}\nnew\n{cost_table.END}", readme)
    assert readme.read_text() == f"intro\n{cost_table.BEGIN}\nnew\n{cost_table.END}\noutro\n"
