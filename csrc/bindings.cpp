// Python bindings of the CPU kernels: metadd_fast._C
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

namespace metadd {
using Tensors = std::vector<at::Tensor>;
std::tuple<at::Tensor, Tensors> cam_maps_forward(const Tensors&, const Tensors&, const Tensors&, int64_t, int64_t,
                                                 bool, int64_t, double);
std::tuple<Tensors, Tensors> cam_maps_backward(const at::Tensor&, const Tensors&, const Tensors&, const Tensors&,
                                               const Tensors&, int64_t, int64_t, bool, int64_t, double,
                                               const std::vector<bool>&, const std::vector<bool>&);
at::Tensor map_variance_forward(const at::Tensor&);
at::Tensor map_variance_backward(const at::Tensor&, const at::Tensor&);
std::vector<at::Tensor> cvar_group_stats(const at::Tensor&, const at::Tensor&, int64_t);
std::vector<at::Tensor> cvar_tail(const at::Tensor&, const std::optional<at::Tensor>&, double);
at::Tensor cvar_values_grad(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const at::Tensor&);
at::Tensor cvar_autograd(const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double);
std::vector<at::Tensor> cvar_dual_forward(const at::Tensor&, const at::Tensor&, double);
std::vector<at::Tensor> cvar_dual_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                           const at::Tensor&);
std::vector<at::Tensor> nearest_centroid_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&);
}  // namespace metadd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metadd_fast CPU kernels";
  m.def("cam_maps_forward", &metadd::cam_maps_forward, "CAMs of K architectures: (U (K, B, P), [R_k])");
  m.def("cam_maps_backward", &metadd::cam_maps_backward, "CAM backward of K architectures: ([dA_k], [dW_k])");
  m.def("map_variance_forward", &metadd::map_variance_forward, "per-image mean cross-architecture variance");
  m.def("map_variance_backward", &metadd::map_variance_backward, "gradient of map_variance_forward");
  m.def("cvar_group_stats", &metadd::cvar_group_stats, "float64 group sums and int64 counts");
  m.def("cvar_tail", &metadd::cvar_tail, "CVaR of L (or of the means sums/counts) and its weights dCVaR/dL");
  m.def("cvar_values_grad", &metadd::cvar_values_grad, "gradient of the CVaR wrt the values");
  m.def("cvar_autograd", &metadd::cvar_autograd, "the CVaR as one C++ autograd node (eager calls)");
  m.def("cvar_dual_forward", &metadd::cvar_dual_forward, "Rockafellar-Uryasev CVaR and the count above eta");
  m.def("cvar_dual_backward", &metadd::cvar_dual_backward, "gradient of cvar_dual_forward");
  m.def("nearest_centroid_forward", &metadd::nearest_centroid_forward, "blocked nearest centroid: (index, sqdist, refine)");
}
