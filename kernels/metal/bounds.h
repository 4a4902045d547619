// Index arithmetic on `long` shared by the kernels (Metal's min/max/clamp are not declared for
// 64-bit integers on every MSL version the kernels compile as).
#pragma once

inline long lmin(long a, long b) { return a < b ? a : b; }
inline long lmax(long a, long b) { return a > b ? a : b; }

// x clamped into [lo, hi]: indices read from device buffers that the host did not check
// (mfa_hf.problem.values_checked) are kept inside the tensors they address.
inline long clamp_index(long x, long lo, long hi) { return lmin(lmax(x, lo), hi); }
