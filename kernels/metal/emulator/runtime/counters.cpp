// Merging per-worker cost counters into a launch's totals (runtime.h: Counter).
#include <algorithm>

#include "runtime.h"

namespace mslemu_rt {
void Counters::merge(const Counters& other) {
  for (int i = 0; i < kCounterCount; ++i)
    v[i] = i == kPeakThreadgroupBytes ? std::max(v[i], other.v[i]) : v[i] + other.v[i];
}
}  // namespace mslemu_rt
