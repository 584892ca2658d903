// RoIAlign3D, CPU kernels (TORCH_LIBRARY_IMPL(stssa, CPU)).
//
// Forward: out[k, c, t, ph, pw] = mean over the bin's sample grid of bilinear(input[n_k, c, t], sample),
// the box of roi k taken from rois[k] (shared by all frames) or rois[k, t] (per-frame boxes).
// The bilinear taps (4 offsets + 4 weights per sample) depend only on the box, so they are computed
// once per (roi, frame-box) and reused for every channel -- and, for shared boxes, every frame.
// Work is split over (roi, channel block) with at::parallel_for.
//
// Backward: grad_input is partitioned over (batch, channel block); each task scatters the gradients of
// all rois of its batch into its own slice of grad_input, so no two threads ever write the same
// element (race-free without atomics, and deterministic). Accumulation is in float (double for
// double inputs) and cast back at the end for reduced precision types.
//
// Input strides are honoured (contiguous, channels_last_3d, slices): no copy of the feature map.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "roi_align3d_common.h"

namespace stssa {
namespace {

using roi::RoiGeometry;

constexpr int64_t kChannelBlock = 32;

// Bilinear taps of every sample of every bin of one box, bins in (ph, pw) order.
template <typename acc_t>
struct Taps {
  std::vector<int64_t> off;  // 4 offsets (in elements, via the H/W strides) per sample
  std::vector<acc_t> w;      // 4 weights per sample
  std::vector<int32_t> bin_end;  // exclusive end index (in samples) of each bin
  acc_t inv_count = acc_t(1);
};

template <typename acc_t>
void compute_taps(const acc_t* box, acc_t spatial_scale, int ph_n, int pw_n, int sampling_ratio,
                  bool aligned, int64_t H, int64_t W, int64_t sH, int64_t sW, Taps<acc_t>& taps) {
  const RoiGeometry<acc_t> g =
      roi::roi_geometry(box, spatial_scale, ph_n, pw_n, sampling_ratio, aligned);
  taps.off.clear();
  taps.w.clear();
  taps.bin_end.assign(static_cast<size_t>(ph_n) * pw_n, 0);
  taps.inv_count = acc_t(1) / g.count;
  const bool finite = std::isfinite(static_cast<double>(g.start_h)) &&
                      std::isfinite(static_cast<double>(g.start_w)) &&
                      std::isfinite(static_cast<double>(g.bin_h)) && std::isfinite(static_cast<double>(g.bin_w));
  int32_t n = 0;
  for (int ph = 0; ph < ph_n; ++ph) {
    for (int pw = 0; pw < pw_n; ++pw) {
      if (finite) {
        for (int iy = 0; iy < g.grid_h; ++iy) {
          const auto ay = roi::axis_weights(roi::sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h), H);
          for (int ix = 0; ix < g.grid_w; ++ix) {
            const auto ax = roi::axis_weights(roi::sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w), W);
            const acc_t w1 = ay.w_lo * ax.w_lo, w2 = ay.w_lo * ax.w_hi, w3 = ay.w_hi * ax.w_lo,
                        w4 = ay.w_hi * ax.w_hi;
            if (w1 == acc_t(0) && w2 == acc_t(0) && w3 == acc_t(0) && w4 == acc_t(0)) continue;
            taps.off.insert(taps.off.end(), {ay.lo * sH + ax.lo * sW, ay.lo * sH + ax.hi * sW,
                                             ay.hi * sH + ax.lo * sW, ay.hi * sH + ax.hi * sW});
            taps.w.insert(taps.w.end(), {w1, w2, w3, w4});
            ++n;
          }
        }
      }
      taps.bin_end[static_cast<size_t>(ph) * pw_n + pw] = n;
    }
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
    std::vector<Taps<acc_t>> taps(static_cast<size_t>(n_boxes));
    int64_t cached_k = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / cblocks;
      const int64_t c0 = (task % cblocks) * kChannelBlock;
      const int64_t c1 = std::min(C, c0 + kChannelBlock);
      const acc_t* r0 = rdata + k * n_boxes * 5;
      const acc_t bval = r0[0];
      const bool valid_batch = bval >= acc_t(0) && bval < static_cast<acc_t>(N);
      if (!valid_batch) {  // only reachable when the wrapper's value checks were skipped
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t i = 0; i < T * bins; ++i)
            out[((k * C + c) * T) * bins + i] = static_cast<scalar_t>(nan);
        continue;
      }
      if (cached_k != k) {
        for (int64_t b = 0; b < n_boxes; ++b)
          compute_taps<acc_t>(r0 + b * 5 + 1, static_cast<acc_t>(spatial_scale), ph_n, pw_n,
                              sampling_ratio, aligned, H, W, sH, sW, taps[b]);
        cached_k = k;
      }
      const int64_t n = static_cast<int64_t>(bval);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t t = 0; t < T; ++t) {
          const Taps<acc_t>& tp = taps[per_frame ? t : 0];
          const scalar_t* plane = in + n * sN + c * sC + t * sT;
          scalar_t* o = out + ((k * C + c) * T + t) * bins;
          int32_t s = 0;
          for (int64_t b = 0; b < bins; ++b) {
            acc_t acc = 0;
            for (; s < tp.bin_end[b]; ++s) {
              const int64_t* off = &tp.off[4 * s];
              const acc_t* w = &tp.w[4 * s];
              acc += w[0] * static_cast<acc_t>(plane[off[0]]) + w[1] * static_cast<acc_t>(plane[off[1]]) +
                     w[2] * static_cast<acc_t>(plane[off[2]]) + w[3] * static_cast<acc_t>(plane[off[3]]);
            }
            o[b] = static_cast<scalar_t>(acc * tp.inv_count);
          }
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
void backward_impl(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale, int ph_n,
                   int pw_n, int sampling_ratio, bool aligned, at::Tensor& grad_in /* acc dtype, contiguous */) {
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

  // rois of each batch element, in roi order (fixed summation order -> deterministic).
  std::vector<std::vector<int64_t>> by_batch(static_cast<size_t>(N));
  for (int64_t k = 0; k < K; ++k) {
    const acc_t b = rdata[k * n_boxes * 5];
    if (b >= acc_t(0) && b < static_cast<acc_t>(N)) by_batch[static_cast<int64_t>(b)].push_back(k);
  }
  const int64_t cblocks = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, N * cblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Taps<acc_t>> taps(static_cast<size_t>(n_boxes));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / cblocks;
      const int64_t c0 = (task % cblocks) * kChannelBlock;
      const int64_t c1 = std::min(C, c0 + kChannelBlock);
      for (const int64_t k : by_batch[n]) {
        const acc_t* r0 = rdata + k * n_boxes * 5;
        // Offsets are computed for the contiguous [H, W] plane of grad_in.
        for (int64_t b = 0; b < n_boxes; ++b)
          compute_taps<acc_t>(r0 + b * 5 + 1, static_cast<acc_t>(spatial_scale), ph_n, pw_n,
                              sampling_ratio, aligned, H, W, W, 1, taps[b]);
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t t = 0; t < T; ++t) {
            const Taps<acc_t>& tp = taps[per_frame ? t : 0];
            acc_t* plane = gi + ((n * C + c) * T + t) * H * W;
            const scalar_t* go = gd + ((k * C + c) * T + t) * bins;
            int32_t s = 0;
            for (int64_t b = 0; b < bins; ++b) {
              const acc_t gv = static_cast<acc_t>(go[b]) * tp.inv_count;
              for (; s < tp.bin_end[b]; ++s) {
                const int64_t* off = &tp.off[4 * s];
                const acc_t* w = &tp.w[4 * s];
                plane[off[0]] += gv * w[0];
                plane[off[1]] += gv * w[1];
                plane[off[2]] += gv * w[2];
                plane[off[3]] += gv * w[3];
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
