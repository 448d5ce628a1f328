// Registers the CUDA kernels (step.cu, levels.cu) for the ops. Uses only device-generic c10
// headers for the current stream, so it compiles against any torch build. The emulation
// build (MLHD_CUDA_ON_CPU, csrc/cuda_on_cpu) registers the same kernels, run on the CPU, for
// CPU tensors under its own op namespace.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "../ops.h"
#include "step.cuh"

namespace mlhd {
namespace {

void* current_stream(at::Device device) {
#ifdef MLHD_CUDA_ON_CPU
  (void)device;
  return nullptr;  // the emulation has one stream
#else
  return c10::impl::VirtualGuardImpl(device.type()).getStream(device).native_handle();
#endif
}

void check(const char* error) { TORCH_CHECK(error == nullptr, "multilevel_hd CUDA kernel launch failed: ", error); }

struct CudaRunner {
  static bool capturing(at::Device device) {
    c10::DeviceGuard guard(device);
    return cuda::stream_capturing(current_stream(device));
  }
  static void reduce(const ReduceArgs& a, Dtype dtype, at::Device device) {
    c10::DeviceGuard guard(device);
    check(cuda::launch_reduce(a, dtype, current_stream(device)));
  }
  static void apply(const ApplyArgs& a, Dtype dtype, at::Device device) {
    c10::DeviceGuard guard(device);
    check(cuda::launch_apply(a, dtype, current_stream(device)));
  }
  static void levels(const LevelArgs& a, bool float64, at::Device device) {
    c10::DeviceGuard guard(device);
    check(cuda::launch_levels(a, float64, current_stream(device)));
  }
};

}  // namespace

#ifdef MLHD_CUDA_ON_CPU
TORCH_LIBRARY_IMPL(multilevel_hd_cuda_on_cpu, CPU, m) {
#else
TORCH_LIBRARY_IMPL(multilevel_hd, CUDA, m) {
#endif
  m.impl("reduce", &reduce_op<CudaRunner>);
  m.impl("apply", &apply_op<CudaRunner>);
  m.impl("levels", &levels_op<CudaRunner>);
}

}  // namespace mlhd
