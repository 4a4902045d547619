// In-register dequantization of KV-cache codes (formats of mfa_hf/quant.py).
//
// value = decode(code) * scale. FP8 bytes are decoded by bit manipulation into a float's bits
// (no lookup table, no half detour): e4m3fn has no infinity and NaN at 0x7F/0xFF; e5m2 follows
// IEEE (exponent 31: infinity or NaN). int8 is symmetric (no zero point). nf4 packs element 2i in
// the low nibble and 2i + 1 in the high nibble of byte i; codes index the QLoRA NormalFloat table.
#pragma once
#include <metal_stdlib>
using namespace metal;

// Kernel ids of mfa_hf/kv_formats.py (FMT_<NAME>); kernels/metal/decode.py checks them at import.
#define FMT_NONE 0
#define FMT_FP8_E4M3 1
#define FMT_FP8_E5M2 2
#define FMT_INT8 3
#define FMT_NF4 4

constant float NF4_LEVELS[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

// e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits. Subnormals (exponent 0) are m * 2^-9.
inline float fp8_e4m3_to_float(uchar code) {
  const uint sign = uint(code >> 7) << 31;
  const uint exponent = (code >> 3) & 0xF, mantissa = code & 0x7;
  if (exponent == 0xF && mantissa == 0x7) return as_type<float>(sign | 0x7FC00000u);
  if (exponent == 0) return as_type<float>(sign | as_type<uint>(float(mantissa) * 0.001953125f));
  return as_type<float>(sign | ((exponent + 120) << 23) | (mantissa << 20));
}

// e5m2: sign, 5 exponent bits (bias 15), 2 mantissa bits; exponent 31 is infinity (m = 0) or NaN.
inline float fp8_e5m2_to_float(uchar code) {
  const uint sign = uint(code >> 7) << 31;
  const uint exponent = (code >> 2) & 0x1F, mantissa = code & 0x3;
  if (exponent == 0x1F) return as_type<float>(sign | (mantissa ? 0x7FC00000u : 0x7F800000u));
  if (exponent == 0) return as_type<float>(sign | as_type<uint>(float(mantissa) * 0.0000152587890625f));
  return as_type<float>(sign | ((exponent + 112) << 23) | (mantissa << 21));
}

// Element c of one (token, head) row of codes; nf4 reads byte c / 2 (strides count bytes).
inline float code_value(device const uchar* row, int c, long stride_d, int fmt) {
  if (fmt == FMT_NF4) {
    const uchar byte = row[(c / 2) * stride_d];
    return NF4_LEVELS[(c & 1) ? (byte >> 4) : (byte & 0xF)];
  }
  const uchar code = row[c * stride_d];
  return fmt == FMT_FP8_E4M3 ? fp8_e4m3_to_float(code) : fp8_e5m2_to_float(code);
}
inline float code_value(device const char* row, int c, long stride_d, int) { return float(row[c * stride_d]); }
inline float code_value(device const half* row, int c, long stride_d, int) { return float(row[c * stride_d]); }
#if __METAL_VERSION__ >= 310  // bfloat exists from MSL 3.1 (macOS 14); torch 2.7/2.8 compile 3.0 on macOS 13
inline float code_value(device const bfloat* row, int c, long stride_d, int) { return float(row[c * stride_d]); }
#endif
inline float code_value(device const float* row, int c, long stride_d, int) { return row[c * stride_d]; }
