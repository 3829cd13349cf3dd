// CPU kernel of the nearest-centroid assignment (SPEC section 3).
//
// x (N, D) and c (M, D) float32 or float64 (same dtype), cn (M,) = ||c_j||^2 and
// cmax () = max_j ||c_j||. Rows go in blocks of kRows (at::parallel_for, OpenMP);
// for each block the centroids go in tiles of kCols, whose dot products come from
// one small matrix product into a per-thread (kRows, kCols) buffer: no N x M
// matrix is ever formed. Per row it keeps the best and second-best of
// e_j = ||c_j||^2 - 2 x.c_j (||x||^2 is common to all j), ties to the lower index.
//
// Outputs: index (N,) int64; sqdist (N,) = sum_d (x - c_index)^2 computed directly;
// refine (N,) bool: the gap to the second-best is within the rounding bound of the
// expansion, 4 (D + 2) u (2 ||x|| cmax + cmax^2), so the caller must settle that
// row exactly.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace metadd {
namespace {

constexpr int64_t kRows = 256;
constexpr int64_t kCols = 512;

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
          const acc_t* __restrict__ gr = gp + r * ld;
          acc_t b1 = best[r], b2 = second[r];  // in registers: the stores below cannot alias them
          int64_t a1 = arg[r];
          for (int64_t j = 0; j < cols; ++j) {
            const acc_t e = cn_block[j] - 2 * gr[j];
            if (e < b1) {  // strict: ties keep the lower index
              b2 = b1;
              b1 = e;
              a1 = m0 + j;
            } else if (e < b2) {
              b2 = e;
            }
          }
          best[r] = b1;
          second[r] = b2;
          arg[r] = a1;
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
        rp[r0 + r] = static_cast<double>(second[r]) - static_cast<double>(best[r]) <= bound;
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> nearest_centroid_forward(const at::Tensor& x, const at::Tensor& c, const at::Tensor& cn,
                                                 const at::Tensor& cmax) {
  TORCH_CHECK(x.dim() == 2 && c.dim() == 2 && x.size(1) == c.size(1), "x (N, D) and centroids (M, D) expected");
  TORCH_CHECK(x.is_contiguous() && c.is_contiguous() && cn.is_contiguous(), "contiguous inputs expected");
  TORCH_CHECK(x.scalar_type() == c.scalar_type() && c.scalar_type() == cn.scalar_type(), "one dtype expected");
  at::Tensor index = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  at::Tensor sqdist = at::empty({x.size(0)}, x.options());
  at::Tensor refine = at::empty({x.size(0)}, x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nearest_centroid", [&] {
    nearest_centroid_impl<scalar_t>(x, c, cn, cmax.item<double>(), index, sqdist, refine);
  });
  return {index, sqdist, refine};
}

}  // namespace metadd
