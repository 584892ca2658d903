// Inner kernels of the CPU RoIAlign3D, vectorised across a block of CB channels (the channel index is
// the fastest one in every buffer here). Included twice by roi_align3d_kernel.cpp: once for the baseline
// x86-64 ISA and once with AVX2+FMA, picked at run time, so one binary is fast on current CPUs and still
// runs on old ones. Expects STSSA_KERNEL_NS (namespace) and STSSA_KERNEL_ATTR (function attribute).
//
// The bilinear weight of a sample factorises into a y part and an x part (a sample outside the map has a
// zero y or x part), so a bin's average is separable:
//   out[ph, pw, c] = inv_count * sum_x Ax[pw, x] * (sum_y Ay[ph, y] * X[y, x, c]),
// with Ay[ph, .] the summed y weights of bin row ph's samples: a short band of consecutive pixel rows
// (Bands below; the same for x). The bands are computed once per (box, frame) and reused for every channel.

namespace stssa {
namespace cpu {
namespace STSSA_KERNEL_NS {

// CB-wide channel vectors: the inner loops below are written against these so that fp32 with CB = 16
// runs on two AVX2 registers. GCC neither vectorised y[c] += a * x[c] with x and y behind two restrict
// pointers (it emitted 16 scalar FMAs) nor kept acc[CB] arrays in registers (perf annotate).
template <typename acc_t, int CB>
struct Vec {
  acc_t v[CB];
  STSSA_KERNEL_ATTR static Vec zero() {
    Vec r;
    for (int c = 0; c < CB; ++c) r.v[c] = acc_t(0);
    return r;
  }
  template <typename src_t>
  STSSA_KERNEL_ATTR static Vec load(const src_t* p) {
    Vec r;
    for (int c = 0; c < CB; ++c) r.v[c] = static_cast<acc_t>(p[c]);
    return r;
  }
  template <typename src_t>
  STSSA_KERNEL_ATTR void fma(acc_t a, const src_t* p) {  // this += a * p[0:CB]
    for (int c = 0; c < CB; ++c) v[c] += a * static_cast<acc_t>(p[c]);
  }
  STSSA_KERNEL_ATTR void axpy_to(acc_t a, acc_t* __restrict y) const {  // y[0:CB] += a * this
    for (int c = 0; c < CB; ++c) y[c] += a * v[c];
  }
  STSSA_KERNEL_ATTR void store(acc_t* p, acc_t scale) const {
    for (int c = 0; c < CB; ++c) p[c] = v[c] * scale;
  }
};

#if STSSA_KERNEL_AVX2
template <>
struct Vec<float, 16> {
  __m256 lo, hi;
  STSSA_KERNEL_ATTR static Vec zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  template <typename src_t>
  STSSA_KERNEL_ATTR static Vec load(const src_t* p) {
    if constexpr (std::is_same_v<src_t, float>) {
      return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
    } else {
      alignas(32) float f[16];
      for (int c = 0; c < 16; ++c) f[c] = static_cast<float>(p[c]);
      return {_mm256_load_ps(f), _mm256_load_ps(f + 8)};
    }
  }
  template <typename src_t>
  STSSA_KERNEL_ATTR void fma(float a, const src_t* p) {
    const Vec x = load(p);
    const __m256 va = _mm256_set1_ps(a);
    lo = _mm256_fmadd_ps(va, x.lo, lo);
    hi = _mm256_fmadd_ps(va, x.hi, hi);
  }
  STSSA_KERNEL_ATTR void axpy_to(float a, float* __restrict y) const {
    const __m256 va = _mm256_set1_ps(a);
    _mm256_storeu_ps(y, _mm256_fmadd_ps(va, lo, _mm256_loadu_ps(y)));
    _mm256_storeu_ps(y + 8, _mm256_fmadd_ps(va, hi, _mm256_loadu_ps(y + 8)));
  }
  STSSA_KERNEL_ATTR void store(float* p, float scale) const {
    const __m256 s = _mm256_set1_ps(scale);
    _mm256_storeu_ps(p, _mm256_mul_ps(lo, s));
    _mm256_storeu_ps(p + 8, _mm256_mul_ps(hi, s));
  }
};
#endif

// out (pooled_h x pooled_w x CB) for one (box, frame, channel block). Pixel (y, x) of the box's span,
// channel c, is read at P[(y - by.lo) * rs + (x - bx.lo) * cs + c]. tmp: bx.span * CB accumulators.
template <typename acc_t, typename src_t, int CB>
STSSA_KERNEL_ATTR void forward_box(const src_t* __restrict P, int64_t rs, int64_t cs, const BandsView<acc_t>& by,
                                   const BandsView<acc_t>& bx, int ph_n, int pw_n, acc_t inv_count,
                                   acc_t* __restrict tmp, acc_t* __restrict out) {
  using V = Vec<acc_t, CB>;
  for (int ph = 0; ph < ph_n; ++ph) {
    acc_t* o = out + static_cast<int64_t>(ph) * pw_n * CB;
    const int ny = by.count[ph];
    if (ny == 0) {
      for (int i = 0; i < pw_n * CB; ++i) o[i] = acc_t(0);
      continue;
    }
    const int64_t y0 = by.first[ph] - by.lo;
    const acc_t* wy = by.w + by.off[ph];
    for (int64_t xi = 0; xi < bx.span; ++xi) {
      V acc = V::zero();
      for (int j = 0; j < ny; ++j)  // a zero weight (a row between sparse samples) must not turn inf into NaN
        if (wy[j] != acc_t(0)) acc.fma(wy[j], P + (y0 + j) * rs + xi * cs);
      acc.store(tmp + xi * CB, acc_t(1));
    }
    for (int pw = 0; pw < pw_n; ++pw) {
      V acc = V::zero();
      const int nx = bx.count[pw];
      const acc_t* t = tmp + (bx.first[pw] - bx.lo) * CB;
      const acc_t* wx = bx.w + bx.off[pw];
      for (int i = 0; i < nx; ++i)
        if (wx[i] != acc_t(0)) acc.fma(wx[i], t + i * CB);
      acc.store(o + pw * CB, inv_count);
    }
  }
}

// The transpose: G[(y * gw + x) * CB + c] += sum_ph Ay[ph, y] sum_pw Ax[pw, x] g[(ph * pw_n + pw) * CB + c]
// for one (box, frame, channel block); G spans the whole plane (gw = W), g is pre-scaled by inv_count.
template <typename acc_t, int CB>
STSSA_KERNEL_ATTR void backward_box(const acc_t* __restrict g, const BandsView<acc_t>& by,
                                    const BandsView<acc_t>& bx, int ph_n, int pw_n, int64_t gw,
                                    acc_t* __restrict tmp, acc_t* __restrict G) {
  using V = Vec<acc_t, CB>;
  for (int ph = 0; ph < ph_n; ++ph) {
    const int ny = by.count[ph];
    if (ny == 0) continue;
    for (int64_t i = 0; i < bx.span * CB; ++i) tmp[i] = acc_t(0);
    for (int pw = 0; pw < pw_n; ++pw) {
      const V gv = V::load(g + (static_cast<int64_t>(ph) * pw_n + pw) * CB);
      acc_t* t = tmp + (bx.first[pw] - bx.lo) * CB;
      const acc_t* wx = bx.w + bx.off[pw];
      const int nx = bx.count[pw];
      for (int i = 0; i < nx; ++i)
        if (wx[i] != acc_t(0)) gv.axpy_to(wx[i], t + i * CB);
    }
    const acc_t* wy = by.w + by.off[ph];
    for (int j = 0; j < ny; ++j) {
      const acc_t a = wy[j];
      if (a == acc_t(0)) continue;
      acc_t* row = G + ((by.first[ph] + j) * gw + bx.lo) * CB;
      for (int64_t i = 0; i < bx.span * CB; ++i) row[i] += a * tmp[i];
    }
  }
}

// dst[j * ds + i] = src[i * ss + j] for i < rows, j < cols (fp32): moves channel blocks between the
// planar NCTHW layout and the kernels' channel-fastest tiles. 8x8 blocks in registers where the ISA has
// them (AVX2), element by element at the edges.
STSSA_KERNEL_ATTR inline void transpose_f32(const float* __restrict src, int64_t ss, float* __restrict dst,
                                            int64_t ds, int64_t rows, int64_t cols) {
  int64_t i0 = 0;
#if STSSA_KERNEL_AVX2
  for (; i0 + 8 <= rows; i0 += 8) {
    int64_t j0 = 0;
    for (; j0 + 8 <= cols; j0 += 8) {
      const float* s = src + i0 * ss + j0;
      if ((j0 & 15) == 0)  // the 8 source rows are separate streams: fetch each 4 lines ahead
        for (int r = 0; r < 8; ++r) _mm_prefetch(reinterpret_cast<const char*>(s + r * ss + 64), _MM_HINT_T0);
      __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ss), r2 = _mm256_loadu_ps(s + 2 * ss),
             r3 = _mm256_loadu_ps(s + 3 * ss), r4 = _mm256_loadu_ps(s + 4 * ss), r5 = _mm256_loadu_ps(s + 5 * ss),
             r6 = _mm256_loadu_ps(s + 6 * ss), r7 = _mm256_loadu_ps(s + 7 * ss);
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
                   t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
                   t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                   t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)),
                   u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
                   u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)),
                   u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)),
                   u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)),
                   u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2)),
                   u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)),
                   u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
      float* d = dst + j0 * ds + i0;
      _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d + ds, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    for (int64_t i = i0; i < i0 + 8; ++i)
      for (int64_t j = j0; j < cols; ++j) dst[j * ds + i] = src[i * ss + j];
  }
#endif
  for (int64_t i = i0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ds + i] = src[i * ss + j];
}

}  // namespace STSSA_KERNEL_NS
}  // namespace cpu
}  // namespace stssa
