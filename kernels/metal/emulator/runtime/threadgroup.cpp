// Cooperative execution of one threadgroup: the scheduler resumes fibers in the order the
// selected schedule dictates; a fiber runs until it reaches a barrier, a simd-group collective
// or its end. Collectives complete when no lane of their simd-group can run any more;
// the barrier opens when every live thread waits at it.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "runtime.h"

namespace mslemu_rt {
namespace {
thread_local Threadgroup* tl_group = nullptr;

size_t stack_bytes() {
  static const size_t bytes = [] {
    const char* kb = std::getenv("MSLEMU_STACK_KB");
    long v = kb ? std::strtol(kb, nullptr, 10) : 256;
    return size_t(v > 16 ? v : 16) * 1024;
  }();
  return bytes;
}

uint32_t site_line(uint32_t site) { return site >> 12; }

uint64_t next_random(uint64_t& s) {  // xorshift64*: cheap, seedable, good enough to shuffle
  s ^= s >> 12;
  s ^= s << 25;
  s ^= s >> 27;
  return s * 0x2545F4914F6CDD1Dull;
}
}  // namespace

Threadgroup* Threadgroup::current() { return tl_group; }

void Threadgroup::run(Dispatch& d, uint64_t group_index) {
  d_ = &d;
  tl_group = this;
  setup(group_index);
  schedule_loop();
  counters.v[kThreadgroups] += 1;
  counters.v[kThreads] += count_;
  counters.v[kPeakThreadgroupBytes] = std::max(counters.v[kPeakThreadgroupBytes], int64_t(memory_used_));
  tl_group = nullptr;
}

// Fills every thread's built-in ids and gives it a fresh start on its stack.
void Threadgroup::setup(uint64_t gi) {
  const uint32_t gpos[3] = {uint32_t(gi % d_->groups[0]), uint32_t(gi / d_->groups[0] % d_->groups[1]),
                            uint32_t(gi / (uint64_t(d_->groups[0]) * d_->groups[1]))};
  uint32_t size[3];
  for (int k = 0; k < 3; ++k) size[k] = std::min(d_->group[k], d_->grid[k] - gpos[k] * d_->group[k]);
  count_ = int(size[0] * size[1] * size[2]);
  simdgroups_ = (count_ + 31) / 32;
  while (int(fibers_.size()) < count_) fibers_.push_back(std::make_unique<Fiber>());
  for (int t = 0; t < count_; ++t) {
    Fiber& f = *fibers_[t];
    if (!f.stack.base) f.stack = allocate_stack(stack_bytes());
    mslemu_ids& ids = f.ids;
    const uint32_t tp[3] = {t % size[0], t / size[0] % size[1], t / (size[0] * size[1])};
    for (int k = 0; k < 3; ++k) {
      ids.thread_position_in_threadgroup[k] = tp[k];
      ids.threadgroup_position_in_grid[k] = gpos[k];
      ids.thread_position_in_grid[k] = gpos[k] * d_->group[k] + tp[k];
      ids.threads_per_threadgroup[k] = size[k];
      ids.threadgroups_per_grid[k] = d_->groups[k];
      ids.threads_per_grid[k] = d_->grid[k];
    }
    ids.thread_index_in_threadgroup = uint32_t(t);
    ids.simdgroup_index_in_threadgroup = uint32_t(t / 32);
    ids.thread_index_in_simdgroup = uint32_t(t % 32);
    ids.simdgroups_per_threadgroup = uint32_t(simdgroups_);
    f.state = State::kRunnable;
    prepare_context(f.context, f.stack, &Threadgroup::fiber_entry);
  }
  live_ = count_;
  memory_used_ = 0;
  decls_.clear();
  rng_ = (d_->seed + 1) * 0x9E3779B97F4A7C15ull ^ (gi + 1) * 0xD1B54A32D192ED03ull;
}

void Threadgroup::schedule_loop() {
  while (live_ > 0 && !d_->failed.load(std::memory_order_relaxed)) {
    bool progress = run_pass();
    if (d_->failed.load(std::memory_order_relaxed)) return;
    if (!progress && !release_barrier()) {
      d_->fail("deadlock: no thread of the threadgroup can proceed");
      return;
    }
  }
}

// One pass of the schedule. Lockstep schedules run every runnable lane once and then complete
// the collectives; skewed (sg-*) schedules drive each simd-group to its next barrier (or end)
// before the next one starts, which is what exposes a missing threadgroup_barrier.
bool Threadgroup::run_pass() {
  Schedule s = d_->schedule;
  bool skewed = s >= Schedule::kSgForward;
  bool reverse = s == Schedule::kReverse || s == Schedule::kSgReverse;
  bool random = s == Schedule::kRandom || s == Schedule::kSgRandom;
  order(sg_order_, simdgroups_, reverse, random);
  bool progress = false;
  for (int sg : sg_order_) {
    for (;;) {
      bool step = run_simdgroup_lanes(sg);
      if (d_->failed.load(std::memory_order_relaxed)) return true;
      step |= resolve_collective(sg);
      progress |= step;
      if (!skewed || !step) break;
    }
  }
  if (!skewed) {
    for (int sg = 0; sg < simdgroups_; ++sg) progress |= resolve_collective(sg);
  }
  return progress;
}

bool Threadgroup::run_simdgroup_lanes(int sg) {
  Schedule s = d_->schedule;
  int first = sg * 32, lanes = std::min(32, count_ - first);
  order(lane_order_, lanes, s == Schedule::kReverse || s == Schedule::kSgReverse,
        s == Schedule::kRandom || s == Schedule::kSgRandom);
  bool ran = false;
  for (int l : lane_order_) {
    Fiber& f = *fibers_[first + l];
    if (f.state != State::kRunnable) continue;
    resume(f);
    ran = true;
    if (d_->failed.load(std::memory_order_relaxed)) return true;
  }
  return ran;
}

// Completes the collective the simd-group's waiting lanes sit at, once none can run. Lanes
// that exited or wait at a barrier are inactive for it, as on the GPU. Lanes at different
// collectives (divergent control flow) are completed one call site at a time, with a warning.
bool Threadgroup::resolve_collective(int sg) {
  int first = sg * 32, lanes = std::min(32, count_ - first);
  const void* ins[32] = {};
  void* outs[32] = {};
  uint32_t mask = 0;
  Fiber* leader = nullptr;
  Fiber* other = nullptr;
  for (int l = 0; l < lanes; ++l) {
    Fiber& f = *fibers_[first + l];
    if (f.state == State::kRunnable) return false;
    if (f.state != State::kAtSimd) continue;
    if (!leader) leader = &f;
    if (f.fn != leader->fn || f.site != leader->site) {
      other = &f;
      continue;
    }
    mask |= 1u << l;
    ins[l] = f.in;
    outs[l] = f.out;
  }
  if (!leader) return false;
  if (other) {
    d_->warn("simd-group collectives diverge: lanes of one simd-group wait at line " +
             std::to_string(site_line(leader->site)) + " and at line " + std::to_string(site_line(other->site)) +
             "; the emulator completes each call site with its own lanes");
  }
  leader->fn(ins, outs, mask);
  counters.v[kSimdCollectives] += 1;
  for (int l = 0; l < lanes; ++l)
    if (mask >> l & 1u) fibers_[first + l]->state = State::kRunnable;
  return true;
}

// Opens the barrier when every live thread waits at it; waiting at different barriers is a bug.
bool Threadgroup::release_barrier() {
  const Fiber* leader = nullptr;
  for (int t = 0; t < count_; ++t) {
    const Fiber& f = *fibers_[t];
    if (f.state == State::kDone) continue;
    if (f.state != State::kAtBarrier) return false;
    if (!leader) leader = &f;
    if (f.site != leader->site) {
      d_->fail("threadgroup_barrier: threads of one threadgroup wait at different barriers (lines " +
               std::to_string(site_line(leader->site)) + " and " + std::to_string(site_line(f.site)) +
               "): divergent barriers are undefined behaviour in Metal");
      return false;
    }
  }
  if (!leader) return false;
  if (live_ < count_) {
    d_->warn("threadgroup_barrier at line " + std::to_string(site_line(leader->site)) + " passed after " +
             std::to_string(count_ - live_) + " thread(s) of the threadgroup returned; Metal requires every "
             "thread to reach a barrier");
  }
  for (int t = 0; t < count_; ++t)
    if (fibers_[t]->state == State::kAtBarrier) fibers_[t]->state = State::kRunnable;
  counters.v[kBarriers] += 1;
  return true;
}

void Threadgroup::order(std::vector<int>& v, int n, bool reverse, bool random) {
  v.resize(size_t(n));
  for (int i = 0; i < n; ++i) v[size_t(i)] = reverse ? n - 1 - i : i;
  if (!random) return;
  for (int i = n - 1; i > 0; --i) std::swap(v[size_t(i)], v[next_random(rng_) % uint64_t(i + 1)]);
}

void Threadgroup::resume(Fiber& f) {
  current_ = &f;
  switch_context(scheduler_, f.context);
  current_ = nullptr;
}

void Threadgroup::suspend(State s) {
  current_->state = s;
  switch_context(current_->context, scheduler_);
}

void Threadgroup::fiber_entry() {
  Threadgroup* g = tl_group;
  g->d_->kernel(g->d_->buffers, &g->current_->ids);
  --g->live_;
  g->suspend(State::kDone);
  __builtin_unreachable();  // a finished fiber is never resumed
}

void Threadgroup::barrier(uint32_t site) {
  current_->site = site;
  suspend(State::kAtBarrier);
}

void Threadgroup::rendezvous(mslemu_collective_fn fn, const void* in, void* out, uint32_t site) {
  current_->fn = fn;
  current_->in = in;
  current_->out = out;
  current_->site = site;
  suspend(State::kAtSimd);
}

// Threadgroup memory is allocated per declaration on first use and shared by all threads of
// the threadgroup; it starts as 0xFF bytes (NaN as float/half) so unwritten reads show up.
void* Threadgroup::allocate(uint32_t decl, size_t size, size_t align, uint32_t line) {
  for (const Decl& x : decls_)
    if (x.id == decl) return memory_.data() + x.offset;
  size_t offset = (memory_used_ + align - 1) / align * align;
  if (offset + size > kMemoryLimit) {
    d_->fail("threadgroup memory: the declaration at line " + std::to_string(line) + " brings the total to " +
             std::to_string(offset + size) + " bytes, over the 32 KiB (32768-byte) limit of Apple GPUs");
    abort_current();
  }
  memory_used_ = offset + size;
  decls_.push_back(Decl{decl, offset, size});
  std::memset(memory_.data() + offset, d_->poison ? 0xFF : 0, size);
  return memory_.data() + offset;
}

uint32_t Threadgroup::lane() const { return current_ ? current_->ids.thread_index_in_simdgroup : 0; }

void Threadgroup::fail_and_abort(const char* message) {
  d_->fail(message);
  if (current_) abort_current();
}

void Threadgroup::abort_current() {
  --live_;
  suspend(State::kDone);
  __builtin_unreachable();
}

}  // namespace mslemu_rt
