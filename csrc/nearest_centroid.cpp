// CPU kernel of the nearest-centroid assignment (docs/ops.md section 5).
//
// x (N, D) and c (M, D) float32 or float64 (same dtype), cn (M,) = ||c_j||^2 and
// cmax () = max_j ||c_j||. Rows go in blocks of kRows (at::parallel_for, OpenMP);
// for each block the centroids go in tiles of kCols, whose dot products come from
// one small matrix product into a per-thread (kRows, kCols) buffer: no N x M
// matrix is ever formed. Per row it keeps the best and second-best of
// e_j = ||c_j||^2 - 2 x.c_j (||x||^2 is common to all j), ties to the lower index.
//
// Outputs: index (N,) int64; sqdist (N,) = sum_d (x - c_index)^2 computed directly;
// refine (N,) bool: the gap to the second-best is not provably above the rounding bound
// of the expansion, 4 (D + 2) u (2 ||x|| cmax + cmax^2), so the caller must settle that
// row exactly. Ties, NaN, Inf and overflow (huge coordinates) all land there: the gap or
// the bound is then 0, NaN or Inf.
//
// Registered here: the CPU kernel of metadd_fast::nearest_centroid, which settles the flagged
// rows with float64 direct distances (never the expansion), row by row in O(1) memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <torch/library.h>

#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace metadd {
namespace {

constexpr int64_t kRows = 256;
constexpr int64_t kCols = 512;

// The best and second-best e_j = cn_j - 2 g_j of one row over one tile, and the index of
// the best (the lowest on ties), in two vectorized passes of reductions instead of one
// branchy scan: the minimum, then its first index, how often it occurs and the smallest
// value above it. Both passes compute e_j bit for bit alike (2 g_j is exact, so a fused
// multiply-add rounds the same). NaN compares false everywhere, so it is never picked.
template <typename acc_t>
struct Top2 {
  acc_t b1, b2;
  int64_t a1;
};

template <typename acc_t>
Top2<acc_t> tile_top2(const acc_t* __restrict__ g, const acc_t* __restrict__ cn, int64_t cols) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  acc_t b1 = inf;
#pragma omp simd reduction(min : b1)
  for (int64_t j = 0; j < cols; ++j) {
    const acc_t e = cn[j] - 2 * g[j];
    b1 = e < b1 ? e : b1;
  }
  acc_t b2 = inf;
  int32_t a1 = static_cast<int32_t>(cols), ties = 0;  // 32-bit: as wide as a float lane
#pragma omp simd reduction(min : b2, a1) reduction(+ : ties)
  for (int32_t j = 0; j < static_cast<int32_t>(cols); ++j) {
    const acc_t e = cn[j] - 2 * g[j];
    const bool at_min = e == b1;
    a1 = at_min && j < a1 ? j : a1;
    ties += at_min;
    b2 = e > b1 && e < b2 ? e : b2;
  }
  return {b1, ties > 1 ? b1 : b2, a1 == cols ? 0 : a1};
}

template <typename acc_t>
void nearest_centroid_impl(const at::Tensor& x, const at::Tensor& c, const at::Tensor& cn, double cmax,
                           at::Tensor& index, at::Tensor& sqdist, at::Tensor& refine) {
  const int64_t N = x.size(0), M = c.size(0), D = x.size(1);
  const acc_t* xp = x.data_ptr<acc_t>();
  const acc_t* cp = c.data_ptr<acc_t>();
  const acc_t* cnp = cn.data_ptr<acc_t>();
  int64_t* ip = index.data_ptr<int64_t>();
  acc_t* sp = sqdist.data_ptr<acc_t>();
  bool* rp = refine.data_ptr<bool>();
  const double u = std::numeric_limits<acc_t>::epsilon() / 2;
  const double bound_scale = 4.0 * static_cast<double>(D + 2) * u;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, (N + kRows - 1) / kRows, 1, [&](int64_t blk0, int64_t blk1) {
    at::Tensor dots = at::empty({kRows, kCols}, x.options());
    std::vector<acc_t> best(kRows), second(kRows);
    std::vector<int64_t> arg(kRows);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t r0 = blk * kRows, rows = std::min(kRows, N - r0);
      std::fill(best.begin(), best.end(), inf);
      std::fill(second.begin(), second.end(), inf);
      std::fill(arg.begin(), arg.end(), 0);
      const at::Tensor xb = x.narrow(0, r0, rows);
      for (int64_t m0 = 0; m0 < M; m0 += kCols) {
        const int64_t cols = std::min(kCols, M - m0);
        at::Tensor g = dots.narrow(0, 0, rows).narrow(1, 0, cols);
        at::mm_out(g, xb, c.narrow(0, m0, cols).t());
        const acc_t* gp = g.data_ptr<acc_t>();
        const int64_t ld = g.stride(0);
        const acc_t* __restrict__ cn_block = cnp + m0;
        for (int64_t r = 0; r < rows; ++r) {
          const Top2<acc_t> t = tile_top2(gp + r * ld, cn_block, cols);
          if (t.b1 < best[r]) {  // strict: on ties the earlier tile (lower index) stays
            second[r] = std::min(best[r], t.b2);
            best[r] = t.b1;
            arg[r] = m0 + t.a1;
          } else {
            second[r] = std::min(second[r], t.b1);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t* xr = xp + (r0 + r) * D;
        const acc_t* cr = cp + arg[r] * D;
        acc_t sq = 0, xn = 0;
        for (int64_t d = 0; d < D; ++d) {
          const acc_t diff = xr[d] - cr[d];
          sq += diff * diff;
          xn += xr[d] * xr[d];
        }
        const double bound = bound_scale * (2 * std::sqrt(static_cast<double>(xn)) * cmax + cmax * cmax);
        ip[r0 + r] = arg[r];
        sp[r0 + r] = sq;
        const double gap = static_cast<double>(second[r]) - static_cast<double>(best[r]);
        rp[r0 + r] = !(gap > bound) || !std::isfinite(sq);
      }
    }
  });
}

}  // namespace

// Any strides: x, c and cn are read through contiguous copies where they are not contiguous.
std::vector<at::Tensor> nearest_centroid_forward(const at::Tensor& x_in, const at::Tensor& c_in, const at::Tensor& cn_in,
                                                 const at::Tensor& cmax) {
  TORCH_CHECK(x_in.dim() == 2 && c_in.dim() == 2 && x_in.size(1) == c_in.size(1),
              "x (N, D) and centroids (M, D) expected");
  TORCH_CHECK(x_in.scalar_type() == c_in.scalar_type() && c_in.scalar_type() == cn_in.scalar_type(), "one dtype expected");
  const at::Tensor x = x_in.contiguous(), c = c_in.contiguous(), cn = cn_in.contiguous();
  at::Tensor index = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  at::Tensor sqdist = at::empty({x.size(0)}, x.options());
  at::Tensor refine = at::empty({x.size(0)}, x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nearest_centroid", [&] {
    nearest_centroid_impl<scalar_t>(x, c, cn, cmax.item<double>(), index, sqdist, refine);
  });
  return {index, sqdist, refine};
}

namespace {

// Row i's float64 direct-distance answer: argmin_j sum_d (x_id - c_jd)^2 as torch.argmin takes
// it (ties: the lowest j; a NaN distance is the smallest, the first NaN wins), and that distance.
// The sum over d is vectorized (its order is not sequential, like torch's own reductions).
template <typename acc_t>
std::pair<int64_t, double> exact_nearest(const acc_t* x, const acc_t* c, int64_t M, int64_t D) {
  int64_t best_j = 0;
  double best = std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < M; ++j) {
    const acc_t* cj = c + j * D;
    double d2 = 0;
#pragma omp simd reduction(+ : d2)
    for (int64_t d = 0; d < D; ++d) {
      const double diff = static_cast<double>(x[d]) - static_cast<double>(cj[d]);
      d2 += diff * diff;
    }
    if (std::isnan(d2)) return {j, d2};  // the first NaN is argmin's answer
    if (d2 < best) best = d2, best_j = j;
  }
  return {best_j, best};
}

// metadd_fast::nearest_centroid on the CPU: (index (N,) int64, sqdist (N,) in x's dtype),
// computed in the accumulation dtype (float64 if x or the centroids are, else float32).
std::tuple<at::Tensor, at::Tensor> nearest_centroid_cpu(const at::Tensor& x, const at::Tensor& centroids) {
  const at::ScalarType acc =
      x.scalar_type() == at::kDouble || centroids.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xa = x.to(acc).contiguous(), ca = centroids.to(acc).contiguous();
  const at::Tensor cn = (ca * ca).sum(1);
  std::vector<at::Tensor> out = nearest_centroid_forward(xa, ca, cn, cn.max().sqrt());
  at::Tensor index = out[0], sqdist = out[1];
  const at::Tensor rows = out[2].nonzero().flatten();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t M = ca.size(0), D = ca.size(1);
  AT_DISPATCH_FLOATING_TYPES(acc, "nearest_centroid_exact", [&] {
    const scalar_t* xp = xa.data_ptr<scalar_t>();
    const scalar_t* cp = ca.data_ptr<scalar_t>();
    int64_t* ip = index.data_ptr<int64_t>();
    scalar_t* sp = sqdist.data_ptr<scalar_t>();
    at::parallel_for(0, rows.numel(), 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = rp[r];
        const auto [j, d2] = exact_nearest(xp + i * D, cp, M, D);
        ip[i] = j;
        sp[i] = static_cast<scalar_t>(d2);
      }
    });
  });
  return {index, sqdist.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(metadd_fast, CPU, m) { m.impl("nearest_centroid", &nearest_centroid_cpu); }

}  // namespace metadd
