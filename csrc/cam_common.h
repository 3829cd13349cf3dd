// Per-map helpers shared by the CAM forward and backward CPU kernels.
//
// One "map" is the H x W class activation map of one image under one
// architecture, stored row-major as Q = H * W values of the accumulation type.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace metadd {

constexpr int64_t kNormNone = 0;
constexpr int64_t kNormMax = 1;
constexpr int64_t kNormMinMax = 2;

// Two taps of a 1-D bilinear resize (align_corners=False, antialias=False),
// computed exactly as ATen's upsample_bilinear2d does on the CPU.
// Items per at::parallel_for task so that each task does at least kGrainWork
// multiply-adds: small batches stay on one thread (an OpenMP fork-join costs more
// than they do).
constexpr int64_t kGrainWork = 32768;
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work_per_item));
}

template <typename acc_t>
struct Tap {
  int64_t i0, i1;
  acc_t l0, l1;
};

template <typename acc_t>
std::vector<Tap<acc_t>> bilinear_taps(int64_t in, int64_t out) {
  std::vector<Tap<acc_t>> taps(out);
  const acc_t scale = static_cast<acc_t>(in) / static_cast<acc_t>(out);
  for (int64_t o = 0; o < out; ++o) {
    acc_t src = scale * (static_cast<acc_t>(o) + acc_t(0.5)) - acc_t(0.5);
    if (src < 0) src = 0;
    const int64_t i0 = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
    const acc_t l1 = std::min(std::max(src - static_cast<acc_t>(i0), acc_t(0)), acc_t(1));
    taps[o] = {i0, i0 + (i0 < in - 1 ? 1 : 0), acc_t(1) - l1, l1};
  }
  return taps;
}

// Statistics of one rectified map r: n = (r - lo) / denom.
// "max" is lo = 0 with no gradient to lo; "none" is lo = 0, denom = 1.
template <typename acc_t>
struct MapStats {
  acc_t lo = 0, hi = 0, denom = 1;
  int64_t n_lo = 0, n_hi = 0;
};

template <typename acc_t>
MapStats<acc_t> map_stats(const acc_t* r, int64_t Q, int64_t norm, acc_t eps) {
  MapStats<acc_t> s;
  if (norm == kNormNone) return s;
  acc_t lo = r[0], hi = r[0];
  bool nan = false;
  for (int64_t q = 0; q < Q; ++q) {
    nan = nan || std::isnan(r[q]);
    lo = std::min(lo, r[q]);
    hi = std::max(hi, r[q]);
  }
  if (nan) lo = hi = std::numeric_limits<acc_t>::quiet_NaN();  // amin/amax propagate NaN
  for (int64_t q = 0; q < Q; ++q) {
    s.n_lo += r[q] == lo;
    s.n_hi += r[q] == hi;
  }
  s.hi = hi;
  if (norm == kNormMinMax) {
    s.lo = lo;
    s.denom = hi - lo + eps;
  } else {
    s.denom = hi + eps;
  }
  return s;
}

// u = bilinear resize of the H x W map n to Sh x Sw.
template <typename acc_t>
void resize_map(const acc_t* n, int64_t W, const std::vector<Tap<acc_t>>& th,
                const std::vector<Tap<acc_t>>& tw, acc_t* u) {
  const int64_t Sw = static_cast<int64_t>(tw.size());
  for (size_t oh = 0; oh < th.size(); ++oh) {
    const acc_t* row0 = n + th[oh].i0 * W;
    const acc_t* row1 = n + th[oh].i1 * W;
    for (int64_t ow = 0; ow < Sw; ++ow) {
      const Tap<acc_t>& t = tw[ow];
      u[oh * Sw + ow] = th[oh].l0 * (t.l0 * row0[t.i0] + t.l1 * row0[t.i1]) +
                        th[oh].l1 * (t.l0 * row1[t.i0] + t.l1 * row1[t.i1]);
    }
  }
}

// gn += adjoint of resize_map applied to gu (a serial scatter: deterministic).
template <typename acc_t>
void resize_map_adjoint(const acc_t* gu, int64_t W, const std::vector<Tap<acc_t>>& th,
                        const std::vector<Tap<acc_t>>& tw, acc_t* gn) {
  const int64_t Sw = static_cast<int64_t>(tw.size());
  for (size_t oh = 0; oh < th.size(); ++oh) {
    acc_t* row0 = gn + th[oh].i0 * W;
    acc_t* row1 = gn + th[oh].i1 * W;
    for (int64_t ow = 0; ow < Sw; ++ow) {
      const Tap<acc_t>& t = tw[ow];
      const acc_t g = gu[oh * Sw + ow];
      row0[t.i0] += th[oh].l0 * t.l0 * g;
      row0[t.i1] += th[oh].l0 * t.l1 * g;
      row1[t.i0] += th[oh].l1 * t.l0 * g;
      row1[t.i1] += th[oh].l1 * t.l1 * g;
    }
  }
}

// In place: gn (gradient wrt the normalized map) -> gradient wrt the raw map z.
// Gradients through min/max are split evenly among tied pixels (torch.amin/amax).
template <typename acc_t>
void normalize_relu_backward(acc_t* g, const acc_t* r, int64_t Q, int64_t norm, bool relu,
                             const MapStats<acc_t>& s) {
  if (norm != kNormNone) {
    acc_t g_lo = 0, g_hi = 0;
    for (int64_t q = 0; q < Q; ++q) {
      const acc_t n = (r[q] - s.lo) / s.denom;
      g_lo += g[q] * (n - 1);
      g_hi -= g[q] * n;
    }
    g_lo /= s.denom;
    g_hi /= s.denom;
    for (int64_t q = 0; q < Q; ++q) {
      acc_t v = g[q] / s.denom;
      if (norm == kNormMinMax && r[q] == s.lo) v += g_lo / static_cast<acc_t>(s.n_lo);
      if (r[q] == s.hi) v += g_hi / static_cast<acc_t>(s.n_hi);
      g[q] = v;
    }
  }
  if (relu) {
    for (int64_t q = 0; q < Q; ++q) g[q] = r[q] > 0 ? g[q] : acc_t(0);
  }
}

}  // namespace metadd
