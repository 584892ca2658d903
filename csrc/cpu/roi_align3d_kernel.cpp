// RoIAlign3D, CPU kernels (TORCH_LIBRARY_IMPL(stssa, CPU)).
//
// The bilinear weight of a sample factorises into a y part and an x part (and a sample outside the map
// has a zero y or x part), so a bin's average over its sample grid is separable:
//   out[k, c, t] = Ay_k (ph x h') . X[n_k, c, t, y0:y0+h', x0:x0+w'] . Ax_k^T (w' x pw) / count,
// where Ay_k[p, y] sums the y weights of the samples of bin row p that land on pixel row y (and Ax_k the
// same for columns), restricted to the rows/columns the box touches. The two small tables are computed
// once per box and reused for every channel -- and for every frame when the box is shared -- and the
// per-(channel, frame) work becomes two tiny dense products whose inner loop runs over contiguous x
// (vectorised) instead of four gathers per sample.
// Forward is split over (roi, channel block) with at::parallel_for.
//
// Backward (the transpose, dX += Ay^T . dOut . Ax / count): grad_input is partitioned over (batch, channel
// block); each task adds the gradients of all rois of its batch, in roi order, into its own slice of
// grad_input, so no two threads write the same element (race-free without atomics, and deterministic).
// Accumulation is in float (double for double inputs), cast back once for reduced precision types.
//
// Input strides are honoured (contiguous, channels_last_3d, slices): no copy of the feature map.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "roi_align3d_common.h"

namespace stssa {
namespace {

constexpr int64_t kChannelBlock = 16;

// Summed weights of one axis: rows = output bins, columns = pixels lo .. lo + span - 1.
template <typename acc_t>
struct AxisTable {
  int64_t lo = 0, span = 0;
  std::vector<acc_t> w;  // pooled x span, row-major
};

template <typename acc_t>
void axis_table(acc_t start, acc_t bin, acc_t step, int grid, int pooled, int64_t size, AxisTable<acc_t>& tab) {
  int64_t lo = size, hi = -1;
  for (int p = 0; p < pooled; ++p)
    for (int i = 0; i < grid; ++i) {
      const auto a = roi::axis_weights(roi::sample_coord(start, bin, step, p, i), size);
      if (a.w_lo == acc_t(0) && a.w_hi == acc_t(0)) continue;  // outside the map
      lo = std::min(lo, a.lo);
      hi = std::max(hi, a.hi);
    }
  tab.lo = hi >= lo ? lo : 0;
  tab.span = hi >= lo ? hi - lo + 1 : 0;
  tab.w.assign(static_cast<size_t>(pooled) * tab.span, acc_t(0));
  if (tab.span == 0) return;
  for (int p = 0; p < pooled; ++p)
    for (int i = 0; i < grid; ++i) {
      const auto a = roi::axis_weights(roi::sample_coord(start, bin, step, p, i), size);
      if (a.w_lo == acc_t(0) && a.w_hi == acc_t(0)) continue;
      tab.w[p * tab.span + (a.lo - tab.lo)] += a.w_lo;
      tab.w[p * tab.span + (a.hi - tab.lo)] += a.w_hi;
    }
}

template <typename acc_t>
struct BoxTables {
  AxisTable<acc_t> y, x;
  acc_t inv_count = acc_t(1);
  bool empty = true;  // no sample lands on the map: the output is 0
};

template <typename acc_t>
void box_tables(const acc_t* box, acc_t spatial_scale, int ph_n, int pw_n, int sampling_ratio, bool aligned,
                int64_t H, int64_t W, BoxTables<acc_t>& bt) {
  const auto g = roi::roi_geometry(box, spatial_scale, ph_n, pw_n, sampling_ratio, aligned);
  bt.inv_count = acc_t(1) / g.count;
  axis_table(g.start_h, g.bin_h, g.step_h, g.grid_h, ph_n, H, bt.y);
  axis_table(g.start_w, g.bin_w, g.step_w, g.grid_w, pw_n, W, bt.x);
  bt.empty = bt.y.span == 0 || bt.x.span == 0;
}

// out[ph, pw] = sum_y sum_x Ay[ph, y] P[y, x] Ax[pw, x] * inv_count, P read through (sH, sW).
template <typename scalar_t, typename acc_t, bool kUnitStrideW>
void bin_product(const scalar_t* P, int64_t sH, int64_t sW, const BoxTables<acc_t>& bt, int ph_n, int pw_n,
                 acc_t* tmp /* ph_n * span_x */, scalar_t* out) {
  const int64_t hs = bt.y.span, ws = bt.x.span;
  std::fill(tmp, tmp + ph_n * ws, acc_t(0));
  for (int64_t y = 0; y < hs; ++y) {
    const scalar_t* row = P + y * sH;
    for (int ph = 0; ph < ph_n; ++ph) {
      const acc_t a = bt.y.w[ph * hs + y];
      if (a == acc_t(0)) continue;
      acc_t* t = tmp + ph * ws;
      if (kUnitStrideW) {
        for (int64_t x = 0; x < ws; ++x) t[x] += a * static_cast<acc_t>(row[x]);
      } else {
        for (int64_t x = 0; x < ws; ++x) t[x] += a * static_cast<acc_t>(row[x * sW]);
      }
    }
  }
  for (int ph = 0; ph < ph_n; ++ph)
    for (int pw = 0; pw < pw_n; ++pw) {
      const acc_t* t = tmp + ph * ws;
      const acc_t* ax = bt.x.w.data() + pw * ws;
      acc_t acc = 0;
      for (int64_t x = 0; x < ws; ++x) acc += t[x] * ax[x];
      out[ph * pw_n + pw] = static_cast<scalar_t>(acc * bt.inv_count);
    }
}

template <typename scalar_t>
void forward_impl(const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int ph_n,
                  int pw_n, int sampling_ratio, bool aligned, at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = input.size(0), C = input.size(1), T = input.size(2), H = input.size(3),
                W = input.size(4);
  const int64_t sN = input.stride(0), sC = input.stride(1), sT = input.stride(2),
                sH = input.stride(3), sW = input.stride(4);
  const int64_t K = rois.size(0);
  const bool per_frame = rois.dim() == 3;
  const int64_t n_boxes = per_frame ? T : 1;
  const auto rois_acc = rois.contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t* rdata = rois_acc.template data_ptr<acc_t>();
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = output.data_ptr<scalar_t>();
  const int64_t bins = static_cast<int64_t>(ph_n) * pw_n;
  const int64_t cblocks = (C + kChannelBlock - 1) / kChannelBlock;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();

  at::parallel_for(0, K * cblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<BoxTables<acc_t>> tables(static_cast<size_t>(n_boxes));
    std::vector<acc_t> tmp(static_cast<size_t>(ph_n) * std::max<int64_t>(W, 1));
    int64_t cached_k = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / cblocks;
      const int64_t c0 = (task % cblocks) * kChannelBlock;
      const int64_t c1 = std::min(C, c0 + kChannelBlock);
      const acc_t* r0 = rdata + k * n_boxes * 5;
      const acc_t bval = r0[0];
      if (!(bval >= acc_t(0) && bval < static_cast<acc_t>(N))) {  // only when the wrapper's checks were skipped
        std::fill(out + (k * C + c0) * T * bins, out + (k * C + c1) * T * bins, static_cast<scalar_t>(nan));
        continue;
      }
      if (cached_k != k) {
        for (int64_t b = 0; b < n_boxes; ++b)
          box_tables<acc_t>(r0 + b * 5 + 1, static_cast<acc_t>(spatial_scale), ph_n, pw_n, sampling_ratio,
                            aligned, H, W, tables[b]);
        cached_k = k;
      }
      const int64_t n = static_cast<int64_t>(bval);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t t = 0; t < T; ++t) {
          const BoxTables<acc_t>& bt = tables[per_frame ? t : 0];
          scalar_t* o = out + ((k * C + c) * T + t) * bins;
          if (bt.empty) {
            std::fill(o, o + bins, scalar_t(0));
            continue;
          }
          const scalar_t* P = in + n * sN + c * sC + t * sT + bt.y.lo * sH + bt.x.lo * sW;
          if (sW == 1)
            bin_product<scalar_t, acc_t, true>(P, sH, sW, bt, ph_n, pw_n, tmp.data(), o);
          else
            bin_product<scalar_t, acc_t, false>(P, sH, sW, bt, ph_n, pw_n, tmp.data(), o);
        }
      }
    }
  });
}

at::Tensor roi_align3d_forward_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                   bool aligned) {
  TORCH_CHECK(input.device().is_cpu(), "roi_align3d: input must be a CPU tensor here");
  TORCH_CHECK(rois.device().is_cpu(), "roi_align3d: rois must be on the same device as input (CPU)");
  TORCH_CHECK(input.dim() == 5, "roi_align3d: input must be [N, C, T, H, W], got ", input.dim(), " dims");
  TORCH_CHECK((rois.dim() == 2 && rois.size(1) == 5) ||
                  (rois.dim() == 3 && rois.size(1) == input.size(2) && rois.size(2) == 5),
              "roi_align3d: rois must be [K, 5] or [K, T, 5] with T = input.size(2) = ", input.size(2),
              ", got ", rois.sizes());
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, "roi_align3d: output_size must be positive, got (",
              pooled_height, ", ", pooled_width, ")");
  TORCH_CHECK(rois.size(0) == 0 || (input.size(3) > 0 && input.size(4) > 0),
              "roi_align3d: input height and width must be positive when there are boxes");
  auto output = at::empty({rois.size(0), input.size(1), input.size(2), pooled_height, pooled_width},
                          input.options().memory_format(at::MemoryFormat::Contiguous));
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align3d_forward_cpu", [&] {
    forward_impl<scalar_t>(input, rois, spatial_scale, static_cast<int>(pooled_height),
                           static_cast<int>(pooled_width), static_cast<int>(sampling_ratio), aligned, output);
  });
  return output;
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale, int ph_n, int pw_n,
                   int sampling_ratio, bool aligned, at::Tensor& grad_in /* acc dtype, contiguous */) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = grad_in.size(0), C = grad_in.size(1), T = grad_in.size(2), H = grad_in.size(3),
                W = grad_in.size(4);
  const int64_t K = rois.size(0);
  const bool per_frame = rois.dim() == 3;
  const int64_t n_boxes = per_frame ? T : 1;
  const auto rois_acc = rois.contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t* rdata = rois_acc.template data_ptr<acc_t>();
  const auto g = grad.contiguous();
  const scalar_t* gd = g.const_data_ptr<scalar_t>();
  acc_t* gi = grad_in.template data_ptr<acc_t>();
  const int64_t bins = static_cast<int64_t>(ph_n) * pw_n;

  // rois of each batch element, in roi order (fixed summation order -> deterministic); tables once per roi.
  std::vector<std::vector<int64_t>> by_batch(static_cast<size_t>(N));
  for (int64_t k = 0; k < K; ++k) {
    const acc_t b = rdata[k * n_boxes * 5];
    if (b >= acc_t(0) && b < static_cast<acc_t>(N)) by_batch[static_cast<int64_t>(b)].push_back(k);
  }
  std::vector<BoxTables<acc_t>> tables(static_cast<size_t>(K * n_boxes));
  at::parallel_for(0, K * n_boxes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      box_tables<acc_t>(rdata + i * 5 + 1, static_cast<acc_t>(spatial_scale), ph_n, pw_n, sampling_ratio,
                        aligned, H, W, tables[i]);
  });
  const int64_t cblocks = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, N * cblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tmp(static_cast<size_t>(ph_n) * std::max<int64_t>(W, 1));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / cblocks;
      const int64_t c0 = (task % cblocks) * kChannelBlock;
      const int64_t c1 = std::min(C, c0 + kChannelBlock);
      for (const int64_t k : by_batch[n]) {
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t t = 0; t < T; ++t) {
            const BoxTables<acc_t>& bt = tables[k * n_boxes + (per_frame ? t : 0)];
            if (bt.empty) continue;
            const int64_t hs = bt.y.span, ws = bt.x.span;
            const scalar_t* go = gd + ((k * C + c) * T + t) * bins;
            // tmp[ph, x] = sum_pw dOut[ph, pw] Ax[pw, x] / count
            std::fill(tmp.begin(), tmp.begin() + ph_n * ws, acc_t(0));
            for (int ph = 0; ph < ph_n; ++ph)
              for (int pw = 0; pw < pw_n; ++pw) {
                const acc_t gv = static_cast<acc_t>(go[ph * pw_n + pw]) * bt.inv_count;
                if (gv == acc_t(0)) continue;
                const acc_t* ax = bt.x.w.data() + pw * ws;
                acc_t* tr = tmp.data() + ph * ws;
                for (int64_t x = 0; x < ws; ++x) tr[x] += gv * ax[x];
              }
            // dX[y, x] += sum_ph Ay[ph, y] tmp[ph, x]
            acc_t* P = gi + ((n * C + c) * T + t) * H * W + bt.y.lo * W + bt.x.lo;
            for (int64_t y = 0; y < hs; ++y) {
              acc_t* row = P + y * W;
              for (int ph = 0; ph < ph_n; ++ph) {
                const acc_t a = bt.y.w[ph * hs + y];
                if (a == acc_t(0)) continue;
                const acc_t* tr = tmp.data() + ph * ws;
                for (int64_t x = 0; x < ws; ++x) row[x] += a * tr[x];
              }
            }
          }
        }
      }
    }
  });
}

at::Tensor roi_align3d_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                    int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                                    int64_t channels, int64_t time, int64_t height, int64_t width,
                                    int64_t sampling_ratio, bool aligned) {
  TORCH_CHECK(grad.device().is_cpu() && rois.device().is_cpu(), "_roi_align3d_backward: expected CPU tensors");
  TORCH_CHECK(grad.dim() == 5 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == time && grad.size(3) == pooled_height && grad.size(4) == pooled_width,
              "_roi_align3d_backward: grad must be [K, C, T, ph, pw] = [", rois.size(0), ", ", channels, ", ",
              time, ", ", pooled_height, ", ", pooled_width, "], got ", grad.sizes());
  const auto opts = grad.options().memory_format(at::MemoryFormat::Contiguous);
  const bool reduced = grad.scalar_type() == at::kHalf || grad.scalar_type() == at::kBFloat16;
  auto grad_in = at::zeros({batch_size, channels, time, height, width}, reduced ? opts.dtype(at::kFloat) : opts);
  if (grad_in.numel() == 0 || grad.numel() == 0) return reduced ? grad_in.to(grad.scalar_type()) : grad_in;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align3d_backward_cpu", [&] {
    backward_impl<scalar_t>(grad, rois, spatial_scale, static_cast<int>(pooled_height),
                            static_cast<int>(pooled_width), static_cast<int>(sampling_ratio), aligned, grad_in);
  });
  return reduced ? grad_in.to(grad.scalar_type()) : grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(stssa, CPU, m) {
  m.impl("roi_align3d", &roi_align3d_forward_cpu);
  m.impl("_roi_align3d_backward", &roi_align3d_backward_cpu);
}

}  // namespace stssa
