// The level stage on the CPU: two passes over the units (sums; then the new unit rates and
// each unit's coefficients), split by layers among threads, and a few over the layers, in a
// fixed order that does not depend on the thread count.
// Sums that span units add up in double, in kLanes interleaved lanes (added pairwise at the
// end) so that neither a long chain of dependent additions nor vectorising sets the pace.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../levels.h"
#include "../ops.h"

namespace mlhd {
namespace {

constexpr int kLanes = 8;

// at::parallel_for's grain over `layers` holding `units`: a small group stays on one thread.
int64_t grain(int64_t layers, int64_t units) { return units < at::internal::GRAIN_SIZE ? layers : 1; }

double lane_total(const double (&x)[kLanes]) {
  double y[kLanes];
  std::copy(x, x + kLanes, y);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) y[j] += y[j + width];
  return y[0];
}

// The sums of one layer's units [begin, end): S, Qg, Qu and the unit level's weight terms
// sum alpha_old * S and sum alpha_old^2 * Qg.
enum LayerSum { kS, kQg, kQu, kUnitDot, kUnitSq, kLayerSums };

template <typename T, bool MULT, bool UNIT_DOT>
void sum_units(const T* __restrict__ s, const T* __restrict__ qg, const T* __restrict__ qu,
               const T* __restrict__ rate, int64_t begin, int64_t end,
               double (&out)[kLayerSums]) {
  double acc[kLayerSums][kLanes] = {};
  auto add = [&](int64_t u, int j) {
    acc[kS][j] += s[u];
    if constexpr (MULT) {
      acc[kQg][j] += qg[u];
      acc[kQu][j] += qu[u];
    }
    if constexpr (UNIT_DOT) {
      acc[kUnitDot][j] += rate[u] * s[u];
      if constexpr (MULT) acc[kUnitSq][j] += rate[u] * rate[u] * qg[u];
    }
  };
  int64_t u = begin;
  for (; u + kLanes <= end; u += kLanes)
    for (int j = 0; j < kLanes; ++j) add(u + j, j);
  for (int j = 0; u < end; ++u, ++j) add(u, j);
  for (int q = 0; q < kLayerSums; ++q) out[q] = lane_total(acc[q]);
}

// What the unit pass needs of one layer.
template <typename T>
struct UnitPass {
  T coef, beta_w, rho, lo, hi, hd_gate, sized;  // sized: 1 with size scaling, else 0
  T parent;      // the HD-updated rate unit shrinkage pulls toward (the layer's, or global)
  T alpha;       // the coarser levels' part of alpha*: w_global a_global + w_layer a_layer
  T w_unit, applied, tau_t, rest;  // kappa = applied * (tau_t * alpha* + rest)
  bool shrink, parent_is_unit;
  T param_parent;  // the param level's shrinkage target when its parent is coarser than unit
};

// The unit level's new rates (SPEC step 4), and each unit's kappa and param-level parent.
template <typename T, bool MULT>
void update_units(const UnitPass<T> c, const T* __restrict__ s, const T* __restrict__ qg, const T* __restrict__ qu,
                  const T* __restrict__ scale, const T* __restrict__ mask, T* __restrict__ rate,
                  T* __restrict__ kappa, T* __restrict__ param_parent, int64_t begin, int64_t end) {
  for (int64_t u = begin; u < end; ++u) {
    const T old = rate[u];
    const T size = c.sized * scale[u] + (1 - c.sized);  // exact: scale, or 1
    const T hd = hd_update(MULT, old, s[u], MULT ? qg[u] : T(0), MULT ? qu[u] : T(0), c.coef, size, c.beta_w);
    const T now = clamp_rate(c.shrink ? lerp(hd, c.parent, c.rho) : hd, c.lo, c.hi);
    const T r = c.hd_gate * mask[u] > 0 ? now : old;
    rate[u] = r;
    kappa[u] = c.applied * (c.tau_t * (c.alpha + c.w_unit * r) + c.rest);
    param_parent[u] = c.parent_is_unit ? (c.hd_gate > 0 ? hd : old) : c.param_parent;
  }
}

template <typename T>
void level_stage(const LevelArgs& a) {
  const int64_t L = a.num_layers, U = a.num_units;
  auto in = [](const void* p) { return static_cast<const T*>(p); };
  auto io = [](void* p) { return static_cast<T*>(p); };
  const T* s = in(a.s);
  const T *qg = in(a.qg), *qu = in(a.qu);
  const bool mult = a.multiplicative;
  const bool has[kCoarseLevels] = {a.index[kGlobalLevel] >= 0, a.index[kLayerLevel] >= 0, a.index[kUnitLevel] >= 0};
  const bool weighted = a.num_levels > 1;

  // SPEC step 2: the gate, the counters.
  T bad = 0;
  if (a.finite && !*a.finite) bad += 1;
  if (a.found_inf && *in(a.found_inf) > 0) bad += 1;
  const T gate = bad == 0 ? T(1) : T(0);
  *a.skipped += static_cast<int64_t>(1 - gate);
  T* step = io(a.step);
  const T t = *step += gate;
  const T hd_gate = gate * (t >= 2 ? T(1) : T(0));
  const T decay = T(-a.hd_decay);
  const T tau_t = std::exp(decay * t);
  const T lr_scale = *in(a.lr_scale), lr_scale_old = *in(a.lr_scale_state);
  // d kappa_{t-1} / d alpha_k = lr_scale_{t-1} * tau_{t-1} * w_k (the chain rule through the
  // rate the last step applied)
  const T hd_prev = lr_scale_old * std::exp(decay * (t - 1));
  T w[kNumLevels] = {};
  for (int lv = 0; lv < kNumLevels; ++lv)  // the old weights: every right-hand side uses them
    if (a.index[lv] >= 0) w[lv] = in(a.weights)[a.index[lv]];
  auto coef = [&](int lv) { return T(a.beta[lv]) * hd_prev * w[lv]; };
  auto beta_w = [&](int lv) { return T(a.beta[lv]) * w[lv]; };
  const T lo = T(a.rate_min), hi = T(a.rate_max);

  // Pass 1 over the units: per-layer sums, and the group's (in layer order).
  std::vector<int64_t> first_unit(L + 1, 0);
  for (int64_t l = 0; l < L; ++l) first_unit[l + 1] = first_unit[l] + a.units_per_layer[l];
  std::vector<T> s_layer(L), qg_layer(L), qu_layer(L);
  std::vector<double> layer_sums(L * kLayerSums);
  const T* rate_unit = has[kUnitLevel] ? in(a.rate[kUnitLevel]) : nullptr;
  at::parallel_for(0, L, grain(L, U), [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l) {
      double(&sums)[kLayerSums] = *reinterpret_cast<double(*)[kLayerSums]>(&layer_sums[l * kLayerSums]);
      const int64_t b = first_unit[l], e = first_unit[l + 1];
      if (mult) {
        if (weighted && rate_unit) sum_units<T, true, true>(s, qg, qu, rate_unit, b, e, sums);
        else sum_units<T, true, false>(s, qg, qu, rate_unit, b, e, sums);
      } else {
        if (weighted && rate_unit) sum_units<T, false, true>(s, qg, qu, rate_unit, b, e, sums);
        else sum_units<T, false, false>(s, qg, qu, rate_unit, b, e, sums);
      }
      s_layer[l] = T(sums[kS]), qg_layer[l] = T(sums[kQg]), qu_layer[l] = T(sums[kQu]);
    }
  });
  double total[kLayerSums] = {};
  for (int64_t l = 0; l < L; ++l)
    for (int q = 0; q < kLayerSums; ++q) total[q] += layer_sums[l * kLayerSums + q];
  const T s_global = T(total[kS]), qg_global = T(total[kQg]), qu_global = T(total[kQu]);

  // SPEC step 4 for the global and layer levels: HD update from the old rate, shrinkage
  // toward the parent's HD-updated rate, the bounds; moved only when the step moves rates
  // and (layer) the tensor steps.
  const T* layer_mask = in(a.layer_mask);
  T old_g = 0, hd_g = 0, rate_g = 0;
  if (has[kGlobalLevel]) {
    old_g = *in(a.rate[kGlobalLevel]);
    hd_g = hd_update(mult, old_g, s_global, qg_global, qu_global, coef(kGlobalLevel), T(1), beta_w(kGlobalLevel));
    rate_g = hd_gate > 0 ? clamp_rate(hd_g, lo, hi) : old_g;
    *io(a.rate[kGlobalLevel]) = rate_g;
  }
  std::vector<T> old_l, hd_l;
  double layer_dot = 0, layer_sq = 0;
  if (has[kLayerLevel]) {
    T* rate = io(a.rate[kLayerLevel]);
    old_l.assign(rate, rate + L);
    hd_l.resize(L);
    const T c = coef(kLayerLevel), bw = beta_w(kLayerLevel), rho = T(a.rho[kLayerLevel]);
    for (int64_t l = 0; l < L; ++l) {
      const T size = a.sized ? in(a.layer_scale)[l] : T(1);
      const T old = old_l[l];
      hd_l[l] = hd_update(mult, old, s_layer[l], qg_layer[l], qu_layer[l], c, size, bw);
      const T shrunk = a.parent[kLayerLevel] == kNoLevel ? hd_l[l] : lerp(hd_l[l], hd_g, rho);
      rate[l] = hd_gate * layer_mask[l] > 0 ? clamp_rate(shrunk, lo, hi) : old;
      layer_dot += old * s_layer[l];
      layer_sq += old * old * qg_layer[l];
    }
  }

  // The weights (more than one level), from the old weights and rates: G_k = sum_j
  // alpha_k_old[j] S_k[j] (tau_{t-1} is in hd_prev), R_k = sum_j alpha_k_old[j]^2 Qg_k[j];
  // used from the next step on.
  if (weighted) {
    const T dot[kNumLevels] = {old_g * s_global, T(layer_dot), T(total[kUnitDot]),
                               a.param_dot ? *in(a.param_dot) : T(0)};
    const T sq[kNumLevels] = {old_g * old_g * qg_global, T(layer_sq), T(total[kUnitSq]),
                              a.param_sq ? *in(a.param_sq) : T(0)};
    T new_w[kNumLevels] = {}, sum = 0;
    for (int lv = 0; lv < kNumLevels; ++lv) {
      if (a.index[lv] < 0) continue;
      T x;
      if (mult) {
        const T denom = std::sqrt(sq[lv] * qu_global);
        x = w[lv] * (denom > 0 ? T(1) + T(a.delta) * dot[lv] / denom : T(1));
      } else {
        x = w[lv] + T(a.delta) * hd_prev * dot[lv];
      }
      new_w[lv] = x < 0 ? T(0) : x;  // NaN stays NaN
      sum += new_w[lv];
    }
    T* weights = io(a.weights);
    for (int lv = 0; lv < kNumLevels; ++lv)
      if (a.index[lv] >= 0)
        weights[a.index[lv]] = hd_gate > 0 ? (sum > 0 ? new_w[lv] / sum : T(1.0 / a.num_levels)) : w[lv];
  }
  *io(a.lr_scale_state) = gate > 0 ? lr_scale : lr_scale_old;

  // Pass 2 over the units, layer by layer: unit rates, kappa, the param level's parent.
  T* out = io(a.coef);
  const T applied = gate * lr_scale;
  const int pp = a.parent[kParamLevel];
  UnitPass<T> c{};
  c.coef = coef(kUnitLevel), c.beta_w = beta_w(kUnitLevel), c.rho = T(a.rho[kUnitLevel]);
  c.lo = lo, c.hi = hi, c.hd_gate = hd_gate, c.sized = a.sized ? T(1) : T(0);
  c.w_unit = w[kUnitLevel], c.applied = applied, c.tau_t = tau_t, c.rest = (1 - tau_t) * T(a.final_lr);
  c.shrink = a.parent[kUnitLevel] != kNoLevel, c.parent_is_unit = pp == kUnitLevel;
  T* kappa = out + kCoefScalars;
  T* param_parent = kappa + U;
  T* rates = has[kUnitLevel] ? io(a.rate[kUnitLevel]) : nullptr;
  at::parallel_for(0, L, grain(L, U), [&](int64_t l0, int64_t l1) {
    UnitPass<T> lc = c;  // this thread's copy: alpha and the parents change per layer
    for (int64_t l = l0; l < l1; ++l) {
      const T rate_l = has[kLayerLevel] ? io(a.rate[kLayerLevel])[l] : T(0);
      lc.alpha = T(0);  // sum over the coarse levels, coarse to fine, as update_levels adds them
      if (has[kGlobalLevel]) lc.alpha = lc.alpha + w[kGlobalLevel] * rate_g;
      if (has[kLayerLevel]) lc.alpha = lc.alpha + w[kLayerLevel] * rate_l;
      lc.parent = has[kLayerLevel] ? hd_l[l] : hd_g;
      lc.param_parent = pp == kGlobalLevel  ? (hd_gate > 0 ? hd_g : old_g)
                       : pp == kLayerLevel ? (hd_gate > 0 ? hd_l[l] : old_l[l])
                                           : T(0);
      const int64_t b = first_unit[l], e = first_unit[l + 1];
      if (rates) {
        auto run = mult ? update_units<T, true> : update_units<T, false>;
        run(lc, s, qg, qu, in(a.unit_scale), in(a.unit_mask), rates, kappa, param_parent, b, e);
      } else {
        std::fill(kappa + b, kappa + e, applied * (tau_t * lc.alpha + lc.rest));
        std::fill(param_parent + b, param_parent + e, lc.param_parent);
      }
    }
  });

  // What each tensor that stepped applied (state.record_applied_rates), with the old weights.
  const int K = a.num_levels;
  T* applied_scale = io(a.applied_scale);
  T* applied_offset = io(a.applied_offset);
  T offset = lr_scale * (1 - tau_t) * T(a.final_lr);
  if (has[kGlobalLevel]) offset = offset + lr_scale * tau_t * w[kGlobalLevel] * rate_g;
  for (int64_t l = 0; l < L; ++l) {
    if (!(layer_mask[l] * gate > 0)) continue;
    for (int lv = 0; lv < kNumLevels; ++lv)
      if (a.index[lv] >= 0) applied_scale[l * K + a.index[lv]] = lr_scale * tau_t * w[lv];
    applied_offset[l] = offset;
  }

  out[kGate] = gate;
  out[kHdGate] = hd_gate;
  out[kParamKappa] = applied * tau_t * w[kParamLevel];
  out[kParamHd] = mult ? T(a.beta[kParamLevel]) * w[kParamLevel] : T(a.beta[kParamLevel]) * hd_prev * w[kParamLevel];
}

void levels_op(const at::Tensor& s, const std::optional<at::Tensor>& qg, const std::optional<at::Tensor>& qu,
               const std::optional<at::Tensor>& param_dot, const std::optional<at::Tensor>& param_sq,
               const std::optional<at::Tensor>& finite, const std::optional<at::Tensor>& found_inf,
               const at::Tensor& lr_scale, const at::Tensor& units_per_layer, const at::Tensor& unit_scale,
               const at::Tensor& layer_scale, const at::Tensor& unit_mask, const at::Tensor& layer_mask,
               at::Tensor& step, at::Tensor& skipped, at::Tensor& lr_scale_state, at::Tensor& weights,
               const std::optional<at::Tensor>& rate_global, const std::optional<at::Tensor>& rate_layer,
               const std::optional<at::Tensor>& rate_unit, at::Tensor& applied_scale, at::Tensor& applied_offset,
               at::Tensor& coef, at::IntArrayRef level_index, at::IntArrayRef parents, at::ArrayRef<double> beta,
               at::ArrayRef<double> rho, double delta, double hd_decay, double final_lr, double rate_min,
               double rate_max, bool multiplicative, bool sized) {
  const at::TensorOptions math = weights.options();
  TORCH_CHECK(math.dtype() == at::kFloat || math.dtype() == at::kDouble, "levels: the group state must be float32 or float64");
  TORCH_CHECK(level_index.size() == kNumLevels && parents.size() == kNumLevels && beta.size() == kNumLevels &&
                  rho.size() == kNumLevels,
              "levels: level_index, parents, beta and rho need one entry per level (global, layer, unit, param)");
  LevelArgs a{};
  a.num_layers = units_per_layer.numel();
  a.num_units = s.numel();
  TORCH_CHECK(units_per_layer.scalar_type() == at::kLong && units_per_layer.is_contiguous() &&
                  units_per_layer.is_cpu(),
              "levels: units_per_layer must be a contiguous CPU int64 tensor");
  auto array = [&](const at::Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.numel() == n && t.is_contiguous() && is_math(t, math), "levels: ", what, " must be a contiguous ",
                math.dtype(), " tensor of ", n, " elements on the group state's device");
    return t.data_ptr();
  };
  const int64_t L = a.num_layers, U = a.num_units;
  a.units_per_layer = units_per_layer.data_ptr<int64_t>();
  int64_t units = 0;
  for (int64_t l = 0; l < L; ++l) units += a.units_per_layer[l];
  TORCH_CHECK(units == U, "levels: units_per_layer adds up to ", units, ", not the ", U, " unit sums");
  a.s = array(s, U, "s");
  a.qg = qg ? array(*qg, U, "qg") : nullptr;
  a.qu = qu ? array(*qu, U, "qu") : nullptr;
  TORCH_CHECK(!multiplicative || (a.qg && a.qu), "levels: the multiplicative rule needs qg and qu");
  a.param_dot = param_dot ? array(*param_dot, 1, "param_dot") : nullptr;
  a.param_sq = param_sq ? array(*param_sq, 1, "param_sq") : nullptr;
  if (finite) {
    TORCH_CHECK(finite->numel() == 1 && finite->scalar_type() == at::kBool && finite->is_cpu(),
                "levels: finite must be a one-element bool tensor");
    a.finite = finite->data_ptr<bool>();
  }
  a.found_inf = found_inf ? array(*found_inf, 1, "found_inf") : nullptr;
  a.lr_scale = array(lr_scale, 1, "lr_scale");
  a.unit_scale = array(unit_scale, U, "unit_scale");
  a.layer_scale = array(layer_scale, L, "layer_scale");
  a.unit_mask = array(unit_mask, U, "unit_mask");
  a.layer_mask = array(layer_mask, L, "layer_mask");
  a.step = array(step, 1, "step");
  TORCH_CHECK(skipped.numel() == 1 && skipped.scalar_type() == at::kLong && skipped.is_cpu(),
              "levels: skipped must be a one-element int64 tensor");
  a.skipped = skipped.data_ptr<int64_t>();
  a.lr_scale_state = array(lr_scale_state, 1, "lr_scale_state");
  a.num_levels = static_cast<int>(weights.numel());
  a.weights = array(weights, a.num_levels, "weights");
  const std::optional<at::Tensor>* rates[kCoarseLevels] = {&rate_global, &rate_layer, &rate_unit};
  const int64_t rate_sizes[kCoarseLevels] = {1, L, U};
  int count = 0;
  for (int lv = 0; lv < kNumLevels; ++lv) {
    a.index[lv] = static_cast<int>(level_index[lv]);
    a.parent[lv] = static_cast<int>(parents[lv]);
    a.beta[lv] = beta[lv];
    a.rho[lv] = rho[lv];
    TORCH_CHECK(a.index[lv] >= kNoLevel && a.index[lv] < a.num_levels && a.parent[lv] >= kNoLevel &&
                    a.parent[lv] < lv && (a.parent[lv] == kNoLevel || level_index[a.parent[lv]] >= 0),
                "levels: bad level_index or parents");
    count += a.index[lv] >= 0;
    if (lv < kCoarseLevels) {
      TORCH_CHECK(rates[lv]->has_value() == (a.index[lv] >= 0), "levels: pass the rates of the active levels only");
      a.rate[lv] = *rates[lv] ? array(**rates[lv], rate_sizes[lv], "a level's rates") : nullptr;
    }
  }
  TORCH_CHECK(count == a.num_levels, "levels: level_index names ", count, " levels, the weights ", a.num_levels);
  TORCH_CHECK(a.index[kParamLevel] < 0 || a.num_levels == 1 || (a.param_dot && (!multiplicative || a.param_sq)),
              "levels: the param level among several needs param_dot (and param_sq for the multiplicative rule)");
  a.applied_scale = array(applied_scale, L * a.num_levels, "applied_scale");
  a.applied_offset = array(applied_offset, L, "applied_offset");
  a.coef = array(coef, kCoefScalars + 2 * U, "coef");
  a.delta = delta;
  a.hd_decay = hd_decay;
  a.final_lr = final_lr;
  a.rate_min = rate_min;
  a.rate_max = rate_max;
  a.multiplicative = multiplicative;
  a.sized = sized;
  if (math.dtype() == at::kDouble) level_stage<double>(a);
  else level_stage<float>(a);
}

}  // namespace

TORCH_LIBRARY_IMPL(multilevel_hd, CPU, m) { m.impl("levels", &levels_op); }

}  // namespace mlhd
