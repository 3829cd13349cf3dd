// CPU kernels of the fused CAM op (docs/ops.md section 1), parallel over images
// with at::parallel_for (OpenMP in PyTorch's CPU builds).
//
// Per architecture k, with A (B, C, H, W) in any floating dtype, weights Wt viewed
// as (R, C, Qw) in the accumulation dtype (Qw = H*W for a flatten head, 1 for a
// linear head or per-sample weights) and rows (B,) int64 selecting each image's
// weight row (its label, or the image index for per-sample weights):
//   forward : A read once; writes U_k (B, Sh*Sw) and the rectified map R_k (B, H*W).
//   backward: from dU_k and R_k writes dA once; reads A only for the weight gradient.
//
// Registered here: the CPU kernels of metadd_fast::cam_maps and cam_maps_backward, and the
// autograd of cam_maps.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <torch/library.h>

#include "cam_autograd.h"
#include "cam_common.h"
#include "index_range.h"
#include "ops.h"

namespace metadd {
namespace {

// z[q] = sum_c w[c, q] * a[c, q] (kPixel: flatten head) or sum_c w[c] * a[c, q].
// Channels go four at a time, so the running sums are loaded and stored a quarter
// as often (the loop is latency-bound otherwise).
template <bool kPixel, typename scalar_t, typename acc_t>
void accumulate_raw_map(const scalar_t* __restrict__ a, const acc_t* __restrict__ w, int64_t C, int64_t Q,
                        acc_t* __restrict__ z) {
  constexpr int64_t ws = kPixel ? 1 : 0;  // weight stride along q
  const int64_t wc = kPixel ? Q : 1;      // weight stride along c
  std::fill(z, z + Q, acc_t(0));
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {
    const scalar_t *a0 = a + c * Q, *a1 = a0 + Q, *a2 = a1 + Q, *a3 = a2 + Q;
    const acc_t *w0 = w + c * wc, *w1 = w0 + wc, *w2 = w1 + wc, *w3 = w2 + wc;
    for (int64_t q = 0; q < Q; ++q) {
      z[q] += (w0[q * ws] * static_cast<acc_t>(a0[q]) + w1[q * ws] * static_cast<acc_t>(a1[q])) +
              (w2[q * ws] * static_cast<acc_t>(a2[q]) + w3[q * ws] * static_cast<acc_t>(a3[q]));
    }
  }
  for (; c < C; ++c) {
    for (int64_t q = 0; q < Q; ++q) z[q] += w[c * wc + q * ws] * static_cast<acc_t>(a[c * Q + q]);
  }
}

// Shapes of one architecture's map and its output grid, and the resize taps.
template <typename acc_t>
struct MapGeometry {
  int64_t B, C, H, W, Q, P, Qw;
  bool identity;  // no resize
  std::vector<Tap<acc_t>> th, tw;
  int64_t grain;  // images per parallel task: at least kGrainWork multiply-adds

  MapGeometry(const at::Tensor& A, const at::Tensor& Wt, int64_t Sh, int64_t Sw)
      : B(A.size(0)), C(A.size(1)), H(A.size(2)), W(A.size(3)), Q(H * W), P(Sh * Sw), Qw(Wt.size(2)),
        identity(H == Sh && W == Sw), th(bilinear_taps<acc_t>(H, Sh)), tw(bilinear_taps<acc_t>(W, Sw)),
        grain(grain_for(C * Q)) {}
};

template <typename scalar_t>
void cam_map_forward_impl(const at::Tensor& A, const at::Tensor& Wt, const at::Tensor& rows,
                          int64_t Sh, int64_t Sw, bool relu, int64_t norm, double eps,
                          at::Tensor& U, at::Tensor& R) {
  using acc_t = at::opmath_type<scalar_t>;
  const MapGeometry<acc_t> geo(A, Wt, Sh, Sw);
  const int64_t B = geo.B, C = geo.C, W = geo.W, Q = geo.Q, P = geo.P, Qw = geo.Qw;
  const bool identity = geo.identity;
  const auto &th = geo.th, &tw = geo.tw;
  const scalar_t* a_ptr = A.data_ptr<scalar_t>();
  const acc_t* w_ptr = Wt.data_ptr<acc_t>();
  const int64_t* row_ptr = rows.data_ptr<int64_t>();
  acc_t* u_ptr = U.data_ptr<acc_t>();
  acc_t* r_ptr = R.data_ptr<acc_t>();
  const acc_t eps_t = static_cast<acc_t>(eps);

  at::parallel_for(0, B, geo.grain, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> z_buf(Q), n_buf(Q);
    acc_t* __restrict__ z = z_buf.data();
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* __restrict__ a = a_ptr + b * C * Q;
      const acc_t* __restrict__ w = w_ptr + row_ptr[b] * C * Qw;
      if (Qw == 1) {
        accumulate_raw_map<false>(a, w, C, Q, z);
      } else {
        accumulate_raw_map<true>(a, w, C, Q, z);
      }
      acc_t* r = r_ptr + b * Q;
      for (int64_t q = 0; q < Q; ++q) r[q] = (relu && z[q] < 0) ? acc_t(0) : z[q];  // keeps NaN
      const MapStats<acc_t> s = map_stats(r, Q, norm, eps_t);
      acc_t* u = u_ptr + b * P;
      acc_t* dst = identity ? u : n_buf.data();
      for (int64_t q = 0; q < Q; ++q) dst[q] = (r[q] - s.lo) / s.denom;
      if (!identity) resize_map(n_buf.data(), W, th, tw, u);
    }
  });
}

template <typename scalar_t>
void cam_map_backward_impl(const at::Tensor& dU, const at::Tensor& A, const at::Tensor& Wt,
                           const at::Tensor& rows, const at::Tensor& R, int64_t Sh, int64_t Sw,
                           bool relu, int64_t norm, double eps, at::Tensor& dA, at::Tensor& dW) {
  using acc_t = at::opmath_type<scalar_t>;
  const MapGeometry<acc_t> geo(A, Wt, Sh, Sw);
  const int64_t B = geo.B, C = geo.C, W = geo.W, Q = geo.Q, P = geo.P, Qw = geo.Qw;
  const bool identity = geo.identity;
  const auto &th = geo.th, &tw = geo.tw;
  const acc_t* w_ptr = Wt.data_ptr<acc_t>();
  const int64_t* row_ptr = rows.data_ptr<int64_t>();
  const acc_t* du_ptr = dU.data_ptr<acc_t>();
  const acc_t* r_ptr = R.data_ptr<acc_t>();
  const acc_t eps_t = static_cast<acc_t>(eps);
  at::Tensor dZ = at::empty({B, Q}, R.options());  // d loss / d raw map, 1/C of the features
  acc_t* dz_ptr = dZ.data_ptr<acc_t>();

  at::parallel_for(0, B, geo.grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* g = dz_ptr + b * Q;
      const acc_t* r = r_ptr + b * Q;
      if (identity) {
        std::copy(du_ptr + b * P, du_ptr + (b + 1) * P, g);
      } else {
        std::fill(g, g + Q, acc_t(0));
        resize_map_adjoint(du_ptr + b * P, W, th, tw, g);
      }
      normalize_relu_backward(g, r, Q, norm, relu, map_stats(r, Q, norm, eps_t));
      if (!dA.defined()) continue;
      scalar_t* __restrict__ da = dA.data_ptr<scalar_t>() + b * C * Q;
      const acc_t* __restrict__ w = w_ptr + row_ptr[b] * C * Qw;
      for (int64_t c = 0; c < C; ++c) {
        scalar_t* __restrict__ dac = da + c * Q;
        if (Qw == 1) {
          const acc_t wc = w[c];
          for (int64_t q = 0; q < Q; ++q) dac[q] = static_cast<scalar_t>(wc * g[q]);
        } else {
          const acc_t* wc = w + c * Q;
          for (int64_t q = 0; q < Q; ++q) dac[q] = static_cast<scalar_t>(wc[q] * g[q]);
        }
      }
    }
  });
  if (!dW.defined()) return;
  // dW[row_b, c, :] += dZ[b] * A[b, c]: parallel over channels, images in order (deterministic).
  const scalar_t* a_ptr = A.data_ptr<scalar_t>();
  acc_t* dw_ptr = dW.data_ptr<acc_t>();
  at::parallel_for(0, C, grain_for(B * Q), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t* ac = a_ptr + (b * C + c) * Q;
        const acc_t* g = dz_ptr + b * Q;
        acc_t* dwc = dw_ptr + (row_ptr[b] * C + c) * Qw;
        if (Qw == 1) {
          acc_t s = 0;
          for (int64_t q = 0; q < Q; ++q) s += g[q] * static_cast<acc_t>(ac[q]);
          dwc[0] += s;
        } else {
          for (int64_t q = 0; q < Q; ++q) dwc[q] += g[q] * static_cast<acc_t>(ac[q]);
        }
      }
    }
  });
}

// Launcher inputs in the layout the kernels read, whatever the caller passed (any strides,
// storage offset, stride-0 expansion or channels_last; int32 or int64 rows): contiguous
// features, the head (R, C, Qw) contiguous in the accumulation dtype, contiguous int64 rows.
// Copies only what is not in that form already.
struct MapInputs {
  at::Tensor A, Wt, rows;
};

MapInputs map_inputs(const at::Tensor& features, const at::Tensor& head, const at::Tensor& rows) {
  TORCH_CHECK(features.device().is_cpu() && features.dim() == 4, "features: 4-D CPU tensor expected");
  TORCH_CHECK(head.dim() == 3 && head.size(1) == features.size(1), "weights: (R, C, Qw) expected");
  TORCH_CHECK(!rows.is_floating_point() && rows.numel() == features.size(0), "rows: (B,) integer tensor expected");
  MapInputs in{features.contiguous(), head.to(at::toOpMathType(features.scalar_type())).contiguous(),
               rows.to(at::kLong).contiguous()};
  // The rows are the labels (or 0..B-1 for per-sample weights); the Python API leaves their
  // range to this check, with its message (metadd_fast.cam_args.check_label_range).
  check_index_range("labels", in.rows.data_ptr<int64_t>(), in.rows.numel(), in.Wt.size(0));
  return in;
}

}  // namespace

// All K architectures: U (K, B, Sh*Sw) and the rectified maps R_k (B, H_k*W_k), in the
// accumulation dtype. heads[k]: (R, C_k, Qw_k) in the accumulation dtype; rows[k]: (B,) int64.
std::tuple<at::Tensor, std::vector<at::Tensor>> cam_maps_forward(const std::vector<at::Tensor>& features,
                                                                const std::vector<at::Tensor>& heads,
                                                                const std::vector<at::Tensor>& rows, int64_t Sh,
                                                                int64_t Sw, bool relu, int64_t norm, double eps) {
  TORCH_CHECK(!features.empty() && heads.size() == features.size() && rows.size() == features.size(),
              "cam_maps_forward: one head and one rows tensor per feature map expected");
  const at::Tensor& A0 = features[0];
  const int64_t K = static_cast<int64_t>(features.size());
  at::Tensor U = at::empty({K, A0.size(0), Sh * Sw}, A0.options().dtype(at::toOpMathType(A0.scalar_type())));
  std::vector<at::Tensor> rects;
  rects.reserve(K);
  std::vector<MapInputs> inputs;
  inputs.reserve(K);
  for (int64_t k = 0; k < K; ++k) {  // every check before any map is computed
    inputs.push_back(map_inputs(features[k], heads[k], rows[k]));
    TORCH_CHECK(at::toOpMathType(features[k].scalar_type()) == U.scalar_type(),
                "features: one accumulation dtype expected");
  }
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor& A = inputs[k].A;
    at::Tensor Uk = U.select(0, k);
    at::Tensor R = at::empty({A.size(0), A.size(2) * A.size(3)}, U.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "cam_maps_forward", [&] {
      cam_map_forward_impl<scalar_t>(A, inputs[k].Wt, inputs[k].rows, Sh, Sw, relu, norm, eps, Uk, R);
    });
    rects.push_back(R);
  }
  return {U, rects};
}

// Per architecture dA_k (or an empty tensor) and dW_k (heads[k]'s shape, accumulation dtype, or
// an empty tensor), from dU (K, B, Sh*Sw) in the accumulation dtype.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> cam_maps_backward(
    const at::Tensor& dU, const std::vector<at::Tensor>& features, const std::vector<at::Tensor>& heads,
    const std::vector<at::Tensor>& rows, const std::vector<at::Tensor>& rects, int64_t Sh, int64_t Sw, bool relu,
    int64_t norm, double eps, const std::vector<bool>& feature_grad, const std::vector<bool>& head_grad) {
  const int64_t K = static_cast<int64_t>(features.size());
  TORCH_CHECK(dU.dim() == 3 && dU.size(0) == K, "grad: (K, B, P) expected");
  const at::Tensor grad = dU.contiguous();
  std::vector<at::Tensor> d_features, d_heads;
  for (int64_t k = 0; k < K; ++k) {
    const MapInputs in = map_inputs(features[k], heads[k], rows[k]);
    const at::Tensor &A = in.A, &Wt = in.Wt;
    const at::Tensor rect = rects[k].contiguous();
    TORCH_CHECK(grad.scalar_type() == rect.scalar_type(), "grad: accumulation dtype expected");
    at::Tensor dA = feature_grad[k] ? at::empty_like(A) : at::Tensor();
    at::Tensor dW = head_grad[k] ? at::zeros_like(Wt) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "cam_maps_backward", [&] {
      cam_map_backward_impl<scalar_t>(grad.select(0, k), A, Wt, in.rows, rect, Sh, Sw, relu, norm, eps, dA, dW);
    });
    d_features.push_back(dA.defined() ? dA : at::empty({0}, A.options()));
    d_heads.push_back(dW.defined() ? dW : at::empty({0}, Wt.options()));
  }
  return {d_features, d_heads};
}

std::tuple<at::Tensor, Tensors> cam_maps_cpu(at::TensorList features, at::TensorList heads, at::TensorList rows,
                                             c10::SymInt out_h, c10::SymInt out_w, bool relu, int64_t norm,
                                             double eps) {
  return cam_maps_forward(features.vec(), heads.vec(), rows.vec(), out_h.expect_int(), out_w.expect_int(), relu, norm,
                          eps);
}

std::tuple<Tensors, Tensors> cam_maps_backward_cpu(const at::Tensor& grad, at::TensorList features,
                                                   at::TensorList heads, at::TensorList rows, at::TensorList rects,
                                                   c10::SymInt out_h, c10::SymInt out_w, bool relu, int64_t norm,
                                                   double eps, const c10::List<bool>& feature_grad,
                                                   const c10::List<bool>& head_grad) {
  return cam_maps_backward(grad, features.vec(), heads.vec(), rows.vec(), rects.vec(), out_h.expect_int(),
                           out_w.expect_int(), relu, norm, eps, feature_grad.vec(), head_grad.vec());
}

namespace {

// The maps' gradient by cam_maps_backward (which has no derivative of its own: a clear error
// under create_graph, registered in metadd_fast/ops/cam_maps.py).
class CamMapsFunction : public torch::autograd::Function<CamMapsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList features, at::TensorList heads,
                               at::TensorList rows, c10::SymInt out_h, c10::SymInt out_w, bool relu, int64_t norm,
                               double eps) {
    static const auto op = op_handle<CamMapsSig>("metadd_fast::cam_maps");
    save_dispatch_modes(ctx);
    ctx->set_materialize_grads(false);  // only the first output has a gradient: no zeros for the others
    auto [maps, rects] = call_below_autograd(op, features, heads, rows, out_h, out_w, relu, norm, eps);
    save_cam(ctx, features, heads, rows, rects, at::Tensor(), {std::move(out_h), std::move(out_w), relu, norm, eps});
    ctx->mark_non_differentiable(rects);
    variable_list out{maps};
    out.insert(out.end(), rects.begin(), rects.end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<CamMapsBackwardSig>("metadd_fast::cam_maps_backward");
    if (!grads[0].defined()) return variable_list(3 * ctx->saved_data["k"].toInt() + 5);  // the maps were not used
    ForwardModes modes(ctx);
    const SavedCam s = load_cam(ctx);
    const CamOptions& o = s.options;
    auto [d_features, d_heads] = call_backward(op, grads[0].contiguous(), s.features, s.heads, s.rows, s.rects,
                                               o.out_h, o.out_w, o.relu, o.norm, o.eps, s.feature_grad, s.head_grad);
    return cam_input_grads(s, d_features, d_heads);
  }
};

std::tuple<at::Tensor, Tensors> cam_maps_autograd(at::TensorList features, at::TensorList heads, at::TensorList rows,
                                                  c10::SymInt out_h, c10::SymInt out_w, bool relu, int64_t norm,
                                                  double eps) {
  if (!records_graph(features, heads)) {
    static const auto op = op_handle<CamMapsSig>("metadd_fast::cam_maps");
    return call_below_autograd(op, features, heads, rows, std::move(out_h), std::move(out_w), relu, norm, eps);
  }
  variable_list out = CamMapsFunction::apply(features, heads, rows, std::move(out_h), std::move(out_w), relu, norm, eps);
  return {out[0], Tensors(out.begin() + 1, out.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(metadd_fast, CPU, m) {
  m.impl("cam_maps", &cam_maps_cpu);
  m.impl("cam_maps_backward", &cam_maps_backward_cpu);
}

TORCH_LIBRARY_IMPL(metadd_fast, Autograd, m) { m.impl("cam_maps", &cam_maps_autograd); }

}  // namespace metadd
