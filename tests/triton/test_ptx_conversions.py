"""The decode kernel's packed PTX code conversions (decode_kernel.py), run on the CPU by a small evaluator of the
instructions they use, against every code: the GPU runs them, Triton's interpreter does not (it takes the
integer paths), so a wrong selector or table word would otherwise show only on a GPU.

Each block takes 4 codes in one 32-bit register (code i in byte i, as tl.inline_asm_elementwise packs them) and
returns float16 pairs (element 2j in the low half of output j).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mfa_hf.kv_formats import spec
from mfa_hf.kernels.triton import decode_kernel as dk


def _prmt(a: int, b: int, selector: int) -> int:
    source = a | b << 32
    out = 0
    for i in range(4):
        nibble = selector >> (4 * i) & 0xF
        byte = source >> (8 * (nibble & 7)) & 0xFF
        if nibble & 8:  # sign replicate
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _halves(word: int) -> np.ndarray:
    return np.array([word & 0xFFFF, word >> 16], dtype=np.uint16).view(np.float16)


def _word(halves: np.ndarray) -> int:
    bits = halves.astype(np.float16).view(np.uint16)
    return int(bits[0]) | int(bits[1]) << 16


def _fp8_to_f16_bits(byte: int, kind: str) -> int:
    dtype = torch.float8_e4m3fn if kind == "e4m3x2" else torch.float8_e5m2
    value = torch.tensor([byte], dtype=torch.uint8).view(dtype).to(torch.float16)
    return int(value.view(torch.int16).item()) & 0xFFFF


def run_ptx(asm: str, inputs: dict) -> dict:
    """Evaluate `asm` with registers `inputs` ({"$4": word, ...}); returns every register after the block."""
    regs = dict(inputs)

    def value(token: str) -> int:
        token = token.strip()
        if token in regs:
            return regs[token]
        return int(token, 0)

    for line in asm.replace("{\n", "\n").split("\n"):
        line = line.strip().rstrip(";").strip()
        if not line or line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        unpack = re.fullmatch(r"\{(\w+),\s*(\w+)\},\s*(\$\d+)", rest)
        if op == "mov.b32" and unpack:
            lo, hi, src = unpack.groups()
            regs[lo], regs[hi] = value(src) & 0xFFFF, value(src) >> 16
            continue
        dst, *args = [t.strip() for t in rest.split(",")]
        a = [value(t) for t in args]
        if op == "mov.b32":
            regs[dst] = a[0]
        elif op == "and.b32":
            regs[dst] = a[0] & a[1]
        elif op == "or.b32":
            regs[dst] = a[0] | a[1]
        elif op == "xor.b32":
            regs[dst] = a[0] ^ a[1]
        elif op == "shr.b32":
            regs[dst] = a[0] >> a[1]
        elif op == "prmt.b32":
            regs[dst] = _prmt(a[0], a[1], a[2])
        elif op == "sub.f16x2":
            regs[dst] = _word(_halves(a[0]) - _halves(a[1]))
        elif op.startswith("cvt.rn.f16x2."):
            kind = op.rsplit(".", 1)[1]
            regs[dst] = _fp8_to_f16_bits(a[0] & 0xFF, kind) | _fp8_to_f16_bits(a[0] >> 8 & 0xFF, kind) << 16
        else:
            raise AssertionError(f"instruction the evaluator does not know: {line!r}")
        regs[dst] &= 0xFFFFFFFF
    return regs


def _packed_words():
    """Every byte value, 4 per word, in shuffled order (each position sees many bytes)."""
    codes = np.random.default_rng(0).permutation(np.tile(np.arange(256), 4)).astype(np.uint32)
    return [int(w) for w in codes[0::4] | codes[1::4] << 8 | codes[2::4] << 16 | codes[3::4] << 24]


def _unpacked(regs: dict, names) -> list:
    return [int(v) for name in names for v in _halves(regs[name]).view(np.uint16)]


def _f16_bits(values) -> list:
    return [int(v) for v in np.asarray(values, dtype=np.float16).view(np.uint16)]


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_byte_conversions_give_each_code_exactly(fmt):
    asm = {"int8": dk.INT8_ASM, "fp8_e4m3": dk.E4M3_ASM, "fp8_e5m2": dk.E5M2_ASM}[fmt].value
    for word in _packed_words():
        codes = [word >> (8 * i) & 0xFF for i in range(4)]
        regs = run_ptx(asm, {"$2": word})
        if fmt == "int8":
            want = _f16_bits([c - 256 if c >= 128 else c for c in codes])
        else:
            want = [_fp8_to_f16_bits(c, "e4m3x2" if fmt == "fp8_e4m3" else "e5m2x2") for c in codes]
        got = _unpacked(regs, ("$0", "$1"))
        nan = [w & 0x7C00 == 0x7C00 and w & 0x3FF for w in want]
        assert [g if not n else "nan" for g, n in zip(got, nan)] == [w if not n else "nan" for w, n in zip(want, nan)], (
            f"{fmt} word {word:#010x}")


@pytest.mark.parametrize("block", ["NF4_LO_ASM", "NF4_HI_ASM"])
def test_nf4_gives_the_nibbles_levels_for_every_byte(block):
    """The low nibbles' block (elements 2i) and the high nibbles' (2i + 1)."""
    levels = _f16_bits(spec("nf4").codebook)
    high = block == "NF4_HI_ASM"
    for word in _packed_words():
        regs = run_ptx(getattr(dk, block).value, {"$2": word})
        codes = [word >> (8 * i) & 0xFF for i in range(4)]
        want = [levels[c >> 4 if high else c & 0xF] for c in codes]
        assert _unpacked(regs, ("$0", "$1")) == want, f"{block} of {word:#010x}"


def test_hardware_tanh_only_for_half_precision_on_cuda(monkeypatch):
    """The softcap's tanh.approx.f32 (binding.softcap_mode 2), when switched on (HARDWARE_TANH), is taken for
    float16/bfloat16 on CUDA from compute capability 7.5 only: float32 keeps the exact tanh (its tolerance is
    float32's), the CPU interpreter cannot run PTX, a GPU before Turing has no tanh.approx, no softcap is mode 0."""
    from mfa_hf.kernels.triton import binding
    from mfa_hf.kernels.triton.binding import softcap_mode

    monkeypatch.setattr(binding, "HARDWARE_TANH", True)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability[0])
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert [softcap_mode(30.0, dtype, cuda) for dtype in (torch.float16, torch.bfloat16, torch.float32)] == [2, 2, 1]
    assert softcap_mode(30.0, torch.bfloat16, cpu) == 1
    assert softcap_mode(0.0, torch.bfloat16, cuda) == 0
    capability[0] = (7, 0)  # a Volta has no tanh.approx
    assert softcap_mode(30.0, torch.bfloat16, cuda) == 1
    capability[0] = (9, 0)
    monkeypatch.setattr(binding, "HARDWARE_TANH", False)
    assert softcap_mode(30.0, torch.bfloat16, cuda) == 1
