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
  // bin / grid: the sample spacing, for the index ranges of sample_range / axis_pixel_span (supersets,
  // so its rounding does not matter); the sample coordinates themselves come from sample_coord.
  g.step_h = g.grid_h > 0 ? g.bin_h / static_cast<T>(g.grid_h) : T(0);
  g.step_w = g.grid_w > 0 ? g.bin_w / static_cast<T>(g.grid_w) : T(0);
  const int n = g.grid_h * g.grid_w;
  g.count = static_cast<T>(n > 1 ? n : 1);
  return g;
}

// Coordinate of sample i (0 <= i < grid) of bin p, in torchvision's order of operations,
// start + p * bin + (i + 0.5) * bin / grid: a sample torchvision puts exactly on -1 or on the map's
// edge (in range) must land there here too. With a precomputed bin / grid it could land an ulp
// outside and be dropped (seen: a 1/16-scale aligned box, sampling_ratio 3, bin value 5.33 vs 10.67).
template <typename T>
STSSA_HD T sample_coord(T start, T bin, int grid, int p, int i) {
  return start + static_cast<T>(p) * bin + (static_cast<T>(i) + T(0.5)) * bin / static_cast<T>(grid);
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

// Pixel rows (or columns) [*lo, *hi] that the samples of one axis can touch: a superset (callers
// recompute exact weights). Returns false when no sample of this axis can land on the map.
template <typename T>
STSSA_HD bool axis_pixel_span(T start, T bin, T step, int grid, int pooled, int64_t size, int64_t* lo,
                              int64_t* hi) {
  if (grid <= 0 || pooled <= 0 || size <= 0) return false;
  const T a = sample_coord(start, bin, grid, 0, 0);
  const T b = sample_coord(start, bin, grid, pooled - 1, grid - 1);
  const T cmin = a < b ? a : b, cmax = a < b ? b : a;
  if (!(cmax >= T(-1)) || !(cmin <= static_cast<T>(size))) return false;  // also NaN
  const T flo = floor(cmin) - T(1), fhi = floor(cmax) + T(2);
  *lo = flo <= T(0) ? 0 : static_cast<int64_t>(flo);
  *hi = fhi >= static_cast<T>(size - 1) ? size - 1 : static_cast<int64_t>(fhi);
  return *lo <= *hi;
}

// --- deterministic (gather) backward: boxes bucketed by batch index and pixel tile ----------------
// grad_input pixel (n, c, t, y, x) needs only the boxes of batch n whose samples can reach (y, x).
// Bucket (n, tb, tile) lists, in roi order, the boxes of batch n that can touch the tile's pixels on box
// frame tb (tb = t for per-frame boxes, else 0); a gather thread reads only its bucket, so the work
// is about that of the atomic scatter instead of O(K) per input element. Fixed order -> deterministic.

struct TileGrid {
  int64_t tile;        // tile side in pixels
  int64_t ty, tx;      // tiles per column / row
};

STSSA_HD TileGrid tile_grid(int64_t H, int64_t W, int64_t tile) {
  return TileGrid{tile, (H + tile - 1) / tile, (W + tile - 1) / tile};
}

// Writes into list (capacity K) the boxes of bucket (n, tb, tile index), returns how many.
// rois: [K, n_tb, 5] rows (batch, x1, y1, x2, y2) with n_tb = T for per-frame boxes, else 1.
template <typename T>
STSSA_HD int fill_bucket(const T* rois, int64_t K, int64_t n_tb, int64_t n, int64_t tb, int64_t tile_idx,
                         const TileGrid& tg, int64_t N, int64_t H, int64_t W, T spatial_scale, int ph_n,
                         int pw_n, int sampling_ratio, bool aligned, int32_t* list) {
  const int64_t ty0 = (tile_idx / tg.tx) * tg.tile, tx0 = (tile_idx % tg.tx) * tg.tile;
  const int64_t ty1 = ty0 + tg.tile - 1, tx1 = tx0 + tg.tile - 1;
  int cnt = 0;
  for (int64_t k = 0; k < K; ++k) {
    const T* roi = rois + (k * n_tb + tb) * 5;
    if (!(roi[0] >= T(0) && roi[0] < static_cast<T>(N)) || static_cast<int64_t>(roi[0]) != n) continue;
    const auto g = roi_geometry<T>(roi + 1, spatial_scale, ph_n, pw_n, sampling_ratio, aligned);
    int64_t y0, y1, x0, x1;
    if (!axis_pixel_span(g.start_h, g.bin_h, g.step_h, g.grid_h, ph_n, H, &y0, &y1)) continue;
    if (!axis_pixel_span(g.start_w, g.bin_w, g.step_w, g.grid_w, pw_n, W, &x0, &x1)) continue;
    if (y1 < ty0 || y0 > ty1 || x1 < tx0 || x0 > tx1) continue;
    list[cnt++] = static_cast<int32_t>(k);
  }
  return cnt;
}

// d(loss)/d input[n, c, t, y, x] from the boxes in `list` (grad read as G, element (k, c, t, ph, pw) at
// grad[k * gK + c * gC + t * gT + ph * gH + pw * gW]); accumulated in T.
template <typename T, typename G>
STSSA_HD T gather_pixel(const T* rois, int64_t n_tb, bool per_frame, const int32_t* list, int cnt,
                        const G* grad, int64_t gK, int64_t gC, int64_t gT, int64_t gH, int64_t gW, int64_t c,
                        int64_t t, int64_t y, int64_t x, int64_t H, int64_t W, T spatial_scale, int ph_n,
                        int pw_n, int sampling_ratio, bool aligned) {
  T sum = T(0);
  for (int j = 0; j < cnt; ++j) {
    const int64_t k = list[j];
    const T* roi = rois + (k * n_tb + (per_frame ? t : 0)) * 5;
    const auto g = roi_geometry<T>(roi + 1, spatial_scale, ph_n, pw_n, sampling_ratio, aligned);
    int y0, y1, x0, x1;
    if (!sample_range(g.start_h, g.bin_h, g.step_h, g.grid_h, ph_n, y, H, &y0, &y1)) continue;
    if (!sample_range(g.start_w, g.bin_w, g.step_w, g.grid_w, pw_n, x, W, &x0, &x1)) continue;
    const G* go = grad + k * gK + c * gC + t * gT;
    T acc = T(0);
    for (int sy = y0; sy <= y1; ++sy) {
      const int ph = sy / g.grid_h;
      const T wy = weight_on_pixel(sample_coord(g.start_h, g.bin_h, g.grid_h, ph, sy - ph * g.grid_h), y, H);
      if (wy == T(0)) continue;
      for (int sx = x0; sx <= x1; ++sx) {
        const int pw = sx / g.grid_w;
        const T wx = weight_on_pixel(sample_coord(g.start_w, g.bin_w, g.grid_w, pw, sx - pw * g.grid_w), x, W);
        if (wx == T(0)) continue;
        acc += wy * wx * static_cast<T>(go[ph * gH + pw * gW]);
      }
    }
    sum += acc / g.count;
  }
  return sum;
}

// Channels-last (channels_last_3d) test on sizes/strides of a 5-D tensor, the rule of
// torch.Tensor.is_contiguous(memory_format=torch.channels_last_3d) and not .is_contiguous():
// dimensions of size 1 are ignored; an empty tensor counts as contiguous.
STSSA_HD bool dense_in_order(const int64_t* sizes, const int64_t* strides, const int* order) {
  int64_t expected = 1;
  for (int i = 0; i < 5; ++i) {
    const int d = order[i];
    if (sizes[d] == 1) continue;
    if (strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

STSSA_HD bool is_channels_last_3d(const int64_t* sizes, const int64_t* strides) {
  for (int d = 0; d < 5; ++d)
    if (sizes[d] == 0) return false;
  const int contiguous[5] = {4, 3, 2, 1, 0};
  const int channels_last[5] = {1, 4, 3, 2, 0};
  return dense_in_order(sizes, strides, channels_last) && !dense_in_order(sizes, strides, contiguous);
}

}  // namespace roi
}  // namespace stssa
