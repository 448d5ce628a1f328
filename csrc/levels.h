// Stage 2 of a step, the level stage (SPEC steps 2 and 4, the coarse part of 6), as one op:
// from the reduction's per-unit sums to the new group state and the coefficients the apply
// op reads. It computes what multilevel_hd/levels.py's update_levels computes, each term as
// that function writes it; only sums over units run in another order (in double), so
// tests/test_level_stage.py holds the two to float rounding. Torch-free, like common.h.
#pragma once

#include <cstdint>

#include "common.h"

namespace mlhd {

// Levels, coarse to fine (hierarchy.LEVELS); kNoLevel marks an inactive one, or no parent.
enum Level { kGlobalLevel, kLayerLevel, kUnitLevel, kParamLevel, kNumLevels };
constexpr int kCoarseLevels = kParamLevel;  // the levels with a rate array in the group state
constexpr int kNoLevel = -1;

// The coefficient buffer the stage writes and the apply op reads: these scalars, then kappa
// per unit, then the param level's shrinkage target per unit (cpp_backend.py slices it).
enum CoefField { kGate, kHdGate, kParamKappa, kParamHd, kCoefScalars };

struct LevelArgs {
  // Inputs, math type: per-unit sums (qg, qu only for the multiplicative rule), the param
  // level's totals (only when it is one of several levels), this step's LR scheduler factor.
  const void *s, *qg, *qu, *param_dot, *param_sq, *lr_scale;
  const bool* finite;     // the reduction's flag; null without the non-finite guard
  const void* found_inf;  // GradScaler's, math type; null without one
  // The plan: units per layer; N / N_k per unit and per layer; 1 where a tensor steps.
  const int64_t* units_per_layer;
  const void *unit_scale, *layer_scale, *unit_mask, *layer_mask;
  int64_t num_layers, num_units;
  // The group state (math type, skipped int64), updated in place; rates of inactive levels null.
  void *step, *lr_scale_state, *weights, *applied_scale, *applied_offset;
  void* rate[kCoarseLevels];  // global, layer, unit
  int64_t* skipped;
  void* coef;  // out: [kCoefScalars + 2 * num_units]
  // Options.
  int num_levels;
  int index[kNumLevels];    // each level's position in the weights, kNoLevel if inactive
  int parent[kNumLevels];   // each level's shrinkage parent, kNoLevel if it is not shrunk
  double beta[kNumLevels];  // param: beta * N for the additive rule with size scaling
  double rho[kNumLevels];
  double delta, hd_decay, final_lr, rate_min, rate_max;  // rate bounds: +-inf where open
  bool multiplicative, sized;
};

// torch.clamp: a NaN stays NaN.
template <typename T>
MLHD_HD T clamp_rate(T x, T lo, T hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

// torch.lerp(a, b, w) with its two formulas.
template <typename T>
MLHD_HD T lerp(T a, T b, T w) {
  return w < T(0.5) ? a + w * (b - a) : b - (b - a) * (T(1) - w);
}

// SPEC step 4, one rate's HD update. Additive: old + (coef * scale) * s, coef = beta * hd_prev
// * w (scale: N / N_k, or 1). Multiplicative: old * (1 + beta_w * cos), cos = s / sqrt(qg qu).
template <typename T>
MLHD_HD T hd_update(bool multiplicative, T old, T s, T qg, T qu, T coef, T scale, T beta_w) {
  if (!multiplicative) return old + coef * scale * s;
  const T prod = qg * qu;
  return old * (T(1) + beta_w * (prod > 0 ? s / std::sqrt(prod) : T(0)));
}

}  // namespace mlhd
