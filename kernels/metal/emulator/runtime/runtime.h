// Internal interface of the fiber runtime: one GPU thread = one fiber; a threadgroup's fibers
// run cooperatively on one OS thread and meet at barriers and simd-group collectives.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "../include/mslemu/runtime_api.h"

namespace mslemu_rt {

// A fiber's stack: mmap'd, with a PROT_NONE guard page below it so an overflow faults.
struct Stack {
  char* base = nullptr;  // lowest usable byte
  size_t size = 0;
};
Stack allocate_stack(size_t size);
void release_stack(Stack& s);

enum class State : uint8_t { kRunnable, kAtBarrier, kAtSimd, kDone };

// A suspended execution context: a saved stack pointer (x86-64 assembly backend) or a
// ucontext_t (portable fallback, about 4x slower).
struct Context {
  void* sp = nullptr;
  void* uctx = nullptr;
  ~Context();
};
// Saves the running context into `from` and resumes `to` (context.cpp).
void switch_context(Context& from, Context& to);
// Makes `c` start `entry()` on `stack` when first switched to.
void prepare_context(Context& c, Stack& stack, void (*entry)());

struct Fiber {
  Context context;
  Stack stack;
  mslemu_ids ids{};
  State state = State::kDone;
  uint32_t site = 0;  // barrier or collective call site it waits at
  mslemu_collective_fn fn = nullptr;
  const void* in = nullptr;
  void* out = nullptr;
  Fiber() = default;
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;
  ~Fiber() { release_stack(stack); }
};

// Per-launch cost counters, totals over every thread of the launch (cost_counters.py names them,
// in this order). The first kInstrumentedCounters are added per basic block by code that
// cost_instrument.py inserts into a counted build; the rest are kept by the scheduler in every build.
enum Counter : int {
  kDeviceBytesRead, kDeviceBytesWritten, kConstantBytesRead, kThreadgroupBytesRead, kThreadgroupBytesWritten,
  kMmaLaneCalls, kFloatOps, kFloatConversions, kInt64Ops,
  kInstrumentedCounters,
  kBarriers = kInstrumentedCounters, kSimdCollectives, kThreadgroups, kThreads, kPeakThreadgroupBytes,
  kCounterCount
};
struct Counters {
  int64_t v[kCounterCount] = {};
  void merge(const Counters& other);  // sums, except the peak, which is a maximum
};

// The schedules a threadgroup can run under (names in schedules.py, same order).
enum class Schedule : int { kForward, kReverse, kRandom, kSgForward, kSgReverse, kSgRandom };

// One kernel launch, shared by the worker threads.
struct Dispatch {
  mslemu_kernel_fn kernel = nullptr;
  void* const* buffers = nullptr;
  uint32_t grid[3] = {1, 1, 1};
  uint32_t group[3] = {1, 1, 1};
  uint32_t groups[3] = {1, 1, 1};  // threadgroups per grid (ceil)
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;
  bool poison = true;
  std::atomic<bool> failed{false};
  std::atomic<uint64_t> next_group{0};
  Counters counters;  // merged from the workers when they finish (under the mutex)

  void merge_counters(const Counters& worker);

  void fail(const std::string& message);
  void warn(const std::string& message);
  std::string error() const;
  std::string warnings() const;

 private:
  mutable std::mutex mutex_;
  std::string error_;
  std::vector<std::string> warnings_;
  std::set<std::string> seen_;
};

// Runs threadgroups one at a time on the calling OS thread; reuses its fiber stacks.
class Threadgroup {
 public:
  static constexpr size_t kMemoryLimit = 32 * 1024;  // Apple GPUs: 32 KiB per threadgroup

  void run(Dispatch& d, uint64_t group_index);

  // Called from inside a kernel thread (the current fiber).
  void barrier(uint32_t site);
  void rendezvous(mslemu_collective_fn fn, const void* in, void* out, uint32_t site);
  void* allocate(uint32_t decl, size_t size, size_t align, uint32_t line);
  uint32_t lane() const;
  [[noreturn]] void abort_current();
  // From a kernel thread: fails the launch and ends the thread. From a collective (which runs
  // on the scheduler's stack): fails the launch; the scheduler stops after it returns.
  void fail_and_abort(const char* message);
  void warn(const char* message) { d_->warn(message); }

  static Threadgroup* current();
  Counters counters;  // this worker's share of the current launch

 private:
  struct Decl { uint32_t id; size_t offset; size_t size; };

  void setup(uint64_t group_index);
  void schedule_loop();
  bool run_pass();
  bool run_simdgroup_lanes(int sg);
  bool resolve_collective(int sg);
  bool release_barrier();
  void resume(Fiber& f);
  void suspend(State s);
  void order(std::vector<int>& v, int n, bool reverse, bool random);
  static void fiber_entry();

  Dispatch* d_ = nullptr;
  std::vector<std::unique_ptr<Fiber>> fibers_;  // pointers stay put: contexts live in them
  int count_ = 0;       // threads in this threadgroup (smaller at a non-uniform edge)
  int simdgroups_ = 0;
  int live_ = 0;
  Fiber* current_ = nullptr;
  Context scheduler_;
  uint64_t rng_ = 0;
  std::vector<int> sg_order_, lane_order_;
  std::vector<unsigned char> memory_ = std::vector<unsigned char>(2 * kMemoryLimit);
  size_t memory_used_ = 0;
  std::vector<Decl> decls_;
};

}  // namespace mslemu_rt
