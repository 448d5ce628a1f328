// What the CPU kernels share about spreading work over threads.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace mlhd {

// at::parallel_for's grain for `tasks` covering `work` elements: work too small to pay for
// waking a second thread stays on this one.
inline int64_t grain(int64_t tasks, int64_t work) { return work < at::internal::GRAIN_SIZE ? tasks : 1; }

}  // namespace mlhd
