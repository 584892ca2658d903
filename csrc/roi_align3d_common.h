// Math shared by the CPU and CUDA RoIAlign3D kernels (compiled as host code for the CPU kernels and
// as __host__ __device__ code by nvcc), so the CPU tests cover the exact arithmetic the GPU runs.
//
// Semantics follow torchvision.ops.roi_align frame by frame:
//   box (x1, y1, x2, y2) * spatial_scale, shifted by -0.5 when aligned; when not aligned the box is at
//   least 1x1; bin (ph, pw) averages a grid_h x grid_w grid of bilinear samples, grid = sampling_ratio
//   or ceil(roi_size / pooled_size) when sampling_ratio <= 0; a sample outside [-1, H] x [-1, W]
//   contributes zero, samples in [-1, 0] are clamped to 0, samples beyond H-1 (W-1) to the last row.
// Differences, all for input torchvision does not define:
//   * a NaN coordinate makes a sample invalid (torchvision casts NaN to int and reads out of bounds);
//   * the adaptive grid is capped at kMaxGrid samples per bin side, so an absurdly large box cannot
//     hang a kernel (the Python wrapper rejects such boxes before they get here).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define STSSA_HD __host__ __device__ __forceinline__
#else
#define STSSA_HD inline
#endif

namespace stssa {
namespace roi {

constexpr int kMaxGrid = 1024;

template <typename T>
struct RoiGeometry {
  T start_h, start_w;  // top-left corner, feature-map coordinates
  T bin_h, bin_w;      // bin size
  T step_h, step_w;    // distance between neighbouring samples: bin / grid
  int grid_h, grid_w;  // bilinear samples per bin along each side
  T count;             // max(grid_h * grid_w, 1): the averaging divisor
};

template <typename T>
STSSA_HD int adaptive_grid(T roi_size, int pooled, int sampling_ratio) {
  if (sampling_ratio > 0) return sampling_ratio;
  T g = ceil(roi_size / static_cast<T>(pooled));
  if (!(g > T(0))) return 0;  // zero-size (aligned) box or NaN: no samples
  return g > T(kMaxGrid) ? kMaxGrid : static_cast<int>(g);
}

// box points at (x1, y1, x2, y2).
template <typename T>
STSSA_HD RoiGeometry<T> roi_geometry(const T* box, T spatial_scale, int pooled_h, int pooled_w,
                                     int sampling_ratio, bool aligned) {
  const T offset = aligned ? T(0.5) : T(0);
  const T x1 = box[0] * spatial_scale - offset;
  const T y1 = box[1] * spatial_scale - offset;
  const T x2 = box[2] * spatial_scale - offset;
  const T y2 = box[3] * spatial_scale - offset;
  T roi_w = x2 - x1;
  T roi_h = y2 - y1;
  if (!aligned) {  // legacy torchvision behaviour: force malformed boxes to 1x1
    roi_w = roi_w > T(1) ? roi_w : T(1);
    roi_h = roi_h > T(1) ? roi_h : T(1);
  }
  RoiGeometry<T> g;
  g.start_h = y1;
  g.start_w = x1;
  g.bin_h = roi_h / static_cast<T>(pooled_h);
  g.bin_w = roi_w / static_cast<T>(pooled_w);
  g.grid_h = adaptive_grid(roi_h, pooled_h, sampling_ratio);
  g.grid_w = adaptive_grid(roi_w, pooled_w, sampling_ratio);
  // One division per box instead of one per sample: in double precision a division is a subroutine
  // call whose ABI made ptxas spill in the sample loops (seen in compile_check). Results differ from
  // torchvision's (i + 0.5) * bin / grid by at most an ulp or two.
  g.step_h = g.grid_h > 0 ? g.bin_h / static_cast<T>(g.grid_h) : T(0);
  g.step_w = g.grid_w > 0 ? g.bin_w / static_cast<T>(g.grid_w) : T(0);
  const int n = g.grid_h * g.grid_w;
  g.count = static_cast<T>(n > 1 ? n : 1);
  return g;
}

// Coordinate of sample i (0 <= i < grid) of bin p.
template <typename T>
STSSA_HD T sample_coord(T start, T bin, T step, int p, int i) {
  return start + static_cast<T>(p) * bin + (static_cast<T>(i) + T(0.5)) * step;
}

// One axis of a bilinear sample: the two neighbouring indices and their weights. A sample outside
// [-1, size] gets zero weights (and indices 0), which makes the 2-D weight zero too.
template <typename T>
struct Axis {
  int64_t lo, hi;
  T w_lo, w_hi;
};

template <typename T>
STSSA_HD Axis<T> axis_weights(T c, int64_t size) {
  Axis<T> a;
  if (!(c >= T(-1) && c <= static_cast<T>(size))) {  // also rejects NaN
    a.lo = a.hi = 0;
    a.w_lo = a.w_hi = T(0);
    return a;
  }
  if (c <= T(0)) c = T(0);
  int64_t lo = static_cast<int64_t>(c);
  int64_t hi;
  if (lo >= size - 1) {
    hi = lo = size - 1;
    c = static_cast<T>(lo);
  } else {
    hi = lo + 1;
  }
  const T l = c - static_cast<T>(lo);
  a.lo = lo;
  a.hi = hi;
  a.w_lo = T(1) - l;
  a.w_hi = l;
  return a;
}

// Range [first, last] of sample indices s = p * grid + i along one axis (0 <= s < pooled * grid) that
// may touch pixel row/column `pix`, i.e. whose coordinate can fall in [pix - 1, pix + 1] (extended to
// -1 at the first pixel and to `size` at the last, where clamping maps samples onto the edge).
// A superset is fine: callers recompute the exact weights. Returns false when the range is empty.
template <typename T>
STSSA_HD bool sample_range(T start, T bin, T step, int grid, int pooled, int64_t pix, int64_t size,
                           int* first, int* last) {
  const int n = grid * pooled;
  if (n <= 0) return false;
  const T lo = pix == 0 ? T(-1) : static_cast<T>(pix - 1);
  const T hi = pix == size - 1 ? static_cast<T>(size) : static_cast<T>(pix + 1);
  if (!(step > T(0))) {  // all samples of this axis sit at one coordinate
    const T c = start + T(0.5) * bin;
    if (!(c >= lo - T(1) && c <= hi + T(1))) return false;
    *first = 0;
    *last = n - 1;
    return true;
  }
  T f = (lo - start) / step - T(0.5) - T(1);
  T l = (hi - start) / step - T(0.5) + T(1);
  if (!(l >= T(0)) || !(f <= static_cast<T>(n - 1))) return false;
  f = f < T(0) ? T(0) : floor(f);
  l = l > static_cast<T>(n - 1) ? static_cast<T>(n - 1) : ceil(l);
  *first = static_cast<int>(f);
  *last = static_cast<int>(l);
  return *first <= *last;
}

// Weight with which a sample at coordinate c lands on pixel `pix` along one axis.
template <typename T>
STSSA_HD T weight_on_pixel(T c, int64_t pix, int64_t size) {
  const Axis<T> a = axis_weights(c, size);
  T w = T(0);
  if (a.lo == pix) w += a.w_lo;
  if (a.hi == pix) w += a.w_hi;
  return w;
}

}  // namespace roi
}  // namespace stssa
