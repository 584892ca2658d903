// Host-side helpers shared by the CPU and CUDA kernel files (LibTorch stable ABI): the accumulation type,
// the dtype switch that replaces AT_DISPATCH (not part of the stable ABI), and shapes for error messages.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <sstream>
#include <string>

#include "roi_align3d_common.h"

namespace stssa {

// fp32 accumulation for every 16-bit dtype; float64 stays float64 (the tests' reference precision).
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

// Calls f(scalar_t{}) for the floating dtypes the ops support.
template <typename F>
inline void dispatch_floating(torch::headeronly::ScalarType st, const char* name, F&& f) {
  using torch::headeronly::ScalarType;
  switch (st) {
    case ScalarType::Float: f(float{}); break;
    case ScalarType::Double: f(double{}); break;
    case ScalarType::Half: f(torch::headeronly::Half{}); break;
    case ScalarType::BFloat16: f(torch::headeronly::BFloat16{}); break;
    default: STD_TORCH_CHECK(false, name, ": unsupported dtype ", torch::headeronly::toString(st));
  }
}

inline std::string shape_str(const torch::stable::Tensor& t) {
  std::ostringstream s;
  s << "[";
  for (int64_t d = 0; d < t.dim(); ++d) s << (d ? ", " : "") << t.size(d);
  s << "]";
  return s.str();
}

// The pooling arguments the kernels take as int: output sides in [1, INT_MAX] and sampling_ratio at
// most kMaxGrid per bin side (the grid's sample count, an int, would overflow past 46340).
inline void check_pooling_args(const char* op, int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio) {
  constexpr int64_t kIntMax = 2147483647;
  STD_TORCH_CHECK(pooled_height > 0 && pooled_width > 0 && pooled_height <= kIntMax && pooled_width <= kIntMax,
                  op, ": output_size must be in [1, ", kIntMax, "], got (", pooled_height, ", ", pooled_width, ")");
  STD_TORCH_CHECK(sampling_ratio <= roi::kMaxGrid, op, ": sampling_ratio must be at most ", roi::kMaxGrid,
                  " samples per bin side, got ", sampling_ratio);
}

// A 5-D tensor's strides, by value for kernel arguments.
struct Strides5 {
  int64_t s0, s1, s2, s3, s4;
};

inline Strides5 strides_of(const torch::stable::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// Whether a 5-D tensor is laid out as channels_last_3d (the rule of roi_align3d_common.h).
inline bool channels_last(const torch::stable::Tensor& t) {
  int64_t sizes[5], strides[5];
  for (int d = 0; d < 5; ++d) {
    sizes[d] = t.size(d);
    strides[d] = t.stride(d);
  }
  return roi::is_channels_last_3d(sizes, strides);
}

}  // namespace stssa
