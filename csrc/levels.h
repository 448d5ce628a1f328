// Stage 2 of a step, the level stage (docs/algorithm.md steps 2 and 4, the coarse part of 6), as one op:
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
// multilevel_hd/options.py's MAX_UNNORMALISED_WEIGHT: float32's largest number over 4 levels.
constexpr double kMaxUnnormalisedWeight = 3.4028234663852886e38 / kNumLevels;

// The coefficient buffer the stage writes and the apply op reads: these scalars, then kappa
// per unit, then the param level's shrinkage target per unit (cpp_backend.py slices it).
enum CoefField { kGate, kHdGate, kParamKappa, kParamHd, kCoefScalars };

// The sums of one layer (scratch, in double): over its units S, Qg, Qu and the unit level's
// terms of the weights' hyper-gradient (the first kUnitSums), then the layer level's terms.
enum LayerSum { kS, kQg, kQu, kUnitDot, kUnitSq, kUnitSums, kLayerDot = kUnitSums, kLayerSq, kLayerSums };

struct LevelArgs {
  // Inputs, math type: per-unit sums (qg, qu only for the multiplicative rule), the param
  // level's totals (only when it is one of several levels), this step's LR scheduler factor.
  const void *s, *qg, *qu, *param_dot, *param_sq, *lr_scale;
  const bool* finite;     // the reduction's flag; null without the non-finite guard
  const void* found_inf;  // GradScaler's, math type; null without one
  // The plan: each layer's first unit, then num_units [num_layers + 1]; N / N_k per unit and
  // per layer; 1 where a tensor steps.
  const int64_t* first_unit;
  const void *unit_scale, *layer_scale, *unit_mask, *layer_mask;
  int64_t num_layers, num_units;
  // The group state (math type, skipped int64), updated in place; rates of inactive levels null.
  void *step, *lr_scale_state, *weights, *applied_scale, *applied_offset;
  void* rate[kCoarseLevels];  // global, layer, unit
  int64_t* skipped;
  void* coef;  // out: [kCoefScalars + 2 * num_units]
  // Scratch on the device: each layer's sums [num_layers][kLayerSums], its old and
  // HD-updated rate (math type, [num_layers]), and a GroupStep<math type> (for a runner that
  // hands update_group's result from one launch to the next).
  double* layer_sums;
  void *old_layer, *hd_layer, *group_step;
  // Options.
  int num_levels;
  int index[kNumLevels];    // each level's position in the weights, kNoLevel if inactive
  int parent[kNumLevels];   // each level's shrinkage parent, kNoLevel if it is not shrunk
  double beta[kNumLevels];  // param: beta * N for the additive rule with size scaling
  double rho[kNumLevels];
  double delta, hd_decay, final_lr, rate_min, rate_max;  // rate bounds: +-inf where open
  bool multiplicative, sized;
};

// torch.lerp(a, b, w) with its two formulas.
template <typename T>
MLHD_HD T lerp(T a, T b, T w) {
  return w < T(0.5) ? a + w * (b - a) : b - (b - a) * (T(1) - w);
}

// docs/algorithm.md step 4, one rate's HD update. Additive: old + (coef * scale) * s, coef = beta * hd_prev
// * w (scale: N / N_k, or 1). Multiplicative: old * (1 + beta_w * cos), cos = s / sqrt(qg qu).
template <typename T>
MLHD_HD T hd_update(bool multiplicative, T old, T s, T qg, T qu, T coef, T scale, T beta_w) {
  if (!multiplicative) return old + coef * scale * s;
  const T prod = qg * qu;
  return old * (T(1) + beta_w * (prod > 0 ? s / std::sqrt(prod) : T(0)));
}

// ---------------------------------------------------------------------------------------
// The stage in three parts, which each device's runner schedules: (1) every layer's sums
// (add_unit_sums over its units, then layer_terms), any order of layers, (2) update_group,
// once, then update_layer for every layer, any order, (3) update_unit for every unit, any
// order. Between them the runner waits for all of the previous part (update_layer for a
// layer need only precede the update_unit of its own units).

// (1) Unit u's terms of its layer's sums (LayerSum order), added to acc: S, Qg, Qu and the
// unit level's terms of the weights' hyper-gradient, alpha_old * S and alpha_old^2 * Qg.
// (acc[q * stride] is sum q.)
template <typename T, bool MULT, bool UNIT_DOT>
MLHD_HD void add_unit_sums(const LevelArgs& a, int64_t u, double* acc, int stride) {
  const T s = static_cast<const T*>(a.s)[u];
  acc[kS * stride] += s;
  if constexpr (MULT) {
    acc[kQg * stride] += static_cast<const T*>(a.qg)[u];
    acc[kQu * stride] += static_cast<const T*>(a.qu)[u];
  }
  if constexpr (UNIT_DOT) {
    const T rate = static_cast<const T*>(a.rate[kUnitLevel])[u];
    acc[kUnitDot * stride] += rate * s;
    if constexpr (MULT) acc[kUnitSq * stride] += rate * rate * static_cast<const T*>(a.qg)[u];
  }
}

// (1) After layer l's sums over its units: the layer level's terms of the weights'
// hyper-gradient, from the layer's old rate: alpha_old * S and alpha_old^2 * Qg (0 without a
// layer level), each a product in the math type.
template <typename T>
MLHD_HD void layer_terms(const LevelArgs& a, int64_t l) {
  double* sums = a.layer_sums + l * kLayerSums;
  double dot = 0, sq = 0;
  if (a.index[kLayerLevel] >= 0) {
    const T old = static_cast<const T*>(a.rate[kLayerLevel])[l], s = T(sums[kS]), qg = T(sums[kQg]);
    dot = old * s;
    sq = old * old * qg;
  }
  sums[kLayerDot] = dot;
  sums[kLayerSq] = sq;
}

// What update_group decides for the layer and unit passes.
template <typename T>
struct GroupStep {
  T gate, hd_gate, tau_t, hd_prev, applied, rest;  // kappa = applied * (tau_t * alpha* + rest)
  T w[kNumLevels];                                 // the old weights
  T old_g, hd_g, rate_g;                           // the global rate: old, HD-updated, new
  T lr_scale, offset;                              // this step's LR factor; a stepping layer's applied offset
  // Level lv's coefficient in the additive HD update (beta * hd_prev * w) and in the
  // multiplicative one (beta * w).
  MLHD_HD T coef(const LevelArgs& a, int lv) const { return T(a.beta[lv]) * hd_prev * w[lv]; }
  MLHD_HD T beta_w(const LevelArgs& a, int lv) const { return T(a.beta[lv]) * w[lv]; }
};

// (2) docs/algorithm.md step 2 (the gate, t, the skip counter), step 4 for the global level (HD update
// from the old rate, the bounds; moved only when the step moves rates), the weights (used
// from the next step on), lr_scale and the coefficient scalars. One thread. total: the
// group's sums (LayerSum order), each the layers' sums added in layer order to 0 (a chain of
// additions in double), which is what makes the result independent of the runner.
template <typename T>
MLHD_HD GroupStep<T> update_group(const LevelArgs& a, const double* total) {
  auto in = [](const void* p) { return static_cast<const T*>(p); };
  auto io = [](void* p) { return static_cast<T*>(p); };
  const bool mult = a.multiplicative;
  GroupStep<T> g{};
  T bad = 0;
  if (a.finite && !*a.finite) bad += 1;
  if (a.found_inf && *in(a.found_inf) > 0) bad += 1;
  g.gate = bad == 0 ? T(1) : T(0);
  *a.skipped += static_cast<int64_t>(1 - g.gate);
  T* step = io(a.step);
  const T t = *step += g.gate;
  g.hd_gate = g.gate * (t >= 2 ? T(1) : T(0));
  const T decay = T(-a.hd_decay);
  g.tau_t = std::exp(decay * t);
  const T lr_scale = *in(a.lr_scale), lr_scale_old = *in(a.lr_scale_state);
  // d kappa_{t-1} / d alpha_k = lr_scale_{t-1} * tau_{t-1} * w_k (the chain rule through the
  // rate the last step applied)
  g.hd_prev = lr_scale_old * std::exp(decay * (t - 1));
  g.applied = g.gate * lr_scale;
  g.rest = (1 - g.tau_t) * T(a.final_lr);
  for (int lv = 0; lv < kNumLevels; ++lv) g.w[lv] = a.index[lv] >= 0 ? in(a.weights)[a.index[lv]] : T(0);
  const T s_global = T(total[kS]), qg_global = T(total[kQg]), qu_global = T(total[kQu]);

  if (a.index[kGlobalLevel] >= 0) {
    g.old_g = *in(a.rate[kGlobalLevel]);
    g.hd_g = hd_update(mult, g.old_g, s_global, qg_global, qu_global, g.coef(a, kGlobalLevel), T(1),
                       g.beta_w(a, kGlobalLevel));
    g.rate_g = g.hd_gate > 0 ? clamp_rate(g.hd_g, T(a.rate_min), T(a.rate_max)) : g.old_g;
    *io(a.rate[kGlobalLevel]) = g.rate_g;
  }

  // The weights (more than one level), from the old weights and rates: G_k = sum_j
  // alpha_k_old[j] S_k[j] (tau_{t-1} is in hd_prev), R_k = sum_j alpha_k_old[j]^2 Qg_k[j].
  if (a.num_levels > 1) {
    const T dot[kNumLevels] = {g.old_g * s_global, T(total[kLayerDot]), T(total[kUnitDot]),
                               a.param_dot ? *in(a.param_dot) : T(0)};
    const T sq[kNumLevels] = {g.old_g * g.old_g * qg_global, T(total[kLayerSq]), T(total[kUnitSq]),
                              a.param_sq ? *in(a.param_sq) : T(0)};
    T new_w[kNumLevels] = {}, sum = 0;
    for (int lv = 0; lv < kNumLevels; ++lv) {
      if (a.index[lv] < 0) continue;
      T x;
      if (mult) {
        const T denom = std::sqrt(sq[lv] * qu_global);
        x = g.w[lv] * (denom > 0 ? T(1) + T(a.delta) * dot[lv] / denom : T(1));
      } else {
        x = g.w[lv] + T(a.delta) * g.hd_prev * dot[lv];
      }
      // into [0, options.MAX_UNNORMALISED_WEIGHT] (NaN stays NaN): the sum stays finite
      new_w[lv] = x < 0 ? T(0) : x > kMaxUnnormalisedWeight ? T(kMaxUnnormalisedWeight) : x;
      sum += new_w[lv];
    }
    for (int lv = 0; lv < kNumLevels; ++lv)
      if (a.index[lv] >= 0)
        io(a.weights)[a.index[lv]] = g.hd_gate > 0 ? (sum > 0 ? new_w[lv] / sum : T(1.0 / a.num_levels)) : g.w[lv];
  }
  *io(a.lr_scale_state) = g.gate > 0 ? lr_scale : lr_scale_old;

  g.lr_scale = lr_scale;
  g.offset = lr_scale * (1 - g.tau_t) * T(a.final_lr);
  if (a.index[kGlobalLevel] >= 0) g.offset = g.offset + lr_scale * g.tau_t * g.w[kGlobalLevel] * g.rate_g;

  T* out = io(a.coef);
  const T w_p = g.w[kParamLevel], beta_p = T(a.beta[kParamLevel]);
  out[kGate] = g.gate;
  out[kHdGate] = g.hd_gate;
  out[kParamKappa] = g.applied * g.tau_t * w_p;
  out[kParamHd] = mult ? beta_p * w_p : beta_p * g.hd_prev * w_p;
  return g;
}

// (2) Layer l, after update_group: docs/algorithm.md step 4 for the layer level (HD update from the old
// rate, shrinkage toward the parent's HD-updated rate, the bounds; moved only when the step
// moves rates and the layer's tensor steps; its old and HD-updated rate kept for the unit
// pass) and, if its tensor steps, what its step applied (state.record_applied_rates).
template <typename T>
MLHD_HD void update_layer(const LevelArgs& a, const GroupStep<T>& g, int64_t l) {
  const T mask = static_cast<const T*>(a.layer_mask)[l];
  if (a.index[kLayerLevel] >= 0) {
    T* rate = static_cast<T*>(a.rate[kLayerLevel]);
    const double* sums = a.layer_sums + l * kLayerSums;
    const T old = static_cast<T*>(a.old_layer)[l] = rate[l];
    const T size = a.sized ? static_cast<const T*>(a.layer_scale)[l] : T(1);
    const T hd = static_cast<T*>(a.hd_layer)[l] =
        hd_update(a.multiplicative, old, T(sums[kS]), T(sums[kQg]), T(sums[kQu]), g.coef(a, kLayerLevel), size,
                  g.beta_w(a, kLayerLevel));
    const T shrunk = a.parent[kLayerLevel] == kNoLevel ? hd : lerp(hd, g.hd_g, T(a.rho[kLayerLevel]));
    rate[l] = g.hd_gate * mask > 0 ? clamp_rate(shrunk, T(a.rate_min), T(a.rate_max)) : old;
  }
  if (!(mask * g.gate > 0)) return;
  T* scale = static_cast<T*>(a.applied_scale) + l * a.num_levels;
  for (int lv = 0; lv < kNumLevels; ++lv)
    if (a.index[lv] >= 0) scale[a.index[lv]] = g.lr_scale * g.tau_t * g.w[lv];
  static_cast<T*>(a.applied_offset)[l] = g.offset;
}

// What the unit pass needs for the units of one layer: everything loop-invariant, so that a
// loop over the units reads nothing but its arrays.
template <typename T>
struct UnitPass {
  const T *s, *qg, *qu, *scale, *mask;
  T *rate, *kappa_out, *parent_out;  // rate: null without a unit level; outputs per unit
  T coef, beta_w, rho, lo, hi, hd_gate, w_unit, applied, tau_t, rest;
  T sized;         // 1 with size scaling, else 0
  T alpha;         // the coarser levels' part of alpha*: w_global a_global + w_layer a_layer
  T parent;        // the HD-updated rate unit shrinkage pulls toward (the layer's, or global)
  T param_parent;  // the param level's shrinkage target when its parent is coarser than unit
  T parent_is_unit;  // 1 or 0: a math-type value, so that the select on it vectorises
  bool shrink;
};

template <typename T>
MLHD_HD UnitPass<T> unit_pass(const LevelArgs& a, const GroupStep<T>& g, int64_t l) {
  const bool layer = a.index[kLayerLevel] >= 0;
  const T *old_layer = static_cast<const T*>(a.old_layer), *hd_layer = static_cast<const T*>(a.hd_layer);
  UnitPass<T> c;
  c.s = static_cast<const T*>(a.s);
  c.qg = static_cast<const T*>(a.qg);
  c.qu = static_cast<const T*>(a.qu);
  c.scale = static_cast<const T*>(a.unit_scale);
  c.mask = static_cast<const T*>(a.unit_mask);
  c.rate = a.index[kUnitLevel] >= 0 ? static_cast<T*>(a.rate[kUnitLevel]) : nullptr;
  c.kappa_out = static_cast<T*>(a.coef) + kCoefScalars;
  c.parent_out = c.kappa_out + a.num_units;
  c.coef = g.coef(a, kUnitLevel);
  c.beta_w = g.beta_w(a, kUnitLevel);
  c.rho = T(a.rho[kUnitLevel]);
  c.lo = T(a.rate_min);
  c.hi = T(a.rate_max);
  c.hd_gate = g.hd_gate;
  c.w_unit = g.w[kUnitLevel];
  c.applied = g.applied;
  c.tau_t = g.tau_t;
  c.rest = g.rest;
  c.alpha = T(0);  // the coarse levels, coarse to fine, as update_levels adds them
  if (a.index[kGlobalLevel] >= 0) c.alpha = c.alpha + g.w[kGlobalLevel] * g.rate_g;
  if (layer) c.alpha = c.alpha + g.w[kLayerLevel] * static_cast<const T*>(a.rate[kLayerLevel])[l];
  c.parent = layer ? hd_layer[l] : g.hd_g;
  const int pp = a.parent[kParamLevel];
  c.param_parent = pp == kGlobalLevel  ? (g.hd_gate > 0 ? g.hd_g : g.old_g)
                   : pp == kLayerLevel ? (g.hd_gate > 0 ? hd_layer[l] : old_layer[l])
                                       : T(0);
  c.sized = a.sized ? T(1) : T(0);
  c.shrink = a.parent[kUnitLevel] != kNoLevel;
  c.parent_is_unit = pp == kUnitLevel ? T(1) : T(0);
  return c;
}

// (3) Unit u of the layer: its new unit rate (docs/algorithm.md step 4, moved only when the step moves
// rates and its tensor steps), its kappa and its param-level shrinkage target.
// UNIT: the unit level is active (c.rate is not null); SHRINK: it shrinks toward its parent
// (c.shrink). Other flags become selects of values that are computed anyway, so that the CPU
// loop over the units vectorises (GCC 12 does not vectorise a select on a loop-invariant
// bool, and did not vectorise shrinkage's select around lerp's own).
template <typename T, bool MULT, bool UNIT, bool SHRINK>
MLHD_HD void update_unit(const UnitPass<T>& c, int64_t u) {
  if constexpr (!UNIT) {
    c.kappa_out[u] = c.applied * (c.tau_t * c.alpha + c.rest);
    c.parent_out[u] = c.param_parent;
    return;
  }
  const T old = c.rate[u];
  const T size = c.sized * c.scale[u] + (1 - c.sized);  // exact: the scale, or 1
  const T hd = hd_update(MULT, old, c.s[u], MULT ? c.qg[u] : T(0), MULT ? c.qu[u] : T(0), c.coef, size, c.beta_w);
  T shrunk = hd;
  if constexpr (SHRINK) shrunk = lerp(hd, c.parent, c.rho);
  const T now = c.hd_gate * c.mask[u] > 0 ? clamp_rate(shrunk, c.lo, c.hi) : old;
  c.rate[u] = now;
  c.kappa_out[u] = c.applied * (c.tau_t * (c.alpha + c.w_unit * now) + c.rest);
  c.parent_out[u] = c.parent_is_unit != 0 ? (c.hd_gate > 0 ? hd : old) : c.param_parent;
}

}  // namespace mlhd
