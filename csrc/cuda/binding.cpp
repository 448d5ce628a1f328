// Registers the CUDA kernels (step.cu, levels.cu) for the ops. Uses only device-generic c10
// headers for the current stream, so it compiles against any torch build.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "../ops.h"
#include "step.cuh"

namespace mlhd {
namespace {

void* current_stream(at::Device device) {
  return c10::impl::VirtualGuardImpl(device.type()).getStream(device).native_handle();
}

void check(const char* error) { TORCH_CHECK(error == nullptr, "multilevel_hd CUDA kernel launch failed: ", error); }

struct CudaRunner {
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

TORCH_LIBRARY_IMPL(multilevel_hd, CUDA, m) {
  m.impl("reduce", &reduce_op<CudaRunner>);
  m.impl("apply", &apply_op<CudaRunner>);
  m.impl("levels", &levels_op<CudaRunner>);
}

}  // namespace mlhd
