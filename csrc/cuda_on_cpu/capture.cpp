// An op of the emulation library only: sets the emulated stream's capture state, so that tests
// can reach code that must refuse to run inside a CUDA graph capture (nothing is recorded).
#include <torch/library.h>

#include "emulation.h"

TORCH_LIBRARY_FRAGMENT(multilevel_hd_cuda_on_cpu, m) {
  m.def("set_capturing(bool capturing) -> ()", [](bool capturing) { mlhd_emu::set_capturing(capturing); });
}
