// float -> bfloat conversion helpers that clang emits as library calls. libgcc provides them
// only from GCC 13 on (Debian 12 ships GCC 12), so the runtime carries its own:
// round to nearest even, NaN kept quiet.
#include <cstdint>
#include <cstring>

extern "C" {
__attribute__((visibility("hidden"))) __bf16 __truncsfbf2(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h = uint16_t((u >> 16) | 0x40u);  // NaN: keep sign and payload top, force quiet
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    h = uint16_t(u >> 16);
  }
  __bf16 out;
  std::memcpy(&out, &h, 2);
  return out;
}

// Through float: double rounding is possible for doubles, which MSL code never has at run time.
__attribute__((visibility("hidden"))) __bf16 __truncdfbf2(double d) { return __truncsfbf2(float(d)); }
}
