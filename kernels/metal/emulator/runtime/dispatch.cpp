// The C entry points the Python front end calls through ctypes: launch a kernel over a grid on
// a small pool of OS threads (each runs whole threadgroups), then report errors and warnings.
#include <memory>
#include <thread>

#include "runtime.h"

namespace mslemu_rt {

void Dispatch::fail(const std::string& message) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!failed.exchange(true)) error_ = message;
}

void Dispatch::warn(const std::string& message) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (seen_.insert(message).second) warnings_.push_back(message);
}

void Dispatch::merge_counters(const Counters& worker) {
  std::lock_guard<std::mutex> lock(mutex_);
  counters.merge(worker);
}

std::string Dispatch::error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return error_;
}

std::string Dispatch::warnings() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::string all;
  for (const auto& w : warnings_) all += w + "\n";
  return all;
}

namespace {
std::mutex g_dispatch_mutex;  // one launch at a time per loaded library
std::vector<std::unique_ptr<Threadgroup>> g_workers;  // kept between launches: stacks are reused
std::string g_error, g_warnings;
Counters g_counters;  // the last launch's, read by mslemu_cost_read

void work(Dispatch& d, Threadgroup& tg, uint64_t total) {
  tg.counters = Counters{};
  for (;;) {
    uint64_t gi = d.next_group.fetch_add(1);
    if (gi >= total || d.failed.load(std::memory_order_relaxed)) break;
    tg.run(d, gi);
  }
  d.merge_counters(tg.counters);
}
}  // namespace
}  // namespace mslemu_rt

using namespace mslemu_rt;

extern "C" {
__attribute__((visibility("default"))) int mslemu_abi_version(void) { return 1; }

__attribute__((visibility("default"))) int mslemu_dispatch(mslemu_kernel_fn kernel, void* const* buffers,
                                                           const uint32_t* grid, const uint32_t* group,
                                                           int schedule, uint64_t seed, int workers, int poison) {
  std::lock_guard<std::mutex> lock(g_dispatch_mutex);
  Dispatch d;
  d.kernel = kernel;
  d.buffers = buffers;
  uint64_t total = 1;
  for (int k = 0; k < 3; ++k) {
    d.grid[k] = grid[k];
    d.group[k] = group[k];
    d.groups[k] = (grid[k] + group[k] - 1) / group[k];
    total *= d.groups[k];
  }
  d.schedule = Schedule(schedule);
  d.seed = seed;
  d.poison = poison != 0;
  size_t n = size_t(std::max<uint64_t>(1, std::min<uint64_t>(uint64_t(std::max(workers, 1)), total)));
  while (g_workers.size() < n) g_workers.push_back(std::make_unique<Threadgroup>());
  if (n == 1) {
    work(d, *g_workers[0], total);
  } else {
    std::vector<std::thread> threads;
    for (size_t i = 0; i < n; ++i) threads.emplace_back(work, std::ref(d), std::ref(*g_workers[i]), total);
    for (auto& t : threads) t.join();
  }
  g_error = d.error();
  g_warnings = d.warnings();
  g_counters = d.counters;
  return d.failed.load() ? 1 : 0;
}

// Every loaded library links its own copy of this runtime, and each keeps its worker fibers' stacks
// (two mappings each: the stack and its guard page) for the next launch. With hundreds of kernel
// variants loaded that exhausts the process's mappings (vm.max_map_count), so the front end has
// the previous library drop them when another library launches (library.py).
__attribute__((visibility("default"))) void mslemu_release_workers(void) {
  std::lock_guard<std::mutex> lock(g_dispatch_mutex);
  g_workers.clear();
}

// The last launch's counters (runtime.h's Counter order); returns how many there are.
__attribute__((visibility("default"))) int mslemu_cost_read(int64_t* out) {
  for (int i = 0; i < kCounterCount; ++i) out[i] = g_counters.v[i];
  return kCounterCount;
}

__attribute__((visibility("default"))) const char* mslemu_last_error(void) { return g_error.c_str(); }
__attribute__((visibility("default"))) const char* mslemu_last_warnings(void) { return g_warnings.c_str(); }

// Called by kernel code (shim headers).
void mslemu_threadgroup_barrier(uint32_t site) { Threadgroup::current()->barrier(site); }

void mslemu_simd_rendezvous(mslemu_collective_fn fn, const void* in, void* out, uint32_t site) {
  Threadgroup::current()->rendezvous(fn, in, out, site);
}

void* mslemu_threadgroup_alloc(uint32_t decl, size_t size, size_t align, uint32_t line) {
  return Threadgroup::current()->allocate(decl, size, align, line);
}

uint32_t mslemu_lane(void) { return Threadgroup::current()->lane(); }

void mslemu_fail(const char* message) { Threadgroup::current()->fail_and_abort(message); }

void mslemu_warn(const char* message) { Threadgroup::current()->warn(message); }

// Called once per executed basic block by a counted build (cost_instrument.py): `block` holds the
// block's kInstrumentedCounters static counts.
void mslemu_cost_add(const int64_t* block) {
  Threadgroup* tg = Threadgroup::current();
  if (!tg) return;  // not inside a launch
  Counters& c = tg->counters;
  for (int i = 0; i < kInstrumentedCounters; ++i) c.v[i] += block[i];
}
}
