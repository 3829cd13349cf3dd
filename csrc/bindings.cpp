// Python bindings of the CPU launchers: metadd_fast._C (declared in ops.h). The ops themselves are
// registered with torch.library by metadd_fast/ops/<op>.py (docs/ops.md section 8).
#include <torch/extension.h>

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
}
