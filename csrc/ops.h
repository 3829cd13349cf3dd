// The CPU launchers of metadd_fast._C, one group per op (csrc/<op>.cpp). They share names and
// signatures with the Triton launchers of kernels/<op>.py; metadd_fast/ops/<op>.py registers
// them as the CPU kernels of the metadd_fast::<op> ops (docs/ops.md section 8).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace metadd {
using Tensors = std::vector<at::Tensor>;

// cam_maps.cpp
std::tuple<at::Tensor, Tensors> cam_maps_forward(const Tensors& features, const Tensors& heads, const Tensors& rows,
                                                 int64_t Sh, int64_t Sw, bool relu, int64_t norm, double eps);
std::tuple<Tensors, Tensors> cam_maps_backward(const at::Tensor& dU, const Tensors& features, const Tensors& heads,
                                               const Tensors& rows, const Tensors& rects, int64_t Sh, int64_t Sw,
                                               bool relu, int64_t norm, double eps,
                                               const std::vector<bool>& feature_grad,
                                               const std::vector<bool>& head_grad);
// map_variance.cpp
at::Tensor map_variance_forward(const at::Tensor& U);
at::Tensor map_variance_backward(const at::Tensor& grad, const at::Tensor& U);
// cvar.cpp
std::vector<at::Tensor> cvar_group_stats(const at::Tensor& values, const at::Tensor& groups, int64_t num_groups);
std::vector<at::Tensor> cvar_tail(const at::Tensor& L, const std::optional<at::Tensor>& counts, double alpha);
at::Tensor cvar_values_grad(const at::Tensor& grad, const at::Tensor& w, const std::optional<at::Tensor>& counts,
                            const std::optional<at::Tensor>& groups, const at::Tensor& like);
std::vector<at::Tensor> cvar_dual_forward(const at::Tensor& values, const at::Tensor& eta, double alpha);
std::vector<at::Tensor> cvar_dual_backward(const at::Tensor& grad, const at::Tensor& values, const at::Tensor& eta,
                                           double alpha, const at::Tensor& above);
// nearest_centroid.cpp
std::vector<at::Tensor> nearest_centroid_forward(const at::Tensor& x, const at::Tensor& c, const at::Tensor& cn,
                                                 const at::Tensor& cmax);
}  // namespace metadd
