// CPU kernels of the cross-architecture variance (docs/ops.md section 2).
//
// U (K, B, P) in float32 or float64: v[b] = (1/P) sum_p (1/K) sum_k (U[k,b,p] - m[b,p])^2,
// m the mean over k. Two passes over k per pixel (mean, then squared deviations).
//
// Registered here: the CPU kernels of metadd_fast::map_variance and map_variance_backward,
// and the autograd of map_variance.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <torch/library.h>

#include "autograd_util.h"
#include "cam_common.h"
#include "ops.h"

namespace metadd {
namespace {

template <typename acc_t>
void map_variance_forward_impl(const at::Tensor& U, at::Tensor& v) {
  const int64_t K = U.size(0), B = U.size(1), P = U.size(2);
  const acc_t* u = U.data_ptr<acc_t>();
  acc_t* out = v.data_ptr<acc_t>();
  at::parallel_for(0, B, grain_for(K * P), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t total = 0;
      for (int64_t p = 0; p < P; ++p) {
        acc_t m = 0, s = 0;
        for (int64_t k = 0; k < K; ++k) m += u[(k * B + b) * P + p];
        m /= static_cast<acc_t>(K);
        for (int64_t k = 0; k < K; ++k) {
          const acc_t d = u[(k * B + b) * P + p] - m;
          s += d * d;
        }
        total += s;
      }
      out[b] = total / static_cast<acc_t>(K * P);
    }
  });
}

template <typename acc_t>
void map_variance_backward_impl(const at::Tensor& gv, const at::Tensor& U, at::Tensor& gU) {
  const int64_t K = U.size(0), B = U.size(1), P = U.size(2);
  const acc_t* u = U.data_ptr<acc_t>();
  const acc_t* g = gv.data_ptr<acc_t>();
  acc_t* gu = gU.data_ptr<acc_t>();
  at::parallel_for(0, B, grain_for(K * P), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t coef = g[b] * acc_t(2) / static_cast<acc_t>(K * P);
      for (int64_t p = 0; p < P; ++p) {
        acc_t m = 0;
        for (int64_t k = 0; k < K; ++k) m += u[(k * B + b) * P + p];
        m /= static_cast<acc_t>(K);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = (k * B + b) * P + p;
          gu[i] = coef * (u[i] - m);
        }
      }
    }
  });
}

// The maps as the kernels read them: contiguous (a copy only for other strides).
at::Tensor checked_maps(const at::Tensor& maps) {
  TORCH_CHECK(maps.device().is_cpu() && maps.dim() == 3, "maps: (K, B, P) CPU tensor expected");
  TORCH_CHECK(maps.scalar_type() == at::kFloat || maps.scalar_type() == at::kDouble, "maps: float32 or float64 expected");
  return maps.contiguous();
}

}  // namespace

at::Tensor map_variance_forward(const at::Tensor& maps) {
  const at::Tensor U = checked_maps(maps);
  at::Tensor v = at::empty({U.size(1)}, U.options());
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "map_variance_forward", [&] { map_variance_forward_impl<scalar_t>(U, v); });
  return v;
}

at::Tensor map_variance_backward(const at::Tensor& grad_v, const at::Tensor& maps) {
  const at::Tensor U = checked_maps(maps);
  TORCH_CHECK(grad_v.scalar_type() == U.scalar_type() && grad_v.numel() == U.size(1),
              "grad: (B,) in the maps' dtype expected");
  const at::Tensor grad = grad_v.contiguous();
  at::Tensor gU = at::empty_like(U);
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "map_variance_backward", [&] { map_variance_backward_impl<scalar_t>(grad, U, gU); });
  return gU;
}

namespace {

// dU = g_b * 2/(K P) (U - mean_k U) by map_variance_backward, whose own derivative is
// registered too (metadd_fast/ops/map_variance.py): differentiable to any order.
class MapVarianceFunction : public torch::autograd::Function<MapVarianceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& maps) {
    static const auto op = op_handle<MapVarianceSig>("metadd_fast::map_variance");
    save_dispatch_modes(ctx);
    at::Tensor v = call_below_autograd(op, maps);
    ctx->save_for_backward({maps});
    return {v};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<MapVarianceBackwardSig>("metadd_fast::map_variance_backward");
    ForwardModes modes(ctx);
    return {call_backward(op, grads[0].contiguous(), ctx->get_saved_variables()[0])};
  }
};

at::Tensor map_variance_autograd(const at::Tensor& maps) {
  if (!records_graph(maps)) {
    static const auto op = op_handle<MapVarianceSig>("metadd_fast::map_variance");
    return call_below_autograd(op, maps);
  }
  return MapVarianceFunction::apply(maps)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(metadd_fast, CPU, m) {
  m.impl("map_variance", &map_variance_forward);
  m.impl("map_variance_backward", &map_variance_backward);
}

TORCH_LIBRARY_IMPL(metadd_fast, Autograd, m) { m.impl("map_variance", &map_variance_autograd); }

}  // namespace metadd
