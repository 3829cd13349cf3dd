// Python bindings of the CPU kernels: metadd_fast._C
#include <torch/extension.h>

#include <vector>

namespace metadd {
std::vector<at::Tensor> cam_map_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                        bool, int64_t, double);
std::vector<at::Tensor> cam_map_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, int64_t, bool, int64_t, double, bool, bool,
                                         int64_t);
at::Tensor map_variance_forward(const at::Tensor&);
at::Tensor map_variance_backward(const at::Tensor&, const at::Tensor&);
}  // namespace metadd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metadd_fast CPU kernels";
  m.def("cam_map_forward", &metadd::cam_map_forward, "CAM of one architecture: (U_k, R_k)");
  m.def("cam_map_backward", &metadd::cam_map_backward, "CAM backward of one architecture: (dA, dW)");
  m.def("map_variance_forward", &metadd::map_variance_forward, "per-image mean cross-architecture variance");
  m.def("map_variance_backward", &metadd::map_variance_backward, "gradient of map_variance_forward");
}
