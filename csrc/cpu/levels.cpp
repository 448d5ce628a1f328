// The level stage on the CPU (levels.h): both passes over the units split by layers among
// threads (the second updates each layer before its units), the group's sums and
// update_group between them on one; a fixed order that does not depend on the thread
// count. A layer's sums add up in kLanes interleaved lanes (added pairwise at the end), so
// that no long chain of dependent additions sets the pace.
#include <torch/library.h>

#include "../levels.h"
#include "../ops.h"
#include "parallel.h"

namespace mlhd {
namespace {

constexpr int kLanes = 8;

template <typename T, bool MULT, bool UNIT_DOT>
void sum_layer(const LevelArgs& a, int64_t l) {
  double acc[kUnitSums][kLanes] = {};
  const int64_t end = a.first_unit[l + 1];
  int64_t u = a.first_unit[l];
  for (; u + kLanes <= end; u += kLanes)
    for (int j = 0; j < kLanes; ++j) add_unit_sums<T, MULT, UNIT_DOT>(a, u + j, &acc[0][j], kLanes);
  for (int j = 0; u < end; ++u, ++j) add_unit_sums<T, MULT, UNIT_DOT>(a, u, &acc[0][j], kLanes);
  for (int q = 0; q < kUnitSums; ++q) {
    for (int width = kLanes / 2; width > 0; width /= 2)
      for (int j = 0; j < width; ++j) acc[q][j] += acc[q][j + width];
    a.layer_sums[l * kLayerSums + q] = acc[q][0];
  }
  layer_terms<T>(a, l);
}

template <typename T, bool MULT>
void level_stage(const LevelArgs& a) {
  const int64_t L = a.num_layers, g_size = grain(L, a.num_units);
  const bool unit_dot = a.num_levels > 1 && a.index[kUnitLevel] >= 0;
  at::parallel_for(0, L, g_size, [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l)
      unit_dot ? sum_layer<T, MULT, true>(a, l) : sum_layer<T, MULT, false>(a, l);
  });
  double total[kLayerSums] = {};
  for (int64_t l = 0; l < L; ++l)
    for (int q = 0; q < kLayerSums; ++q) total[q] += a.layer_sums[l * kLayerSums + q];
  const GroupStep<T> g = update_group<T>(a, total);
  at::parallel_for(0, L, g_size, [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l) {
      update_layer<T>(a, g, l);
      const UnitPass<T> c = unit_pass<T>(a, g, l);
      const int64_t begin = a.first_unit[l], end = a.first_unit[l + 1];
      // the arrays are distinct tensors, which the compiler cannot know from their pointers
      if (c.rate && c.shrink) {
#pragma GCC ivdep
        for (int64_t u = begin; u < end; ++u) update_unit<T, MULT, true, true>(c, u);
      } else if (c.rate) {
#pragma GCC ivdep
        for (int64_t u = begin; u < end; ++u) update_unit<T, MULT, true, false>(c, u);
      } else {
#pragma GCC ivdep
        for (int64_t u = begin; u < end; ++u) update_unit<T, MULT, false, false>(c, u);
      }
    }
  });
}

struct CpuRunner {
  static void levels(const LevelArgs& a, bool float64, at::Device) {
    auto run = float64 ? (a.multiplicative ? level_stage<double, true> : level_stage<double, false>)
                       : (a.multiplicative ? level_stage<float, true> : level_stage<float, false>);
    run(a);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(multilevel_hd, CPU, m) { m.impl("levels", &levels_op<CpuRunner>); }

}  // namespace mlhd
