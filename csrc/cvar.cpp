// CPU kernels of the CVaR tail loss (docs/ops.md section 4).
//
//   cvar_group_stats: one pass over values -> float64 group sums and int64 counts.
//   cvar_tail: L (n,) float32/float64, or float64 group sums with their counts (the
//              means of the non-empty groups) -> (CVaR, weights w (n,)): w = dCVaR/dL. The tail is found with an O(n)
//              selection (std::nth_element) of the boundary value, then one pass in
//              index order gives tied entries their ranks (ties: lower index first).
//              NaN ranks above everything, as in torch.sort(descending=True).
//   cvar_values_grad: one pass over values: grad_i = g * w[group_i] / count[group_i].
//   cvar_dual_forward/backward: eta + sum_i max(v_i - eta, 0) / (alpha N) and its gradient.
//
// Registered here: the CPU kernels of metadd_fast::cvar, cvar_backward, cvar_dual and
// cvar_dual_backward, and the autograd of cvar and cvar_dual (their backward is the
// registered backward op, on every device).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <torch/library.h>

#include "autograd_util.h"
#include "index_range.h"
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace metadd {
namespace {

// t as contiguous int64, without a dispatcher call when it is that already (the common case).
at::Tensor as_index(const at::Tensor& t) {
  return t.scalar_type() == at::kLong && t.is_contiguous() ? t : t.to(at::kLong).contiguous();
}

// Descending order with NaN first: a strict weak order for nth_element.
template <typename T>
inline bool ranks_above(T x, T y) {
  if (std::isnan(x)) return !std::isnan(y);
  return !std::isnan(y) && x > y;
}

template <typename T>
inline bool same_rank_value(T x, T y) {
  return (std::isnan(x) && std::isnan(y)) || x == y;
}

// a = alpha * n, snapped to an integer within 1e-9, and at least 1 (below 1 the tail is the
// largest entry alone); f = floor(a).
inline void tail_size(double alpha, int64_t n, double& a, double& f) {
  a = alpha * static_cast<double>(n);
  const double r = std::round(a);
  if (std::abs(a - r) < 1e-9) a = r;
  a = std::max(a, 1.0);
  f = std::floor(a);
}

// L: the n_all values, or (with counts) the group sums whose means are L_j = sums_j / counts_j
// over the non-empty groups.
template <typename acc_t>
void cvar_tail_impl(const at::Tensor& L, const at::Tensor& counts, double alpha, at::Tensor& loss, at::Tensor& w) {
  const int64_t n_all = L.numel();
  std::vector<acc_t> means;
  const acc_t* l = L.data_ptr<acc_t>();
  std::vector<char> ok_buf;
  const char* ok = nullptr;
  if (counts.defined()) {
    const int64_t* c = counts.data_ptr<int64_t>();
    means.resize(n_all);
    ok_buf.resize(n_all);
    for (int64_t j = 0; j < n_all; ++j) {
      ok_buf[j] = c[j] > 0;
      means[j] = c[j] > 0 ? l[j] / static_cast<acc_t>(c[j]) : acc_t(0);
    }
    l = means.data();
    ok = ok_buf.data();
  }
  acc_t* wp = w.data_ptr<acc_t>();
  std::vector<acc_t> buf;  // the valid entries, for the selection
  buf.reserve(n_all);
  for (int64_t j = 0; j < n_all; ++j) {
    if (!ok || ok[j]) buf.push_back(l[j]);
  }
  const int64_t n = static_cast<int64_t>(buf.size());
  double a, f;
  tail_size(alpha, n, a, f);
  const int64_t fi = static_cast<int64_t>(f);
  std::fill(wp, wp + n_all, acc_t(0));
  double total = 0;
  if (fi >= n) {  // alpha = 1: the plain mean
    for (int64_t j = 0; j < n_all; ++j) {
      if (ok && !ok[j]) continue;
      wp[j] = static_cast<acc_t>(1.0 / a);
      total += static_cast<double>(l[j]);
    }
    loss.fill_(total / a);
    return;
  }
  // Boundary value t = L_(f+1), the (f+1)-th in the descending order.
  std::nth_element(buf.begin(), buf.begin() + fi, buf.end(), ranks_above<acc_t>);
  const acc_t t = buf[fi];
  int64_t rank = 0;  // entries ranked strictly above t come first
  for (int64_t j = 0; j < n_all; ++j) rank += (!ok || ok[j]) && ranks_above(l[j], t);
  const double w_tail = 1.0 / a, w_edge = (a - f) / a;
  for (int64_t j = 0; j < n_all; ++j) {
    if (ok && !ok[j]) continue;
    double wj = 0;
    if (ranks_above(l[j], t)) {
      wj = w_tail;
    } else if (same_rank_value(l[j], t)) {
      ++rank;  // 1-based rank of this tied entry: ties go by lower index
      wj = rank <= fi ? w_tail : (rank == fi + 1 ? w_edge : 0.0);
    }
    if (wj != 0) {
      wp[j] = static_cast<acc_t>(wj);
      total += wj * static_cast<double>(l[j]);
    }
  }
  loss.fill_(total);
}

}  // namespace

// Any strides or integer dtype of values and groups: read through contiguous (int64) copies
// where they are not in that form already.
std::vector<at::Tensor> cvar_group_stats(const at::Tensor& values_in, const at::Tensor& groups_in, int64_t num_groups) {
  TORCH_CHECK(!groups_in.is_floating_point() && groups_in.numel() == values_in.numel(),
              "cvar_group_stats: integer groups like values expected");
  const at::Tensor values = values_in.contiguous();
  const at::Tensor groups = as_index(groups_in);
  at::Tensor sums = at::zeros({num_groups}, values.options().dtype(at::kDouble));
  at::Tensor counts = at::zeros({num_groups}, values.options().dtype(at::kLong));
  const int64_t N = values.numel();
  const int64_t* g = groups.data_ptr<int64_t>();
  double* s = sums.data_ptr<double>();
  int64_t* c = counts.data_ptr<int64_t>();
  // One slice of the values per thread, each into its own partial sums, then the
  // partials are added in slice order: deterministic for a given thread count.
  // Out-of-range ids are counted, not followed, and reported after the pass.
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 8192));
  std::vector<double> part_s(slices * num_groups, 0.0);
  std::vector<int64_t> part_c(slices * num_groups, 0);
  std::vector<int64_t> bad(slices, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "cvar_group_stats", [&] {
    const scalar_t* v = values.data_ptr<scalar_t>();
    at::parallel_for(0, slices, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        // Locals and restrict: the int64 count stores could otherwise alias the captured
        // bounds, which would be reloaded (and divided) on every element.
        double* __restrict__ ps = part_s.data() + k * num_groups;
        int64_t* __restrict__ pc = part_c.data() + k * num_groups;
        const int64_t* __restrict__ gk = g;
        const scalar_t* __restrict__ vk = v;
        const uint64_t n_groups = static_cast<uint64_t>(num_groups);
        const int64_t i0 = N * k / slices, i1 = N * (k + 1) / slices;
        int64_t n_bad = 0;
        for (int64_t i = i0; i < i1; ++i) {
          const uint64_t j = static_cast<uint64_t>(gk[i]);
          if (j >= n_groups) {
            ++n_bad;
            continue;
          }
          ps[j] += static_cast<double>(vk[i]);
          pc[j] += 1;
        }
        bad[k] = n_bad;
      }
    });
  });
  if (std::any_of(bad.begin(), bad.end(), [](int64_t b) { return b != 0; })) {
    check_index_range("groups", g, N, num_groups);  // raises: some id is out of range
  }
  for (int64_t k = 0; k < slices; ++k) {
    for (int64_t j = 0; j < num_groups; ++j) {
      s[j] += part_s[k * num_groups + j];
      c[j] += part_c[k * num_groups + j];
    }
  }
  return {sums, counts};
}

// (CVaR, w) in L's dtype; with counts, L holds group sums and w is per group.
std::vector<at::Tensor> cvar_tail(const at::Tensor& L_in, const std::optional<at::Tensor>& counts, double alpha) {
  TORCH_CHECK(L_in.dim() == 1 && L_in.numel() > 0, "cvar_tail: non-empty (n,) expected");
  const at::Tensor L = L_in.contiguous();
  at::Tensor counts_t = counts.has_value() ? as_index(*counts) : at::Tensor();
  at::Tensor loss = at::empty({}, L.options());
  at::Tensor w = at::empty_like(L);
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "cvar_tail", [&] { cvar_tail_impl<scalar_t>(L, counts_t, alpha, loss, w); });
  return {loss, w};
}

at::Tensor cvar_values_grad(const at::Tensor& grad, const at::Tensor& w_in, const std::optional<at::Tensor>& counts_in,
                            const std::optional<at::Tensor>& groups_in, const at::Tensor& like) {
  at::Tensor out = at::empty(like.sizes(), like.options());  // contiguous whatever like's strides
  const at::Tensor w = w_in.contiguous();
  const auto as_long = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? std::optional<at::Tensor>(as_index(*t)) : std::nullopt;
  };
  const std::optional<at::Tensor> counts = as_long(counts_in), groups = as_long(groups_in);
  const int64_t N = like.numel();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "cvar_values_grad", [&] {
    using acc_t = scalar_t;
    const acc_t g = grad.item<acc_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    std::vector<acc_t> scale;  // with groups: g * w_j / |group j|, once per group
    if (groups.has_value()) {
      const int64_t* cp = counts->data_ptr<int64_t>();
      scale.resize(w.numel());
      for (int64_t j = 0; j < w.numel(); ++j) scale[j] = cp[j] > 0 ? g * wp[j] / static_cast<acc_t>(cp[j]) : acc_t(0);
    }
    const int64_t* gp = groups.has_value() ? groups->data_ptr<int64_t>() : nullptr;
    const acc_t* sp = scale.data();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "cvar_values_grad_out", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, N, 32768, [&](int64_t i0, int64_t i1) {
        if (gp) {
          for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<scalar_t>(sp[gp[i]]);
        } else {
          for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<scalar_t>(g * wp[i]);
        }
      });
    });
  });
  return out;
}

// (loss, count of values above eta), both in the accumulation dtype. "Above" is
// !(v - eta <= 0): NaN differences count, as autograd through relu(values - eta) has it.
std::vector<at::Tensor> cvar_dual_forward(const at::Tensor& values_in, const at::Tensor& eta, double alpha) {
  const at::Tensor values = values_in.contiguous();
  const auto acc = at::toOpMathType(values.scalar_type());
  at::Tensor loss = at::empty({}, values.options().dtype(acc));
  at::Tensor above = at::empty({}, values.options().dtype(acc));
  const int64_t N = values.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "cvar_dual_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* v = values.data_ptr<scalar_t>();
    const acc_t e = eta.item<acc_t>();
    // Per-chunk partial sums in double, combined in chunk order.
    const int64_t chunk = 1 << 16, n_chunks = (N + chunk - 1) / chunk;
    std::vector<double> part(n_chunks), cnt(n_chunks);
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double s = 0, k = 0;
        for (int64_t i = c * chunk; i < std::min(N, (c + 1) * chunk); ++i) {
          const acc_t d = static_cast<acc_t>(v[i]) - e;
          const bool above = !(d <= 0);  // NaN counts, as relu's gradient lets it through
          if (above) s += static_cast<double>(d);
          k += above;
        }
        part[c] = s;
        cnt[c] = k;
      }
    });
    double s = 0, k = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      s += part[c];
      k += cnt[c];
    }
    loss.fill_(static_cast<double>(e) + s / (alpha * static_cast<double>(N)));
    above.fill_(k);
  });
  return {loss, above};
}

// (d values, d eta) of cvar_dual_forward for an upstream gradient grad (0-d).
std::vector<at::Tensor> cvar_dual_backward(const at::Tensor& grad, const at::Tensor& values_in, const at::Tensor& eta,
                                           double alpha, const at::Tensor& above) {
  const at::Tensor values = values_in.contiguous();
  at::Tensor gv = at::empty_like(values);
  const int64_t N = values.numel();
  const double scale = 1.0 / (alpha * static_cast<double>(N));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "cvar_dual_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* v = values.data_ptr<scalar_t>();
    scalar_t* o = gv.data_ptr<scalar_t>();
    const acc_t e = eta.item<acc_t>();
    const acc_t g = static_cast<acc_t>(grad.item<double>() * scale);
    at::parallel_for(0, N, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<scalar_t>(!(static_cast<acc_t>(v[i]) - e <= 0) ? g : acc_t(0));
    });
  });
  at::Tensor geta = grad.to(at::kDouble) * (1.0 - above.to(at::kDouble) * scale);
  return {gv, geta.to(eta.scalar_type())};
}

namespace {

at::ScalarType acc_dtype(const at::Tensor& values) {
  return values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// metadd_fast::cvar on the CPU: (CVaR, w, counts); w per value (accumulation dtype) without
// groups, per group (float64) with them, and counts the group sizes (empty without groups).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cvar_cpu(const at::Tensor& values, const MaybeTensor& groups,
                                                        c10::SymInt num_groups_sym, double alpha) {
  const at::ScalarType acc = acc_dtype(values);
  if (!groups.has_value()) {
    std::vector<at::Tensor> tail = cvar_tail(values.to(acc), std::nullopt, alpha);
    return {tail[0], tail[1], at::empty({0}, values.options().dtype(at::kLong))};
  }
  const int64_t num_groups = num_groups_sym.expect_int();
  at::Tensor sums, counts;
  if (values.numel() > 0) {
    std::vector<at::Tensor> stats = cvar_group_stats(values, *groups, num_groups);
    sums = stats[0];
    counts = stats[1];
  } else {  // a rank with no values in a distributed CVaR
    sums = at::zeros({num_groups}, values.options().dtype(at::kDouble));
    counts = at::zeros({num_groups}, values.options().dtype(at::kLong));
  }
  std::vector<at::Tensor> tail = cvar_tail(sums, counts, alpha);  // over the non-empty groups' means, float64
  return {tail[0].to(acc), tail[1], counts};
}

at::Tensor cvar_backward_cpu(const at::Tensor& grad, const at::Tensor& weights, const at::Tensor& counts,
                             const MaybeTensor& groups, const at::Tensor& values) {
  return cvar_values_grad(grad, weights, groups.has_value() ? MaybeTensor(counts) : std::nullopt, groups, values);
}

std::tuple<at::Tensor, at::Tensor> cvar_dual_cpu(const at::Tensor& values, const at::Tensor& eta, double alpha) {
  std::vector<at::Tensor> out = cvar_dual_forward(values, eta, alpha);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> cvar_dual_backward_cpu(const at::Tensor& grad, const at::Tensor& values,
                                                          const at::Tensor& eta, double alpha, const at::Tensor& above) {
  std::vector<at::Tensor> out = cvar_dual_backward(grad, values, eta, alpha, above);
  return {out[0], out[1]};
}

// The CVaR's gradient (docs/ops.md section 4): d values_i = g * w[g_i] / |g_i| by cvar_backward.
class CVaRFunction : public torch::autograd::Function<CVaRFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& values, const MaybeTensor& groups,
                               c10::SymInt num_groups, double alpha) {
    static const auto op = op_handle<CVaRSig>("metadd_fast::cvar");
    save_dispatch_modes(ctx);
    ctx->set_materialize_grads(false);  // only the first output has a gradient: no zeros for the others
    auto [loss, w, counts] = call_below_autograd(op, values, groups, std::move(num_groups), alpha);
    ctx->save_for_backward({values, groups.value_or(at::Tensor()), w, counts});
    ctx->saved_data["grouped"] = groups.has_value();
    ctx->mark_non_differentiable({w, counts});
    return {loss, w, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<CVaRBackwardSig>("metadd_fast::cvar_backward");
    if (!grads[0].defined()) return variable_list(4);  // the CVaR was not used
    ForwardModes modes(ctx);
    const variable_list saved = ctx->get_saved_variables();
    const MaybeTensor groups = ctx->saved_data["grouped"].toBool() ? MaybeTensor(saved[1]) : std::nullopt;
    at::Tensor d_values = call_backward(op, grads[0].contiguous(), saved[2], saved[3], groups, saved[0]);
    return {d_values, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> cvar_autograd(const at::Tensor& values, const MaybeTensor& groups,
                                                             c10::SymInt num_groups, double alpha) {
  if (!records_graph(values)) {
    static const auto op = op_handle<CVaRSig>("metadd_fast::cvar");
    return call_below_autograd(op, values, groups, std::move(num_groups), alpha);
  }
  variable_list out = CVaRFunction::apply(values, groups, std::move(num_groups), alpha);
  return {out[0], out[1], out[2]};
}

// cvar_dual's gradient in values and eta by cvar_dual_backward.
class CVaRDualFunction : public torch::autograd::Function<CVaRDualFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& values, const at::Tensor& eta, double alpha) {
    static const auto op = op_handle<CVaRDualSig>("metadd_fast::cvar_dual");
    save_dispatch_modes(ctx);
    ctx->set_materialize_grads(false);  // only the first output has a gradient: no zeros for the others
    auto [loss, above] = call_below_autograd(op, values, eta, alpha);
    ctx->save_for_backward({values, eta, above});
    ctx->saved_data["alpha"] = alpha;
    ctx->mark_non_differentiable({above});
    return {loss, above};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<CVaRDualBackwardSig>("metadd_fast::cvar_dual_backward");
    if (!grads[0].defined()) return variable_list(3);  // the loss was not used
    ForwardModes modes(ctx);
    const variable_list saved = ctx->get_saved_variables();
    auto [d_values, d_eta] =
        call_backward(op, grads[0].contiguous(), saved[0], saved[1], ctx->saved_data["alpha"].toDouble(), saved[2]);
    return {d_values, d_eta, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> cvar_dual_autograd(const at::Tensor& values, const at::Tensor& eta, double alpha) {
  if (!records_graph(values, eta)) {
    static const auto op = op_handle<CVaRDualSig>("metadd_fast::cvar_dual");
    return call_below_autograd(op, values, eta, alpha);
  }
  variable_list out = CVaRDualFunction::apply(values, eta, alpha);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(metadd_fast, CPU, m) {
  m.impl("cvar", &cvar_cpu);
  m.impl("cvar_backward", &cvar_backward_cpu);
  m.impl("cvar_dual", &cvar_dual_cpu);
  m.impl("cvar_dual_backward", &cvar_dual_backward_cpu);
}

TORCH_LIBRARY_IMPL(metadd_fast, Autograd, m) {
  m.impl("cvar", &cvar_autograd);
  m.impl("cvar_dual", &cvar_dual_autograd);
}

}  // namespace metadd
