// A CPU emulator for kernels.cu, for the tests (src/train/kernel_emulator.rs): the kernels'
// own source compiled as C++, each CUDA thread of a block run as a fiber on the calling thread.
// `__syncthreads` and the warp shuffles suspend the fiber until every thread of the block has
// reached them, so the kernels' barriers, shared memory and shuffles behave as on a GPU, and a
// barrier that not every thread of a block reaches is reported, not hung on. Blocks run one
// after another. Float maths is the host's (expf, not __expf): results agree with the device
// to rounding, not bit for bit.
//
// Built by build.rs with the `cc` crate; linked only into the library's test binary.

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace emu {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// ------------------------------------------------------------------------------------------
// Fibers: a stack each, switched by saving the callee-saved registers (x86-64), or ucontext.

#if defined(__x86_64__)
extern "C" void jobd_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl jobd_emu_switch
  .type jobd_emu_switch,@function
jobd_emu_switch:
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
  .size jobd_emu_switch, .-jobd_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

constexpr size_t kStack = 256 * 1024;
constexpr size_t kGuard = 4096;

struct Fiber {
  char* mem = nullptr;  // guard page + stack
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  bool done = false;
  unsigned long barriers = 0;
  unsigned long shuffles = 0;
};

struct Launch {
  std::vector<Fiber> fibers;
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched;
#endif
  unsigned current = 0;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::vector<float> shuffle;         // two slots per thread
  std::vector<unsigned char> dynamic;  // the launch's dynamic shared memory
};

thread_local Launch* launch_now = nullptr;

void to_scheduler() {
  Launch& l = *launch_now;
#if defined(__x86_64__)
  jobd_emu_switch(&l.fibers[l.current].sp, l.sched_sp);
#else
  swapcontext(&l.fibers[l.current].ctx, &l.sched);
#endif
}

extern "C" void jobd_emu_fiber_main() {
  Launch& l = *launch_now;
  l.body(l.ctx);
  l.fibers[l.current].done = true;
  to_scheduler();
  __builtin_trap();  // a finished fiber is never resumed
}

void start_fiber(Fiber& f) {
  f.done = false;
  f.barriers = 0;
  f.shuffles = 0;
  char* top = f.mem + kGuard + kStack;
#if defined(__x86_64__)
  void** sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
  *--sp = nullptr;  // return address of the fiber's entry (it never returns)
  *--sp = reinterpret_cast<void*>(&jobd_emu_fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.mem + kGuard;
  f.ctx.uc_stack.ss_size = kStack;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, jobd_emu_fiber_main, 0);
#endif
}

void resume(Launch& l, unsigned i) {
  l.current = i;
  threadIdx.x = i;
#if defined(__x86_64__)
  jobd_emu_switch(&l.sched_sp, l.fibers[i].sp);
#else
  swapcontext(&l.sched, &l.fibers[i].ctx);
#endif
}

// Every thread of the block waits here until all have arrived.
void barrier() {
  Launch& l = *launch_now;
  l.fibers[l.current].barriers++;
  to_scheduler();
}

}  // namespace emu

// ------------------------------------------------------------------------------------------
// The CUDA names kernels.cu uses.

using emu::blockDim;
using emu::blockIdx;
using emu::gridDim;
using emu::threadIdx;
using std::max;
using std::min;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static thread_local
#define JOBD_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(emu::launch_now->dynamic.data())

inline void __syncthreads() { emu::barrier(); }

// One barrier per shuffle: the slots alternate between two halves, and a thread can only come
// back to a half after the next shuffle's barrier, which its partner reaches after reading.
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  emu::Launch& l = *emu::launch_now;
  unsigned me = threadIdx.x;
  float* slots = l.shuffle.data() + (l.fibers[me].shuffles++ & 1) * blockDim.x;
  slots[me] = v;
  emu::barrier();
  return slots[me ^ unsigned(lane_mask)];
}

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __int_as_float(int i) { return __uint_as_float(unsigned(i)); }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

#include "kernels.cu"

// kernels.cu's f16 conversions, for the tests to compare with the `half` crate.
extern "C" unsigned short jobd_emu_f16_from_f32(float v) {
  f16_t h;
  st(&h, 0, v);
  return h.bits;
}
extern "C" float jobd_emu_f16_to_f32(unsigned short bits) {
  f16_t h{bits};
  return ld(&h, 0);
}

// ------------------------------------------------------------------------------------------
// The launch: `body(ctx)` (which calls one kernel entry point with its arguments) run as every
// thread of every block. Returns 0, or 1 when some threads of a block finished while others
// waited at a barrier, or threads waited at different barriers (undefined behaviour on a
// GPU), or 2 when stacks could not be mapped.

extern "C" int jobd_emu_launch(unsigned grid, unsigned block, size_t shared_bytes,
                               void (*body)(void*), void* ctx) {
  emu::Launch l;
  l.body = body;
  l.ctx = ctx;
  l.fibers.resize(block);
  l.shuffle.assign(2 * size_t(block), NAN);
  int status = 0;
  for (auto& f : l.fibers) {
    void* m = mmap(nullptr, emu::kGuard + emu::kStack, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      status = 2;
      break;
    }
    f.mem = static_cast<char*>(m);
    mprotect(f.mem, emu::kGuard, PROT_NONE);  // overflow faults instead of corrupting
  }
  emu::Launch* outer = emu::launch_now;
  emu::launch_now = &l;
  gridDim = emu::dim3{grid, 1, 1};
  blockDim = emu::dim3{block, 1, 1};
  for (unsigned b = 0; b < grid && status == 0; ++b) {
    blockIdx = emu::dim3{b, 0, 0};
    // Shared memory starts as garbage on a GPU: NaN bytes here, so reads before writes show.
    l.dynamic.assign(shared_bytes, 0xff);
    for (auto& f : l.fibers) emu::start_fiber(f);
    for (;;) {
      unsigned running = 0;
      for (unsigned i = 0; i < block; ++i) {
        if (l.fibers[i].done) continue;
        emu::resume(l, i);
        if (!l.fibers[i].done) ++running;
      }
      if (running == 0) break;
      // Every live thread is at a barrier: all must be, and at the same one (by count).
      unsigned long first = 0;
      bool seen = false;
      for (const auto& f : l.fibers) {
        if (f.done || (seen && f.barriers != first)) status = 1;
        if (!seen) first = f.barriers, seen = true;
      }
      if (status != 0) break;
    }
  }
  emu::launch_now = outer;
  for (auto& f : l.fibers)
    if (f.mem) munmap(f.mem, emu::kGuard + emu::kStack);
  return status;
}
