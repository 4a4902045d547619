// Fiber stacks and context switches. The x86-64 switch saves only the callee-saved registers
// (the kernel code is compiled normally, so the ABI guarantees everything else is dead at the
// call); elsewhere, or with -DMSLEMU_UCONTEXT, the portable ucontext API is used.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "runtime.h"

#if defined(__x86_64__) && !defined(MSLEMU_UCONTEXT)
#define MSLEMU_ASM_SWITCH 1
extern "C" void mslemu_swap_stack(void** save_sp, void* load_sp);
asm(R"(
.text
.p2align 4
.hidden mslemu_swap_stack
.globl mslemu_swap_stack
.type mslemu_swap_stack,@function
mslemu_swap_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size mslemu_swap_stack, .-mslemu_swap_stack
)");
#else
#include <ucontext.h>
#endif

namespace mslemu_rt {

Stack allocate_stack(size_t size) {
  size_t page = size_t(sysconf(_SC_PAGESIZE));
  size = (size + page - 1) / page * page;
  void* p = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "mslemu: cannot map a %zu-byte fiber stack\n", size);
    std::abort();
  }
  mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
  return Stack{static_cast<char*>(p) + page, size};
}

void release_stack(Stack& s) {
  if (!s.base) return;
  size_t page = size_t(sysconf(_SC_PAGESIZE));
  munmap(s.base - page, s.size + page);
  s = Stack{};
}

#ifdef MSLEMU_ASM_SWITCH
Context::~Context() {}

void switch_context(Context& from, Context& to) { mslemu_swap_stack(&from.sp, to.sp); }

void prepare_context(Context& c, Stack& stack, void (*entry)()) {
  // Lay out the frame mslemu_swap_stack pops: six callee-saved registers, then the return
  // address `entry`. After that `ret`, rsp = top - 8, which is how a called function finds it.
  auto top = reinterpret_cast<uintptr_t>(stack.base + stack.size) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uintptr_t*>(top);
  *--sp = 0;  // fake return address of entry(); entry never returns
  *--sp = reinterpret_cast<uintptr_t>(entry);
  for (int i = 0; i < 6; ++i) *--sp = 0;
  c.sp = sp;
}
#else
Context::~Context() { delete static_cast<ucontext_t*>(uctx); }

static ucontext_t* uc(Context& c) {
  if (!c.uctx) c.uctx = new ucontext_t();
  return static_cast<ucontext_t*>(c.uctx);
}

void switch_context(Context& from, Context& to) { swapcontext(uc(from), uc(to)); }

void prepare_context(Context& c, Stack& stack, void (*entry)()) {
  ucontext_t* u = uc(c);
  getcontext(u);
  u->uc_stack.ss_sp = stack.base;
  u->uc_stack.ss_size = stack.size;
  u->uc_link = nullptr;
  makecontext(u, entry, 0);
}
#endif

}  // namespace mslemu_rt
