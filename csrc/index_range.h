// The C++ twin of metadd_fast.checks.index_range: the same ValueError and message.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace metadd {

// ValueError naming ``name`` unless every one of the n ids lies in [0, upper).
inline void check_index_range(const char* name, const int64_t* ids, int64_t n, int64_t upper) {
  if (n == 0) return;
  const auto [lo, hi] = std::minmax_element(ids, ids + n);
  TORCH_CHECK_VALUE(*lo >= 0 && *hi < upper, name, ": expected values in [0, ", upper, "), got values in [", *lo,
                    ", ", *hi, "]");
}

}  // namespace metadd
