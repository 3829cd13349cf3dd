// MetaDD's CAM variance in one op (docs/ops.md section 3): metadd_fast::cam_variance is
// cam_maps then map_variance in one forward (v (B,), U, R_k) and one backward (map_variance's
// gradient into cam_maps'). Registered here: its CPU kernels and its autograd.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cam_autograd.h"
#include "ops.h"

namespace metadd {
namespace {

std::tuple<at::Tensor, at::Tensor, Tensors> cam_variance_cpu(at::TensorList features, at::TensorList heads,
                                                             at::TensorList rows, c10::SymInt out_h,
                                                             c10::SymInt out_w, bool relu, int64_t norm, double eps) {
  auto [maps, rects] = cam_maps_forward(features.vec(), heads.vec(), rows.vec(), out_h.expect_int(),
                                        out_w.expect_int(), relu, norm, eps);
  return {map_variance_forward(maps), maps, rects};
}

std::tuple<Tensors, Tensors> cam_variance_backward_cpu(const at::Tensor& grad, const at::Tensor& maps,
                                                       at::TensorList features, at::TensorList heads,
                                                       at::TensorList rows, at::TensorList rects, c10::SymInt out_h,
                                                       c10::SymInt out_w, bool relu, int64_t norm, double eps,
                                                       const c10::List<bool>& feature_grad,
                                                       const c10::List<bool>& head_grad) {
  return cam_maps_backward(map_variance_backward(grad, maps), features.vec(), heads.vec(), rows.vec(), rects.vec(),
                           out_h.expect_int(), out_w.expect_int(), relu, norm, eps, feature_grad.vec(),
                           head_grad.vec());
}

// v's gradient by cam_variance_backward (no derivative of its own: a clear error under
// create_graph, registered in metadd_fast/ops/cam_variance.py).
class CamVarianceFunction : public torch::autograd::Function<CamVarianceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList features, at::TensorList heads,
                               at::TensorList rows, c10::SymInt out_h, c10::SymInt out_w, bool relu, int64_t norm,
                               double eps) {
    static const auto op = op_handle<CamVarianceSig>("metadd_fast::cam_variance");
    save_dispatch_modes(ctx);
    ctx->set_materialize_grads(false);  // only the first output has a gradient: no zeros for the others
    auto [v, maps, rects] = call_below_autograd(op, features, heads, rows, out_h, out_w, relu, norm, eps);
    save_cam(ctx, features, heads, rows, rects, maps, {std::move(out_h), std::move(out_w), relu, norm, eps});
    variable_list out{v, maps};
    out.insert(out.end(), rects.begin(), rects.end());
    ctx->mark_non_differentiable(variable_list(out.begin() + 1, out.end()));
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<CamVarianceBackwardSig>("metadd_fast::cam_variance_backward");
    if (!grads[0].defined()) return variable_list(3 * ctx->saved_data["k"].toInt() + 5);  // v was not used
    ForwardModes modes(ctx);
    const SavedCam s = load_cam(ctx);
    const CamOptions& o = s.options;
    auto [d_features, d_heads] =
        call_backward(op, grads[0].contiguous(), s.extra, s.features, s.heads, s.rows, s.rects, o.out_h, o.out_w,
                      o.relu, o.norm, o.eps, s.feature_grad, s.head_grad);
    return cam_input_grads(s, d_features, d_heads);
  }
};

std::tuple<at::Tensor, at::Tensor, Tensors> cam_variance_autograd(at::TensorList features, at::TensorList heads,
                                                                  at::TensorList rows, c10::SymInt out_h,
                                                                  c10::SymInt out_w, bool relu, int64_t norm,
                                                                  double eps) {
  if (!records_graph(features, heads)) {
    static const auto op = op_handle<CamVarianceSig>("metadd_fast::cam_variance");
    return call_below_autograd(op, features, heads, rows, std::move(out_h), std::move(out_w), relu, norm, eps);
  }
  variable_list out =
      CamVarianceFunction::apply(features, heads, rows, std::move(out_h), std::move(out_w), relu, norm, eps);
  return {out[0], out[1], Tensors(out.begin() + 2, out.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(metadd_fast, CPU, m) {
  m.impl("cam_variance", &cam_variance_cpu);
  m.impl("cam_variance_backward", &cam_variance_backward_cpu);
}

TORCH_LIBRARY_IMPL(metadd_fast, Autograd, m) { m.impl("cam_variance", &cam_variance_autograd); }

}  // namespace metadd
