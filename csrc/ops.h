// The C++ side of metadd_fast._C, one group per op (csrc/<op>.cpp):
// - the CPU launchers, bound to Python: they share names and signatures with the Triton
//   launchers of kernels/<op>.py (the distributed CVaR and the tests call them);
// - the C++ signatures of the registered ops metadd_fast::<op> (schemas defined by
//   metadd_fast/ops/<op>.py): each csrc/<op>.cpp registers its op's CPU kernel and, for a
//   differentiable op, its autograd (TORCH_LIBRARY_IMPL), docs/ops.md section 8.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <optional>
#include <tuple>
#include <vector>

namespace metadd {
using Tensors = std::vector<at::Tensor>;
using MaybeTensor = std::optional<at::Tensor>;

// C++ signatures of the registered ops (one per schema; CPU kernels and typed calls share them).
using CamMapsSig = std::tuple<at::Tensor, Tensors>(at::TensorList features, at::TensorList heads, at::TensorList rows,
                                                   c10::SymInt out_h, c10::SymInt out_w, bool relu, int64_t norm,
                                                   double eps);
using CamMapsBackwardSig = std::tuple<Tensors, Tensors>(const at::Tensor& grad, at::TensorList features,
                                                        at::TensorList heads, at::TensorList rows, at::TensorList rects,
                                                        c10::SymInt out_h, c10::SymInt out_w, bool relu, int64_t norm,
                                                        double eps, const c10::List<bool>& feature_grad,
                                                        const c10::List<bool>& head_grad);
using MapVarianceSig = at::Tensor(const at::Tensor& maps);
using MapVarianceBackwardSig = at::Tensor(const at::Tensor& grad, const at::Tensor& maps);
using CamVarianceSig = std::tuple<at::Tensor, at::Tensor, Tensors>(at::TensorList features, at::TensorList heads,
                                                                   at::TensorList rows, c10::SymInt out_h,
                                                                   c10::SymInt out_w, bool relu, int64_t norm,
                                                                   double eps);
using CamVarianceBackwardSig = std::tuple<Tensors, Tensors>(
    const at::Tensor& grad, const at::Tensor& maps, at::TensorList features, at::TensorList heads, at::TensorList rows,
    at::TensorList rects, c10::SymInt out_h, c10::SymInt out_w, bool relu, int64_t norm, double eps,
    const c10::List<bool>& feature_grad, const c10::List<bool>& head_grad);
using CVaRSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor& values, const MaybeTensor& groups,
                                                               c10::SymInt num_groups, double alpha);
using CVaRBackwardSig = at::Tensor(const at::Tensor& grad, const at::Tensor& weights, const at::Tensor& counts,
                                   const MaybeTensor& groups, const at::Tensor& values);
using CVaRDualSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& values, const at::Tensor& eta, double alpha);
using CVaRDualBackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& grad, const at::Tensor& values,
                                                               const at::Tensor& eta, double alpha,
                                                               const at::Tensor& above);
using NearestCentroidSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& x, const at::Tensor& centroids);

// The launchers (Python bindings in bindings.cpp).

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
