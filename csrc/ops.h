// The two ops of a fused step (schemas in ops.cpp), written once for both devices: each
// device file instantiates reduce_op / apply_op with its Runner (the kernels) and
// registers them for its dispatch key.
#pragma once

#include <ATen/ATen.h>

#include <string_view>
#include <utility>
#include <vector>

#include "common.h"

namespace mlhd {

struct OpLists {
  at::TensorList params, grads, state_a, state_b, param_rates, steps;
};

// The tensors of one call as kernel arguments: tables with fresh pointers, and copies of
// tensors whose layout the kernels cannot walk (rare; written back by finish()).
struct Operands {
  Tables tables{};
  Dtype dtype{};
  at::TensorOptions math;  // dtype and device of state, rates and sums
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (tensor, staged copy)
  std::vector<at::Tensor> keep_alive;                         // read-only staged copies
  void finish();
};

Operands prepare_operands(const OpLists& lists, const at::Tensor& meta, at::Tensor& ptr_mirror,
                          at::Tensor& ptr_table, int64_t num_slots, bool writes);
Direction parse_direction(std::string_view direction);
const void* scalar_data(const at::Tensor& t, const at::TensorOptions& math, const char* what);

inline bool is_math(const at::Tensor& t, const at::TensorOptions& math) {
  return t.scalar_type() == math.dtype().toScalarType() && t.device() == math.device();
}

template <class Runner>
void reduce_op(at::TensorList params, at::TensorList grads, at::TensorList state_a, at::TensorList state_b,
               at::TensorList param_rates, at::TensorList steps, const at::Tensor& meta, at::Tensor& ptr_mirror,
               at::Tensor& ptr_table, int64_t num_slots, std::string_view direction, bool hypergrad_sums,
               bool param_sums, const at::Tensor& grad_factor, double coupled_weight_decay, double beta1,
               double beta2, double eps, at::Tensor& unit_sums, at::Tensor& totals) {
  Operands ops = prepare_operands({params, grads, state_a, state_b, param_rates, steps}, meta, ptr_mirror,
                                  ptr_table, num_slots, /*writes=*/false);
  TORCH_CHECK(unit_sums.dim() == 2 && (unit_sums.size(0) == 1 || unit_sums.size(0) == 3) &&
                  unit_sums.stride(1) == 1 && is_math(unit_sums, ops.math),
              "reduce: unit_sums must be a [1 or 3, units] tensor of the parameters' math dtype and device");
  TORCH_CHECK(totals.numel() == 3 && totals.is_contiguous() && is_math(totals, ops.math),
              "reduce: totals must be a 3-element tensor of the parameters' math dtype and device");
  ReduceArgs a{};
  a.tables = ops.tables;
  a.grad_factor = scalar_data(grad_factor, ops.math, "grad_factor");
  a.hyper.weight_decay = coupled_weight_decay;
  a.hyper.beta1 = beta1;
  a.hyper.beta2 = beta2;
  a.hyper.eps = eps;
  a.uprev = !hypergrad_sums ? Uprev::None
            : parse_direction(direction) == Direction::Adam ? Uprev::Adam : Uprev::Stored;
  a.param_sums = param_sums;
  a.coupled_decay = coupled_weight_decay != 0;
  a.num_sums = unit_sums.size(0);
  at::Tensor slots = at::empty({3 * num_slots}, ops.math);
  at::Tensor chunks = at::empty({a.tables.num_chunks * 3}, ops.math);
  a.slot_partials = slots.data_ptr();
  a.chunk_partials = chunks.data_ptr();
  a.unit_sums = unit_sums.data_ptr();
  a.units_stride = unit_sums.stride(0);
  a.totals = totals.data_ptr();
  Runner::reduce(a, ops.dtype, unit_sums.device());
}

template <class Runner>
void apply_op(at::TensorList params, at::TensorList grads, at::TensorList state_a, at::TensorList state_b,
              at::TensorList param_rates, at::TensorList steps, const at::Tensor& meta, at::Tensor& ptr_mirror,
              at::Tensor& ptr_table, std::string_view direction, const at::Tensor& grad_factor,
              double coupled_weight_decay, double decoupled_weight_decay, double beta1, double beta2, double eps,
              double momentum, double dampening, const at::Tensor& gate, const at::Tensor& hd_gate,
              const at::Tensor& kappa_units,
              const std::optional<at::Tensor>& param_kappa, const std::optional<at::Tensor>& param_hd,
              const std::optional<at::Tensor>& param_parent, bool multiplicative, double shrinkage,
              double rate_min, double rate_max) {
  Operands ops = prepare_operands({params, grads, state_a, state_b, param_rates, steps}, meta, ptr_mirror,
                                  ptr_table, /*num_slots=*/0, /*writes=*/true);
  ApplyArgs a{};
  a.tables = ops.tables;
  a.hyper = {coupled_weight_decay, decoupled_weight_decay, beta1, beta2, eps, momentum, dampening,
             multiplicative, shrinkage, rate_min, rate_max};
  a.grad_factor = scalar_data(grad_factor, ops.math, "grad_factor");
  a.direction = parse_direction(direction);
  a.param_level = !param_rates.empty();
  a.gate = scalar_data(gate, ops.math, "gate");
  a.hd_gate = scalar_data(hd_gate, ops.math, "hd_gate");
  TORCH_CHECK(kappa_units.dim() == 1 && is_math(kappa_units, ops.math),
              "apply: kappa_units must be a 1-D tensor of the parameters' math dtype and device");
  a.kappa_units = kappa_units.data_ptr();
  a.kappa_stride = kappa_units.stride(0);
  if (a.param_level) {
    TORCH_CHECK(param_kappa && param_hd, "apply: the param level needs param_kappa and param_hd");
    a.param_kappa = scalar_data(*param_kappa, ops.math, "param_kappa");
    a.param_hd = scalar_data(*param_hd, ops.math, "param_hd");
    if (param_parent) {
      TORCH_CHECK(param_parent->dim() <= 1 && is_math(*param_parent, ops.math),
                  "apply: param_parent must be 0-d or per unit, in the parameters' math dtype and device");
      a.param_parent = param_parent->data_ptr();
      a.parent_stride = param_parent->dim() ? param_parent->stride(0) : 0;
    }
  }
  Runner::apply(a, ops.dtype, kappa_units.device());
  ops.finish();
}

}  // namespace mlhd
