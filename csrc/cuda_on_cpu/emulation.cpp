// The scheduler behind emulation.h: CUDA threads as fibers, barriers, shuffles, launch checks.
//
// A fiber is entered the first time through its ucontext (makecontext/setcontext) and from
// then on with _setjmp/_longjmp: swapcontext saves the signal mask with a system call on
// every switch (about 1 us here), _longjmp does not (tens of ns), and a block may switch a
// few hundred thousand times. Fibers and their stacks are pooled and reused across blocks.
#undef _FORTIFY_SOURCE  // its longjmp check rejects a jump to another stack, which is the point here
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "emulation.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define MLHD_EMU_ASAN 1
#else
#define MLHD_EMU_ASAN 0
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace mlhd_emu {
namespace {

constexpr size_t kStackBytes = size_t(1) << 20;  // mapped lazily: only touched pages cost memory
constexpr size_t kGuardBytes = 4096;             // a stack overflow faults instead of corrupting
constexpr unsigned kWarp = 32;
constexpr unsigned kMaxThreads = 1024;

enum class Wait { None, Block, Warp };

struct Fiber {
  jmp_buf context;
  ucontext_t entry;
  bool started = false;
  char* stack = nullptr;
  void* asan_fake_stack = nullptr;
  bool ready = false, exited = false;
  Wait wait = Wait::None;
  uint3 index{};
  unsigned linear = 0;
  const char* file = nullptr;  // where it waits
  int line = 0;
  unsigned mask = 0, delta = 0;  // its shuffle
  double value = 0, received = 0;
};

struct Scheduler {
  Fiber fibers[kMaxThreads];  // fibers[i] runs thread i of the current block; never moved
  unsigned prepared = 0;      // fibers with a stack and an entry context
  unsigned threads = 0;       // in the current block
  unsigned at_block_barrier = 0;
  unsigned at_warp_barrier[kMaxThreads / kWarp] = {};  // lanes waiting in a shuffle, per warp
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  jmp_buf home;
  void* asan_home_fake = nullptr;
  const void* asan_home_bottom = nullptr;
  size_t asan_home_size = 0;
  std::string error;  // set: abandon the launch
};

Scheduler S;
std::mutex launch_mutex;  // one launch at a time: the scheduler and __shared__ statics are global
std::mutex error_mutex;
cudaError_t last_error = cudaSuccess;
std::string last_message;
bool stream_capturing = false;
uint64_t launches = 0;

void set_error(cudaError_t code, const std::string& message) {
  std::lock_guard<std::mutex> lock(error_mutex);
  if (last_error == cudaSuccess) {  // sticky: the first error stays until it is read
    last_error = code;
    last_message = message;
  }
}

std::string where(const char* file, int line) {
  const char* slash = std::strrchr(file, '/');
  return std::string(slash ? slash + 1 : file) + ":" + std::to_string(line);
}

std::string thread_name(const Fiber& f) {
  std::ostringstream s;
  s << "thread (" << f.index.x << "," << f.index.y << "," << f.index.z << ") of block (" << blockIdx.x << ","
    << blockIdx.y << "," << blockIdx.z << ")";
  return s.str();
}

void fiber_main();

void switch_to_home(Fiber* f) {
  if (_setjmp(f->context) == 0) {
#if MLHD_EMU_ASAN
    __sanitizer_start_switch_fiber(&f->asan_fake_stack, S.asan_home_bottom, S.asan_home_size);
#endif
    _longjmp(S.home, 1);
  }
#if MLHD_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->asan_fake_stack, &S.asan_home_bottom, &S.asan_home_size);
#endif
}

void resume(Fiber* f) {
  threadIdx = f->index;
  S.current = f;
  if (_setjmp(S.home) == 0) {
#if MLHD_EMU_ASAN
    __sanitizer_start_switch_fiber(&S.asan_home_fake, f->stack + kGuardBytes, kStackBytes);
#endif
    if (!f->started) {
      f->started = true;
      setcontext(&f->entry);
    }
    _longjmp(f->context, 1);
  }
#if MLHD_EMU_ASAN
  __sanitizer_finish_switch_fiber(S.asan_home_fake, nullptr, nullptr);
#endif
}

// (Re)sets a fiber so that its next resume starts fiber_main afresh on its own stack.
void reset(Fiber& f) {
  if (f.stack == nullptr) {
    void* mem = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) std::abort();
    f.stack = static_cast<char*>(mem);
    mprotect(f.stack, kGuardBytes, PROT_NONE);
  }
  getcontext(&f.entry);
  f.entry.uc_stack.ss_sp = f.stack + kGuardBytes;
  f.entry.uc_stack.ss_size = kStackBytes;
  f.entry.uc_link = nullptr;
  makecontext(&f.entry, fiber_main, 0);
  f.started = false;
}

// Every fiber runs this loop: one CUDA thread per pass, then back to the scheduler, which
// resumes it (after its switch_to_home) when it is given the next thread.
void fiber_main() {
#if MLHD_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &S.asan_home_bottom, &S.asan_home_size);  // the first entry
#endif
  for (;;) {
    (*S.body)();
    Fiber* f = S.current;
    f->exited = true;
    f->ready = false;
    switch_to_home(f);
  }
}

// An error inside a fiber: record it and leave; the scheduler abandons the launch.
[[noreturn]] void fail(const std::string& message) {
  if (S.error.empty()) S.error = message;
  Fiber* f = S.current;
  f->ready = false;
  switch_to_home(f);
  std::abort();  // an abandoned fiber is reset, never resumed
}

void block_barrier_release() {
  const Fiber& first = S.fibers[0];
  for (unsigned i = 0; i < S.threads; ++i) {
    Fiber& f = S.fibers[i];
    if (f.file != first.file || f.line != first.line)
      fail("divergent __syncthreads: " + thread_name(first) + " waits at " + where(first.file, first.line) + ", " +
           thread_name(f) + " at " + where(f.file, f.line));
  }
  for (unsigned i = 0; i < S.threads; ++i) {
    S.fibers[i].wait = Wait::None;
    S.fibers[i].ready = true;
  }
  S.at_block_barrier = 0;
}

// The lanes of `mask` in f's warp, if all of them wait at a shuffle: exchange and release.
void warp_barrier_try_release(Fiber& caller) {
  const unsigned warp = caller.linear / kWarp, base = warp * kWarp;
  if (++S.at_warp_barrier[warp] < unsigned(__builtin_popcount(caller.mask))) return;  // (checked in full below)
  for (unsigned lane = 0; lane < kWarp; ++lane) {
    if (!(caller.mask >> lane & 1u)) continue;
    if (base + lane >= S.threads)
      fail(thread_name(caller) + " calls __shfl_down_sync with mask " + std::to_string(caller.mask) +
           ", which names lanes past the end of the block");
    const Fiber& f = S.fibers[base + lane];
    if (f.exited)
      fail(thread_name(caller) + " waits in __shfl_down_sync at " + where(caller.file, caller.line) + " for " +
           thread_name(f) + ", which has exited");
    if (f.wait != Wait::Warp) return;  // not there yet (another lane of the warp waits at a shuffle)
    if (f.mask != caller.mask || f.file != caller.file || f.line != caller.line)
      fail("divergent __shfl_down_sync: " + thread_name(caller) + " at " + where(caller.file, caller.line) +
           " with mask " + std::to_string(caller.mask) + ", " + thread_name(f) + " at " + where(f.file, f.line) +
           " with mask " + std::to_string(f.mask));
  }
  for (unsigned lane = 0; lane < kWarp; ++lane) {
    if (!(caller.mask >> lane & 1u)) continue;
    Fiber& f = S.fibers[base + lane];
    const unsigned source = lane + f.delta;
    if (source >= kWarp) f.received = f.value;  // past the warp: a lane keeps its own value
    else if (caller.mask >> source & 1u) f.received = S.fibers[base + source].value;
    else
      fail(thread_name(f) + " reads lane " + std::to_string(source) + " in __shfl_down_sync at " +
           where(f.file, f.line) + ", which is not in the mask (undefined on a GPU)");
  }
  for (unsigned lane = 0; lane < kWarp; ++lane) {
    if (!(caller.mask >> lane & 1u)) continue;
    S.fibers[base + lane].wait = Wait::None;
    S.fibers[base + lane].ready = true;
  }
  S.at_warp_barrier[warp] = 0;
}

// Nobody can run, yet not every thread has exited: say what they wait for.
std::string deadlock() {
  std::ostringstream s;
  s << "deadlock in a block of " << S.threads << " threads (a divergent barrier):";
  int shown = 0;
  unsigned exited = 0;
  for (unsigned i = 0; i < S.threads; ++i) {
    const Fiber& f = S.fibers[i];
    if (f.exited) {
      ++exited;
      continue;
    }
    if (shown++ < 4)
      s << " " << thread_name(f) << " waits in " << (f.wait == Wait::Block ? "__syncthreads" : "__shfl_down_sync")
        << " at " << where(f.file, f.line) << ";";
  }
  s << " " << exited << " threads have exited";
  return s.str();
}

enum class Order { Ascending, Descending, Random };

Order order_from_env() {
  const char* v = std::getenv("MLHD_CUDA_ON_CPU_ORDER");
  if (v == nullptr || !std::strcmp(v, "") || !std::strcmp(v, "ascending")) return Order::Ascending;
  if (!std::strcmp(v, "descending")) return Order::Descending;
  if (!std::strcmp(v, "random")) return Order::Random;
  set_error(cudaErrorLaunchFailure, std::string("MLHD_CUDA_ON_CPU_ORDER must be ascending, descending or random, not ") + v);
  return Order::Ascending;
}

void arrange(std::vector<unsigned>& ids, Order order, std::mt19937_64& rng) {
  std::iota(ids.begin(), ids.end(), 0u);
  if (order == Order::Descending) std::reverse(ids.begin(), ids.end());
  if (order == Order::Random) std::shuffle(ids.begin(), ids.end(), rng);
}

bool run_block(Order order, std::mt19937_64& rng) {
  for (unsigned i = 0; i < S.threads; ++i) {
    Fiber& f = S.fibers[i];
    f.ready = true;
    f.exited = false;
    f.wait = Wait::None;
    f.linear = i;
    f.index = {i % blockDim.x, i / blockDim.x % blockDim.y, i / (blockDim.x * blockDim.y)};
  }
  S.at_block_barrier = 0;
  std::fill(std::begin(S.at_warp_barrier), std::end(S.at_warp_barrier), 0u);
  static std::vector<unsigned> ids;  // (one launch at a time)
  ids.resize(S.threads);
  arrange(ids, order, rng);
  for (;;) {
    bool ran = false;
    for (unsigned i : ids) {
      Fiber& f = S.fibers[i];
      if (!f.ready) continue;
      ran = true;
      resume(&f);
      if (!S.error.empty()) return false;
    }
    if (order == Order::Random) std::shuffle(ids.begin(), ids.end(), rng);  // a new order each round
    if (!ran) {
      if (std::all_of(S.fibers, S.fibers + S.threads, [](const Fiber& f) { return f.exited; }))
        return true;
      S.error = deadlock();
      return false;
    }
  }
}

int max_grid_y() {
  const char* v = std::getenv("MLHD_CUDA_ON_CPU_MAX_GRID_Y");
  const long limit = v ? std::strtol(v, nullptr, 10) : 0;
  return limit > 0 && limit < 65535 ? int(limit) : 65535;
}

std::string check_config(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64)
    return "invalid configuration argument: block (" + std::to_string(block.x) + "," + std::to_string(block.y) +
           "," + std::to_string(block.z) + ")";
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > unsigned(max_grid_y()) || grid.z > 65535)
    return "invalid configuration argument: grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
           std::to_string(grid.z) + ")";
  return "";
}

}  // namespace

void syncthreads(const char* file, int line) {
  Fiber* f = S.current;
  f->wait = Wait::Block;
  f->file = file;
  f->line = line;
  f->ready = false;
  if (++S.at_block_barrier == S.threads) block_barrier_release();
  switch_to_home(f);
}

double shfl_down(unsigned mask, double value, unsigned delta, const char* file, int line) {
  Fiber* f = S.current;
  const unsigned lane = f->linear % kWarp;
  if (!(mask >> lane & 1u))
    fail(thread_name(*f) + " calls __shfl_down_sync at " + where(file, line) + " with a mask that does not name its lane");
  f->wait = Wait::Warp;
  f->mask = mask;
  f->delta = delta;
  f->value = value;
  f->file = file;
  f->line = line;
  f->ready = false;
  warp_barrier_try_release(*f);
  switch_to_home(f);
  return f->received;
}

void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  const std::string bad = check_config(grid, block);
  if (!bad.empty()) return set_error(cudaErrorInvalidConfiguration, bad);
  const Order order = order_from_env();
  const char* seed = std::getenv("MLHD_CUDA_ON_CPU_SEED");
  std::mt19937_64 rng((seed ? std::strtoull(seed, nullptr, 10) : 0) + launches++);
  gridDim = grid;
  blockDim = block;
  S.threads = block.x * block.y * block.z;
  for (; S.prepared < S.threads; ++S.prepared) reset(S.fibers[S.prepared]);
  S.body = &body;
  S.error.clear();
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> block_ids;  // only when the order is not the natural one
  if (order != Order::Ascending) {
    block_ids.resize(blocks);
    std::iota(block_ids.begin(), block_ids.end(), uint64_t(0));
    if (order == Order::Descending) std::reverse(block_ids.begin(), block_ids.end());
    else std::shuffle(block_ids.begin(), block_ids.end(), rng);
  }
  for (uint64_t n = 0; n < blocks; ++n) {
    const uint64_t b = block_ids.empty() ? n : block_ids[n];
    blockIdx = {unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y))};
    if (!run_block(order, rng)) {
      for (unsigned i = 0; i < S.threads; ++i)
        if (!S.fibers[i].exited) reset(S.fibers[i]);  // abandoned mid-kernel
      set_error(cudaErrorLaunchFailure, "unspecified launch failure (CUDA emulated on the CPU): " + S.error);
      break;
    }
  }
  S.body = nullptr;
}

void set_capturing(bool capturing) { stream_capturing = capturing; }

}  // namespace mlhd_emu

cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lock(mlhd_emu::error_mutex);
  const cudaError_t e = mlhd_emu::last_error;
  mlhd_emu::last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::mutex> lock(mlhd_emu::error_mutex);
  return mlhd_emu::last_error;
}

const char* cudaGetErrorString(cudaError_t error) {
  // The message of the last error recorded with this code (the emulation's own words).
  static thread_local std::string message;
  std::lock_guard<std::mutex> lock(mlhd_emu::error_mutex);
  if (error == cudaSuccess) return "no error";
  message = mlhd_emu::last_message;
  return message.c_str();
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMaxGridDimY) *value = mlhd_emu::max_grid_y();
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = mlhd_emu::stream_capturing ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
