// C++ tests of RoIAlign3D through libtorch and the dispatcher (run by ctest).
//  1. Bilinear interpolation is exact for a function linear in (y, x): the output of a bin equals the
//     linear function at the mean sample coordinate, which is known in closed form.
//  2. The deterministic CUDA backward gathers per input pixel using roi::sample_range and
//     roi::weight_on_pixel (csrc/roi_align3d_common.h); here that gather, run on the host, must equal the
//     CPU scatter backward for random boxes -- so the GPU kernel's index math is tested without a GPU.
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
                                         bool)>();
  return op.call(grad, rois, scale, c10::SymInt(ph), c10::SymInt(pw), c10::SymInt(in[0]), c10::SymInt(in[1]),
                 c10::SymInt(in[2]), c10::SymInt(in[3]), c10::SymInt(in[4]), sr, aligned);
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

// The deterministic CUDA backward's algorithm, on the host.
at::Tensor gather_backward(const at::Tensor& grad, const at::Tensor& rois, double scale, int ph_n, int pw_n,
                           at::IntArrayRef in, int sr, bool aligned) {
  const int64_t N = in[0], C = in[1], T = in[2], H = in[3], W = in[4], K = rois.size(0);
  auto out = at::zeros(in, at::kDouble);
  auto r = rois.accessor<double, 2>();
  auto g = grad.accessor<double, 5>();
  auto o = out.accessor<double, 5>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t y = 0; y < H; ++y)
          for (int64_t x = 0; x < W; ++x) {
            double sum = 0;
            for (int64_t k = 0; k < K; ++k) {
              if (static_cast<int64_t>(r[k][0]) != n) continue;
              const double box[4] = {r[k][1], r[k][2], r[k][3], r[k][4]};
              const auto geo = stssa::roi::roi_geometry<double>(box, scale, ph_n, pw_n, sr, aligned);
              int y0, y1, x0, x1;
              if (!stssa::roi::sample_range(geo.start_h, geo.bin_h, geo.step_h, geo.grid_h, ph_n, y, H, &y0, &y1)) continue;
              if (!stssa::roi::sample_range(geo.start_w, geo.bin_w, geo.step_w, geo.grid_w, pw_n, x, W, &x0, &x1)) continue;
              double acc = 0;
              for (int sy = y0; sy <= y1; ++sy) {
                const int ph = sy / geo.grid_h;
                const double wy = stssa::roi::weight_on_pixel(
                    stssa::roi::sample_coord(geo.start_h, geo.bin_h, geo.step_h, ph, sy - ph * geo.grid_h), y, H);
                for (int sx = x0; sx <= x1; ++sx) {
                  const int pw = sx / geo.grid_w;
                  const double wx = stssa::roi::weight_on_pixel(
                      stssa::roi::sample_coord(geo.start_w, geo.bin_w, geo.step_w, pw, sx - pw * geo.grid_w), x, W);
                  acc += wy * wx * g[k][c][t][ph][pw];
                }
              }
              sum += acc / geo.count;
            }
            o[n][c][t][y][x] = sum;
          }
  return out;
}

void test_gather_equals_scatter() {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t N = 1 + trial % 2, C = 2, T = 2, H = 1 + (trial * 7) % 13, W = 1 + (trial * 5) % 11;
    const int64_t K = 1 + trial % 5;
    const int ph = 1 + trial % 3, pw = 1 + (trial / 3) % 4, sr = (trial % 4) - 1;
    const bool aligned = trial % 2;
    const double scale = (trial % 3 == 0) ? 0.5 : 1.0;
    auto rois = at::empty({K, 5}, at::kDouble);
    for (int64_t k = 0; k < K; ++k) {
      const double iw = W / scale, ih = H / scale;
      const double x1 = u(rng) * iw * 1.4 - 0.2 * iw, y1 = u(rng) * ih * 1.4 - 0.2 * ih;
      const double bw = (trial % 7 == 0 && k == 0) ? 0.0 : u(rng) * iw, bh = u(rng) * ih;  // zero-size too
      rois[k][0] = static_cast<double>(k % N);
      rois[k][1] = x1; rois[k][2] = y1; rois[k][3] = x1 + bw; rois[k][4] = y1 + bh;
    }
    auto grad = at::randn({K, C, T, ph, pw}, at::kDouble);
    const std::vector<int64_t> in = {N, C, T, H, W};
    auto scatter = roi_align3d_backward(grad, rois, scale, ph, pw, in, sr, aligned);
    auto gather = gather_backward(grad, rois, scale, ph, pw, in, sr, aligned);
    const double diff = (scatter - gather).abs().max().item<double>();
    EXPECT(diff < 1e-12, "trial %d: gather vs scatter max diff %.3g (H=%lld W=%lld ph=%d pw=%d sr=%d aligned=%d)",
           trial, diff, (long long)H, (long long)W, ph, pw, sr, (int)aligned);
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
