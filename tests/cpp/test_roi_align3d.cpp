// C++ tests of RoIAlign3D through libtorch and the dispatcher (run by ctest).
//  1. Bilinear interpolation is exact for a function linear in (y, x): the output of a bin equals the
//     linear function at the mean sample coordinate, which is known in closed form.
//  2. The deterministic CUDA backward buckets the boxes by batch index and pixel tile (roi::fill_bucket)
//     and gathers per input pixel from its bucket (roi::gather_pixel), both in csrc/roi_align3d_common.h;
//     here those same functions, run on the host for several tile sizes, must equal the CPU scatter
//     backward for random boxes -- so the GPU kernel's index math is tested without a GPU.
//  3. Per-frame boxes: frame t of the output equals the shared-box op run with frame t's box.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <random>

#include "roi_align3d_common.h"

namespace {

int failures = 0;

#define EXPECT(cond, ...)                     \
  do {                                        \
    if (!(cond)) {                            \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);               \
      std::printf("\n");                      \
      ++failures;                             \
    }                                         \
  } while (0)

at::Tensor roi_align3d(const at::Tensor& input, const at::Tensor& rois, double scale, int64_t ph, int64_t pw,
                       int64_t sr, bool aligned) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("stssa::roi_align3d", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::SymInt, c10::SymInt,
                                         int64_t, bool)>();
  return op.call(input, rois, scale, c10::SymInt(ph), c10::SymInt(pw), sr, aligned);
}

at::Tensor roi_align3d_backward(const at::Tensor& grad, const at::Tensor& rois, double scale, int64_t ph,
                                int64_t pw, at::IntArrayRef in, int64_t sr, bool aligned) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("stssa::_roi_align3d_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::SymInt, c10::SymInt,
                                         c10::SymInt, c10::SymInt, c10::SymInt, c10::SymInt, c10::SymInt, int64_t,
                                         bool, bool, bool)>();
  return op.call(grad, rois, scale, c10::SymInt(ph), c10::SymInt(pw), c10::SymInt(in[0]), c10::SymInt(in[1]),
                 c10::SymInt(in[2]), c10::SymInt(in[3]), c10::SymInt(in[4]), sr, aligned, /*deterministic=*/false,
                 /*channels_last=*/false);
}

void test_linear_function_is_exact() {
  const int64_t H = 12, W = 15;
  auto y = at::arange(H, at::kDouble).view({H, 1}).expand({H, W});
  auto x = at::arange(W, at::kDouble).view({1, W}).expand({H, W});
  auto input = (0.5 * y - 0.25 * x + 3.0).view({1, 1, 1, H, W}).contiguous();
  // a box well inside the map, so that no sample is clamped at the border
  auto rois = at::tensor({0.0, 2.0, 1.5, 11.0, 8.0}, at::kDouble).view({1, 5});
  const int64_t ph = 3, pw = 4, sr = 2;
  for (bool aligned : {false, true}) {
    auto out = roi_align3d(input, rois, 1.0, ph, pw, sr, aligned);
    const double off = aligned ? 0.5 : 0.0;
    const double x1 = 2.0 - off, y1 = 1.5 - off, bw = (11.0 - 2.0) / pw, bh = (8.0 - 1.5) / ph;
    for (int64_t i = 0; i < ph; ++i)
      for (int64_t j = 0; j < pw; ++j) {
        const double cy = y1 + (i + 0.5) * bh, cx = x1 + (j + 0.5) * bw;  // mean sample position
        const double expect = 0.5 * cy - 0.25 * cx + 3.0;
        const double got = out.index({0, 0, 0, i, j}).item<double>();
        EXPECT(std::abs(got - expect) < 1e-12, "linear bin (%lld,%lld) aligned=%d: got %.15g expected %.15g",
               (long long)i, (long long)j, (int)aligned, got, expect);
      }
  }
}

// The deterministic CUDA backward's algorithm, on the host: bucket kernel, then gather kernel.
at::Tensor gather_backward(const at::Tensor& grad, const at::Tensor& rois, double scale, int ph_n, int pw_n,
                           at::IntArrayRef in, int sr, bool aligned, int64_t tile) {
  const int64_t N = in[0], C = in[1], T = in[2], H = in[3], W = in[4], K = rois.size(0);
  const bool per_frame = rois.dim() == 3;
  const int64_t n_tb = per_frame ? T : 1;
  auto out = at::zeros(in, at::kDouble);
  const auto r = rois.contiguous();
  const double* rd = r.data_ptr<double>();
  const auto g = grad.contiguous();
  const auto tg = stssa::roi::tile_grid(H, W, tile);
  const int64_t buckets = N * n_tb * tg.ty * tg.tx;
  std::vector<int32_t> lists(static_cast<size_t>(buckets * std::max<int64_t>(K, 1)));
  std::vector<int> counts(static_cast<size_t>(buckets));
  for (int64_t b = 0; b < buckets; ++b) {
    const int64_t tiles = tg.ty * tg.tx;
    counts[b] = stssa::roi::fill_bucket<double>(rd, K, n_tb, b / (tiles * n_tb), (b / tiles) % n_tb, b % tiles, tg,
                                                N, H, W, scale, ph_n, pw_n, sr, aligned, lists.data() + b * K);
  }
  auto o = out.accessor<double, 5>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t y = 0; y < H; ++y)
          for (int64_t x = 0; x < W; ++x) {
            const int64_t b = (n * n_tb + (per_frame ? t : 0)) * tg.ty * tg.tx + (y / tile) * tg.tx + x / tile;
            o[n][c][t][y][x] = stssa::roi::gather_pixel<double, double>(
                rd, n_tb, per_frame, lists.data() + b * K, counts[b], g.data_ptr<double>(), g.stride(0), g.stride(1),
                g.stride(2), g.stride(3), g.stride(4), c, t, y, x, H, W, scale, ph_n, pw_n, sr, aligned);
          }
  return out;
}

void test_gather_equals_scatter() {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t N = 1 + trial % 2, C = 2, T = 2, H = 1 + (trial * 7) % 23, W = 1 + (trial * 5) % 19;
    const bool per_frame = trial % 3 == 1;
    const int64_t K = 1 + trial % 5;
    const int ph = 1 + trial % 3, pw = 1 + (trial / 3) % 4, sr = (trial % 4) - 1;
    const bool aligned = trial % 2;
    const double scale = (trial % 3 == 0) ? 0.5 : 1.0;
    const int64_t nb = per_frame ? T : 1;
    auto rois = at::empty({K, nb, 5}, at::kDouble);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t f = 0; f < nb; ++f) {
        const double iw = W / scale, ih = H / scale;
        const double x1 = u(rng) * iw * 1.4 - 0.2 * iw, y1 = u(rng) * ih * 1.4 - 0.2 * ih;
        // zero-size, tiny (a few pixels: the far-away people) and large boxes
        const double size = trial % 4 == 2 ? 0.15 : 1.0;
        const double bw = (trial % 7 == 0 && k == 0) ? 0.0 : u(rng) * iw * size, bh = u(rng) * ih * size;
        rois[k][f][0] = static_cast<double>(k % N);
        rois[k][f][1] = x1; rois[k][f][2] = y1; rois[k][f][3] = x1 + bw; rois[k][f][4] = y1 + bh;
      }
    if (!per_frame) rois = rois.select(1, 0).contiguous();
    auto grad = at::randn({K, C, T, ph, pw}, at::kDouble);
    const std::vector<int64_t> in = {N, C, T, H, W};
    auto scatter = roi_align3d_backward(grad, rois, scale, ph, pw, in, sr, aligned);
    for (const int64_t tile : {1, 3, 8, 64}) {
      auto gather = gather_backward(grad, rois, scale, ph, pw, in, sr, aligned, tile);
      const double diff = (scatter - gather).abs().max().item<double>();
      EXPECT(diff < 1e-12,
             "trial %d tile %lld: gather vs scatter max diff %.3g (H=%lld W=%lld ph=%d pw=%d sr=%d aligned=%d pf=%d)",
             trial, (long long)tile, diff, (long long)H, (long long)W, ph, pw, sr, (int)aligned, (int)per_frame);
    }
  }
}

void test_per_frame_boxes() {
  auto input = at::randn({2, 3, 4, 9, 10}, at::kDouble);
  auto rois = at::rand({2, 4, 5}, at::kDouble) * 6.0;
  rois.select(2, 0).fill_(1.0);
  rois.select(2, 3).add_(3.0);  // x2 > x1
  rois.select(2, 4).add_(3.0);
  auto out = roi_align3d(input, rois, 1.0, 3, 3, -1, true);
  for (int64_t t = 0; t < 4; ++t) {
    auto frame = roi_align3d(input, rois.select(1, t).contiguous(), 1.0, 3, 3, -1, true).select(2, t);
    const double diff = (out.select(2, t) - frame).abs().max().item<double>();
    EXPECT(diff == 0.0, "per-frame t=%lld differs by %.3g", (long long)t, diff);
  }
}

}  // namespace

int main() {
  test_linear_function_is_exact();
  test_gather_equals_scatter();
  test_per_frame_boxes();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("roi_align3d C++ tests: all checks passed\n");
  return 0;
}
