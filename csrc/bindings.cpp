// Python bindings of metadd_fast._C (declared in ops.h): the CPU launchers, and the eager entries
// of the registered ops. The ops' schemas are defined by metadd_fast/ops/<op>.py; their CPU
// kernels and autograd are registered by csrc/<op>.cpp (docs/ops.md section 8).
#include <torch/extension.h>

#include "autograd_util.h"
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metadd_fast CPU kernels";
  m.def("cam_maps_forward", &metadd::cam_maps_forward, "CAMs of K architectures: (U (K, B, P), [R_k])");
  m.def("cam_maps_backward", &metadd::cam_maps_backward, "CAM backward of K architectures: ([dA_k], [dW_k])");
  m.def("map_variance_forward", &metadd::map_variance_forward, "per-image mean cross-architecture variance");
  m.def("map_variance_backward", &metadd::map_variance_backward, "gradient of map_variance_forward");
  m.def("cvar_group_stats", &metadd::cvar_group_stats, "float64 group sums and int64 counts");
  m.def("cvar_tail", &metadd::cvar_tail, "CVaR of L (or of the means sums/counts) and its weights dCVaR/dL");
  m.def("cvar_values_grad", &metadd::cvar_values_grad, "gradient of the CVaR wrt the values");
  m.def("cvar_dual_forward", &metadd::cvar_dual_forward, "Rockafellar-Uryasev CVaR and the count above eta");
  m.def("cvar_dual_backward", &metadd::cvar_dual_backward, "gradient of cvar_dual_forward");
  m.def("nearest_centroid_forward", &metadd::nearest_centroid_forward, "blocked nearest centroid: (index, sqdist, refine)");

  // call_<op>: the op through the dispatcher (every registered kernel, the autograd and any
  // dispatch mode), entered unboxed: a few microseconds cheaper from Python than
  // torch.ops.metadd_fast.<op>, which is what torch.compile traces (metadd_fast.ops.registry.KernelOp).
  using metadd::op_handle;
  m.def("call_cam_maps", [](const metadd::Tensors& features, const metadd::Tensors& heads, const metadd::Tensors& rows,
                            int64_t out_h, int64_t out_w, bool relu, int64_t norm, double eps) {
    static const auto op = op_handle<metadd::CamMapsSig>("metadd_fast::cam_maps");
    return op.call(features, heads, rows, out_h, out_w, relu, norm, eps);
  });
  m.def("call_map_variance", [](const at::Tensor& maps) {
    static const auto op = op_handle<metadd::MapVarianceSig>("metadd_fast::map_variance");
    return op.call(maps);
  });
  m.def("call_cam_variance", [](const metadd::Tensors& features, const metadd::Tensors& heads,
                                const metadd::Tensors& rows, int64_t out_h, int64_t out_w, bool relu, int64_t norm,
                                double eps) {
    static const auto op = op_handle<metadd::CamVarianceSig>("metadd_fast::cam_variance");
    return op.call(features, heads, rows, out_h, out_w, relu, norm, eps);
  });
  m.def("call_cvar", [](const at::Tensor& values, const std::optional<at::Tensor>& groups, int64_t num_groups,
                        double alpha) {
    static const auto op = op_handle<metadd::CVaRSig>("metadd_fast::cvar");
    return op.call(values, groups, num_groups, alpha);
  });
  m.def("call_cvar_dual", [](const at::Tensor& values, const at::Tensor& eta, double alpha) {
    static const auto op = op_handle<metadd::CVaRDualSig>("metadd_fast::cvar_dual");
    return op.call(values, eta, alpha);
  });
}
