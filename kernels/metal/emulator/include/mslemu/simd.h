// Barriers and simd-group functions. Every collective is a rendezvous: the lane parks a pointer
// to its argument and result (both on its own fiber stack) and the runtime runs the combiner
// once all active lanes of the simd-group have arrived. Call sites are told apart by the
// caller's line and column (default arguments are evaluated at the call site).
#pragma once
#include "runtime_api.h"
#include "vectors.h"

namespace metal {
enum class mem_flags : uint32_t {
  mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4, mem_threadgroup_imageblock = 8
};
MSLEMU_INLINE mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(uint32_t(a) | uint32_t(b));
}

MSLEMU_INLINE void threadgroup_barrier(mem_flags = mem_flags::mem_none, uint32_t line = __builtin_LINE(),
                                       uint32_t col = __builtin_COLUMN()) {
  mslemu_threadgroup_barrier(mslemu::site_id(line, col));
}
}  // namespace metal

namespace mslemu {
inline void noop_collective(const void* const*, void* const*, uint32_t) {}

// Runs `fn` over the simd-group with this lane's input `in`, returning this lane's result.
template <class R, class In>
MSLEMU_INLINE R collective(mslemu_collective_fn fn, const In& in, uint32_t site) {
  R out{};
  mslemu_simd_rendezvous(fn, &in, &out, site);
  return out;
}

template <class T> T lane_in(const void* const* ins, int l) { return *static_cast<const T*>(ins[l]); }
template <class T> void lane_out(void* const* outs, int l, T v) { *static_cast<T*>(outs[l]) = v; }
inline bool active(uint32_t mask, int l) { return (mask >> l) & 1u; }

// Reductions in lane order, in the value's own type (so half sums round like half sums).
enum class Reduce { sum, product, min, max, band, bor, bxor };
template <class T, Reduce op> T combine(T a, T b) {
  if constexpr (op == Reduce::sum) return a + b;
  else if constexpr (op == Reduce::product) return a * b;
  else if constexpr (op == Reduce::min) return metal::min(a, b);
  else if constexpr (op == Reduce::max) return metal::max(a, b);
  else if constexpr (op == Reduce::band) return a & b;
  else if constexpr (op == Reduce::bor) return a | b;
  else return a ^ b;
}
template <class T, Reduce op> void reduce_fn(const void* const* ins, void* const* outs, uint32_t mask) {
  bool first = true;
  T acc{};
  for (int l = 0; l < 32; ++l) {
    if (!active(mask, l)) continue;
    acc = first ? lane_in<T>(ins, l) : combine<T, op>(acc, lane_in<T>(ins, l));
    first = false;
  }
  for (int l = 0; l < 32; ++l) if (active(mask, l)) lane_out(outs, l, acc);
}
// Prefix scans over active lanes; exclusive scans start from the operation's identity.
template <class T, Reduce op, bool inclusive>
void scan_fn(const void* const* ins, void* const* outs, uint32_t mask) {
  T acc = op == Reduce::product ? T(1) : T(0);
  for (int l = 0; l < 32; ++l) {
    if (!active(mask, l)) continue;
    T x = lane_in<T>(ins, l);
    if (inclusive) acc = combine<T, op>(acc, x);
    lane_out(outs, l, acc);
    if (!inclusive) acc = combine<T, op>(acc, x);
  }
}

// Shuffles: each lane names a source lane; a source outside the simd-group leaves the lane's own
// value. A source lane inside it that is not active here (it exited, or waits at another call site:
// a loop that only some lanes run once more) is an error: Metal leaves the value undefined, and a
// kernel that read it gave the right answer here only by luck (the decode merge did, at head dims
// that are not a multiple of 32, until session 27).
enum class Shuffle { index, up, down, bxor, rotate_up, rotate_down, first };
template <class T> struct ShuffleIn { T value; uint32_t arg; };
inline int shuffle_source(Shuffle kind, int lane, uint32_t arg, uint32_t mask) {
  switch (kind) {
    case Shuffle::index: return int(arg);
    case Shuffle::up: return lane - int(arg);
    case Shuffle::down: return lane + int(arg);
    case Shuffle::bxor: return lane ^ int(arg);
    case Shuffle::rotate_up: return (lane - int(arg % 32) + 32) % 32;
    case Shuffle::rotate_down: return (lane + int(arg % 32)) % 32;
    case Shuffle::first: return mask ? __builtin_ctz(mask) : lane;
  }
  return lane;
}
template <class T, Shuffle kind> void shuffle_fn(const void* const* ins, void* const* outs, uint32_t mask) {
  for (int l = 0; l < 32; ++l) {
    if (!active(mask, l)) continue;
    auto self = lane_in<ShuffleIn<T>>(ins, l);
    int src = shuffle_source(kind, l, self.arg, mask);
    bool inside = src >= 0 && src < 32;
    if (inside && !active(mask, src)) {
      mslemu_fail("simd shuffle/broadcast: a lane reads a source lane that is not active at this call "
                  "(it exited, or runs elsewhere, e.g. a loop pass only some lanes take); Metal leaves "
                  "that value undefined: make every lane run the call");
      return;
    }
    lane_out(outs, l, inside ? lane_in<ShuffleIn<T>>(ins, src).value : self.value);
  }
}
struct Ballot { uint64_t bits; uint64_t active; };
inline void ballot_fn(const void* const* ins, void* const* outs, uint32_t mask) {
  Ballot b{0, mask};
  for (int l = 0; l < 32; ++l) if (active(mask, l) && lane_in<bool>(ins, l)) b.bits |= 1ull << l;
  for (int l = 0; l < 32; ++l) if (active(mask, l)) lane_out(outs, l, b);
}
inline void first_fn(const void* const*, void* const* outs, uint32_t mask) {
  for (int l = 0; l < 32; ++l) if (active(mask, l)) lane_out(outs, l, l == __builtin_ctz(mask));
}
}  // namespace mslemu

namespace metal {
#define MSLEMU_SITE uint32_t line = __builtin_LINE(), uint32_t col = __builtin_COLUMN()
#define MSLEMU_AT mslemu::site_id(line, col)

MSLEMU_INLINE void simdgroup_barrier(mem_flags = mem_flags::mem_none, MSLEMU_SITE) {
  mslemu_simd_rendezvous(mslemu::noop_collective, nullptr, nullptr, MSLEMU_AT);
}

#define MSLEMU_REDUCE(NAME, OP)                                                            \
  template <class T> MSLEMU_INLINE T NAME(T x, MSLEMU_SITE) {                              \
    return mslemu::collective<T>(mslemu::reduce_fn<T, mslemu::Reduce::OP>, x, MSLEMU_AT);  \
  }
MSLEMU_REDUCE(simd_sum, sum)
MSLEMU_REDUCE(simd_product, product)
MSLEMU_REDUCE(simd_min, min)
MSLEMU_REDUCE(simd_max, max)
MSLEMU_REDUCE(simd_and, band)
MSLEMU_REDUCE(simd_or, bor)
MSLEMU_REDUCE(simd_xor, bxor)
#undef MSLEMU_REDUCE

#define MSLEMU_SCAN(NAME, OP, INCLUSIVE)                                                             \
  template <class T> MSLEMU_INLINE T NAME(T x, MSLEMU_SITE) {                                        \
    return mslemu::collective<T>(mslemu::scan_fn<T, mslemu::Reduce::OP, INCLUSIVE>, x, MSLEMU_AT);  \
  }
MSLEMU_SCAN(simd_prefix_inclusive_sum, sum, true)
MSLEMU_SCAN(simd_prefix_exclusive_sum, sum, false)
MSLEMU_SCAN(simd_prefix_inclusive_product, product, true)
MSLEMU_SCAN(simd_prefix_exclusive_product, product, false)
#undef MSLEMU_SCAN

#define MSLEMU_SHUFFLE(NAME, KIND)                                                         \
  template <class T, class I> MSLEMU_INLINE T NAME(T x, I arg, MSLEMU_SITE) {              \
    mslemu::ShuffleIn<T> in{x, uint32_t(arg)};                                             \
    return mslemu::collective<T>(mslemu::shuffle_fn<T, mslemu::Shuffle::KIND>, in, MSLEMU_AT); \
  }
MSLEMU_SHUFFLE(simd_shuffle, index)
MSLEMU_SHUFFLE(simd_broadcast, index)
MSLEMU_SHUFFLE(simd_shuffle_up, up)
MSLEMU_SHUFFLE(simd_shuffle_down, down)
MSLEMU_SHUFFLE(simd_shuffle_xor, bxor)
MSLEMU_SHUFFLE(simd_shuffle_rotate_up, rotate_up)
MSLEMU_SHUFFLE(simd_shuffle_rotate_down, rotate_down)
#undef MSLEMU_SHUFFLE

// simd_shuffle_and_fill_down/up (MSL 2.4): lane i of each group of `modulo` lanes takes `data`
// from lane i + delta (down) or i - delta (up) when that lane is in its group, else `filling`
// from the lane delta - modulo further. Built on two shuffles that every lane joins (the second
// at the next column, so the two sites differ).
template <class T, class D, class M = ushort>
MSLEMU_INLINE T simd_shuffle_and_fill_down(T data, T filling, D delta, M modulo = M(32), MSLEMU_SITE) {
  uint32_t lane = mslemu_lane(), m = uint32_t(modulo), j = lane % m, d = uint32_t(delta);
  bool inside = j + d < m;
  uint32_t src = lane - j + (inside ? j + d : j + d - m);
  T a = simd_shuffle(data, ushort(src), line, col);
  T b = simd_shuffle(filling, ushort(src), line, col + 1);
  return inside ? a : b;
}
template <class T, class D, class M = ushort>
MSLEMU_INLINE T simd_shuffle_and_fill_up(T data, T filling, D delta, M modulo = M(32), MSLEMU_SITE) {
  uint32_t lane = mslemu_lane(), m = uint32_t(modulo), j = lane % m, d = uint32_t(delta);
  bool inside = j >= d;
  uint32_t src = lane - j + (inside ? j - d : j + m - d);
  T a = simd_shuffle(data, ushort(src), line, col);
  T b = simd_shuffle(filling, ushort(src), line, col + 1);
  return inside ? a : b;
}

template <class T> MSLEMU_INLINE T simd_broadcast_first(T x, MSLEMU_SITE) {
  mslemu::ShuffleIn<T> in{x, 0};
  return mslemu::collective<T>(mslemu::shuffle_fn<T, mslemu::Shuffle::first>, in, MSLEMU_AT);
}

// simd_vote wraps the ballot bits like Metal's type (explicit conversion to vote_t); it also
// keeps the active-lane mask so that all() means "every active lane voted true".
struct simd_vote {
  typedef uint64_t vote_t;
  vote_t bits;
  vote_t active;
  explicit constexpr operator vote_t() const { return bits; }
  constexpr bool all() const { return bits == active; }
  constexpr bool any() const { return bits != 0; }
};
MSLEMU_INLINE simd_vote simd_ballot(bool c, MSLEMU_SITE) {
  auto r = mslemu::collective<mslemu::Ballot>(mslemu::ballot_fn, c, MSLEMU_AT);
  return simd_vote{r.bits, r.active};
}
MSLEMU_INLINE bool simd_any(bool c, MSLEMU_SITE) {
  return mslemu::collective<mslemu::Ballot>(mslemu::ballot_fn, c, MSLEMU_AT).bits != 0;
}
MSLEMU_INLINE bool simd_all(bool c, MSLEMU_SITE) {
  auto r = mslemu::collective<mslemu::Ballot>(mslemu::ballot_fn, c, MSLEMU_AT);
  return r.bits == r.active;
}
MSLEMU_INLINE bool simd_is_first(MSLEMU_SITE) {
  return mslemu::collective<bool>(mslemu::first_fn, 0, MSLEMU_AT);
}
}  // namespace metal
