// Fused SLBF convolution for the CPU (inference only, float32, NCHW).
//
// A layer with n filters over c = s*d input channels and a k x k kernel keeps a shared binary
// bank B (m x d x kh x kw, values +-1) and selections p(i, j). Its output is
//
//     z[j, t] = x_j (*) B[t]          (bank responses: m*c*kh*kw MACs per output pixel)
//     y[i]    = sum_j z[j, p(i, j)]    (merge: n*s adds per output pixel)
//
// times an optional per-filter scale, plus an optional bias.
//
// Work is cut into items (an image and a band of output rows, or a group of images, times a
// range of slices); the items run on PyTorch's threads (at::parallel_for). Inside an item:
//
// 1. The input rows the item needs are copied, zero padded and split into stride phases,
//    into a thread-local buffer L[channel][phase][row][col]; with the phases, outputs that
//    are neighbours in a row read neighbouring floats of L for every tap, whatever the stride.
// 2. Outputs are taken in tiles of V segments of 8 pixels (P = 8*V):
//    - direct mode: a segment is 8 neighbours in an output row, so every tap of a segment is
//      one unaligned vector load from L; no patch matrix is built;
//    - packed mode (images too small for segments of 8): the P pixels may come from several
//      rows and images; their patches are copied into Xp[d*kh*kw][P] per slice first.
// 3. For each slice j of the tile the bank responses Z[j][t][P] come from a register-blocked
//    micro-kernel: TR bank filters x V segments accumulate in registers over the d*kh*kw taps
//    (per tap: V vector loads, TR broadcasts of a +-1 bank value, TR*V fused multiply-adds;
//    TR*V + V + 1 <= 16 vector registers). Slices are done in chunks whose Z fits in L1.
// 4. Each chunk is merged at once while Z is in cache: Y[i][P] += sum_j Z[j][p(i, j)][P]
//    (vectors of 8 pixels, accumulators in registers, offsets of Z precomputed).
// 5. The last chunk writes scale*Y + bias straight to the NCHW output (or to a partial sum
//    when the slices were split over threads; those are added at the end). V is chosen per
//    shape by a small cost model of the micro-kernel (see tile_cost).
//
// Vectors are GCC/Clang vector extensions (8 floats), so the compiler emits AVX2/FMA with
// -march=native on x86 and the matching instructions elsewhere.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));

inline v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store8(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }

// Z[r][8v:8v+8] = sum_k bank[k*m + r] * xs[v][koff[k] + 0:8] for r < TR, v < V: TR bank
// filters over V segments of 8 pixels (segment v's inputs start at xs[v]).
template <int TR, int V>
void bank_block(const float* const* xs, const int64_t* __restrict koff, int64_t K,
                const float* __restrict bank, int64_t m, float* __restrict z) {
  const float* xb[V];
  for (int v = 0; v < V; ++v) xb[v] = xs[v];
  v8 acc[TR][V];
  for (int r = 0; r < TR; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = v8{};
  for (int64_t k = 0; k < K; ++k) {
    const int64_t ko = koff[k];
    v8 xv[V];
    for (int v = 0; v < V; ++v) xv[v] = load8(xb[v] + ko);
    const float* b = bank + k * m;
    for (int r = 0; r < TR; ++r) {
      const float br = b[r];
      for (int v = 0; v < V; ++v) acc[r][v] += xv[v] * br;
    }
  }
  for (int r = 0; r < TR; ++r)
    for (int v = 0; v < V; ++v) store8(z + (r * V + v) * 8, acc[r][v]);
}

using BlockFn = void (*)(const float* const*, const int64_t*, int64_t, const float*, int64_t,
                         float*);

// Bank filters per block: TR*V accumulators + V input vectors + 1 broadcast must fit in the 16
// vector registers of AVX2 (a spilled accumulator costs a store-to-load round trip per step).
template <int V>
constexpr int max_rows() {
  return V == 1 ? 12 : (V == 2 ? 6 : (V == 3 ? 4 : 2));
}

int max_rows_of(int V) { return V == 1 ? 12 : (V == 2 ? 6 : (V == 3 ? 4 : 2)); }

template <int V, std::size_t... R>
constexpr std::array<BlockFn, sizeof...(R)> block_table(std::index_sequence<R...>) {
  return {{&bank_block<static_cast<int>(R) + 1, V>...}};
}

template <int V>
BlockFn block_fn(int tr) {
  static constexpr auto table = block_table<V>(std::make_index_sequence<max_rows<V>()>{});
  return table[tr - 1];
}

// Sizes of the blocks (at most max_rows(V) filters each, as even as possible) covering m.
std::vector<int> block_rows(int64_t m, int V) {
  const int64_t tr_max = max_rows_of(V);
  const int64_t nb = (m + tr_max - 1) / tr_max;
  std::vector<int> rows;
  for (int64_t q = 0; q < nb; ++q) rows.push_back(static_cast<int>(m / nb + (q < m % nb)));
  return rows;
}

// Merge of one chunk of G slices into the P = 8*V pixels of every output i:
//   acc = (first ? 0 : Y[i]) + sum_{jl < G} Z[zoff[i*s + j0 + jl]][0:P]
// where zoff holds (jl*m + p(i, j)) * P. The sum goes to Y[i], or, when `outs` is given (last
// chunk of a tile of full segments), segment v goes to outs[v][i*HWo + 0:8] times scale[i]
// plus bias[i].
template <int V>
void merge(const float* __restrict Z, int64_t G, const int32_t* __restrict zoff, int64_t s,
           int64_t j0, int64_t n, float* __restrict Y, bool first, float* const* outs,
           int64_t HWo, const float* scale, const float* bias) {
  constexpr int64_t P = 8 * V;
  for (int64_t i = 0; i < n; ++i) {
    v8 acc[V];
    float* yi = Y + i * P;
    for (int v = 0; v < V; ++v) acc[v] = first ? v8{} : load8(yi + 8 * v);
    const int32_t* zo = zoff + i * s + j0;
    for (int64_t jl = 0; jl < G; ++jl) {
      const float* zr = Z + zo[jl];
      for (int v = 0; v < V; ++v) acc[v] += load8(zr + 8 * v);
    }
    if (outs != nullptr) {
      const float sc = scale ? scale[i] : 1.0f, bi = bias ? bias[i] : 0.0f;
      for (int v = 0; v < V; ++v) store8(outs[v] + i * HWo, acc[v] * sc + bi);
    } else {
      for (int v = 0; v < V; ++v) store8(yi + 8 * v, acc[v]);
    }
  }
}

struct Geometry {
  int64_t N, C, H, W, n, m, d, s, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW;
  int64_t Hq, Wq, nph, KK, K, offh_max, offw_max;
  std::vector<int64_t> tap_phase, tap_offh, tap_offw;
};

struct Run {  // Y columns [p, p + len) go to out[off + i*OH*OW + 0:len]
  int64_t p, len, off;
};

struct Plan {
  bool packed;
  int V;
  int64_t bands, rows_per_band, groups, images_per_group, splits, per_split, slices_per_chunk;
  int64_t plane;    // floats per (channel, phase) plane of the local buffer
  int64_t threads;  // 1: run on the calling thread
};

// Copy channels [c0, c0+cn) of image b, phase rows [u0, u0+rows), zero padded and phase split,
// into L[cl][phase][plane] (plane >= rows*Wq; the tail is zeroed).
void fill(const Geometry& g, const float* x, int64_t b, int64_t c0, int64_t cn, int64_t u0,
          int64_t rows, int64_t plane, float* L) {
  for (int64_t cl = 0; cl < cn; ++cl) {
    const float* xc = x + ((b * g.C) + c0 + cl) * g.H * g.W;
    for (int64_t a = 0; a < g.SH; ++a) {
      for (int64_t bp = 0; bp < g.SW; ++bp) {
        float* dst = L + (cl * g.nph + a * g.SW + bp) * plane;
        for (int64_t u = 0; u < rows; ++u) {
          float* row = dst + u * g.Wq;
          const int64_t ir = (u0 + u) * g.SH + a - g.PH;
          if (ir < 0 || ir >= g.H) {
            std::fill(row, row + g.Wq, 0.0f);
            continue;
          }
          const float* xr = xc + ir * g.W;
          if (g.SW == 1) {
            const int64_t lo = std::min(g.PW, g.Wq);
            const int64_t hi = std::min(g.Wq, g.PW + g.W);
            std::fill(row, row + lo, 0.0f);
            if (hi > lo) std::memcpy(row + lo, xr + (lo - g.PW), (hi - lo) * sizeof(float));
            std::fill(row + std::max(hi, lo), row + g.Wq, 0.0f);
          } else {
            for (int64_t v = 0; v < g.Wq; ++v) {
              const int64_t ic = v * g.SW + bp - g.PW;
              row[v] = (ic >= 0 && ic < g.W) ? xr[ic] : 0.0f;
            }
          }
        }
        std::fill(dst + rows * g.Wq, dst + plane, 0.0f);
      }
    }
  }
}

void write_runs(const float* Y, int64_t P, const std::vector<Run>& runs, int64_t n,
                int64_t HWo, float* out, const float* scale, const float* bias) {
  for (int64_t i = 0; i < n; ++i) {
    const float sc = scale ? scale[i] : 1.0f;
    const float bi = bias ? bias[i] : 0.0f;
    const float* yi = Y + i * P;
    for (const Run& r : runs) {
      float* o = out + r.off + i * HWo;
      const float* src = yi + r.p;
      for (int64_t e = 0; e < r.len; ++e) o[e] = src[e] * sc + bi;
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t ceil8(int64_t a) { return (a + 7) / 8; }

template <int V>
struct Worker {
  static constexpr int64_t P = 8 * V;
  const Geometry& g;
  const Plan& pl;
  const float* x;
  const float* bank;    // [K][m]
  const int32_t* zoff;  // [n][s]: offset of Z[j % G][p(i, j)]
  std::vector<std::pair<int, BlockFn>> blocks;  // (rows, fn) covering the m bank filters
  std::unique_ptr<float[]> L, Z, Y, Xp;         // every value is written before it is read
  std::vector<int64_t> koff, pix, pk;
  std::vector<Run> runs;

  Worker(const Geometry& g_, const Plan& pl_, const float* x_, const float* bank_,
         const int32_t* zoff_, int64_t local_floats)
      : g(g_), pl(pl_), x(x_), bank(bank_), zoff(zoff_) {
    for (int tr : block_rows(g.m, V)) blocks.emplace_back(tr, block_fn<V>(tr));
    L.reset(new float[local_floats]);
    Z.reset(new float[pl.slices_per_chunk * g.m * P]);
    Y.reset(new float[g.n * P]);
    Xp.reset(new float[g.K * P]);
    koff.assign(g.K, 0);
    pix.assign(P, -1);
    pk.resize(g.K);
    for (int64_t k = 0; k < g.K; ++k) pk[k] = k * P;
  }

  // Offsets of tap (cl, t) inside one slice of L, whose planes hold `plane` floats.
  void set_koff(int64_t plane) {
    for (int64_t cl = 0; cl < g.d; ++cl)
      for (int64_t t = 0; t < g.KK; ++t)
        koff[cl * g.KK + t] =
            (cl * g.nph + g.tap_phase[t]) * plane + g.tap_offh[t] * g.Wq + g.tap_offw[t];
  }

  // One tile of V segments of 8 pixels over slices [j0, j1): bank responses chunk by chunk,
  // each merged at once. xs[v] is segment v's first input in slice j0 (direct) or, packed,
  // Xp + 8v (the patches are copied from `src` = slice j0's part of L for the pixels in
  // `pix`); slices are `sstride` floats apart. With `outs`, the last chunk writes the result
  // there (scaled and biased); otherwise it stays in Y.
  void tile(const float* src, const float* const* xs, int64_t sstride, int64_t j0, int64_t j1,
            bool pack, float* const* outs, int64_t HWo, const float* scale, const float* bias) {
    const float* xj[V];
    for (int64_t j = j0; j < j1; j += pl.slices_per_chunk) {
      const int64_t G = std::min(pl.slices_per_chunk, j1 - j);
      for (int64_t jl = 0; jl < G; ++jl) {
        const int64_t shift = (j - j0 + jl) * sstride;
        const int64_t* ko = koff.data();
        if (pack) {  // gather the patches of the P pixels into Xp[K][P]
          for (int64_t k = 0; k < g.K; ++k) {
            const float* sk = src + shift + koff[k];
            float* dst = Xp.get() + k * P;
            for (int64_t p = 0; p < P; ++p) dst[p] = pix[p] >= 0 ? sk[pix[p]] : 0.0f;
          }
          for (int v = 0; v < V; ++v) xj[v] = Xp.get() + 8 * v;
          ko = pk.data();
        } else {
          for (int v = 0; v < V; ++v) xj[v] = xs[v] + shift;
        }
        float* zj = Z.get() + jl * g.m * P;
        int64_t t0 = 0;
        for (const auto& [tr, fn] : blocks) {
          fn(xj, ko, g.K, bank + t0, g.m, zj + t0 * P);
          t0 += tr;
        }
      }
      const bool last = j + G >= j1;
      merge<V>(Z.get(), G, zoff, g.s, j, g.n, Y.get(), j == j0, last ? outs : nullptr, HWo,
               scale, bias);
    }
  }

  // Direct mode: image b, output rows [oh0, oh1), slices [j0, j1). The band's outputs are cut
  // into segments of 8 neighbours in a row (the last of a row may be shorter); a tile is V
  // segments, and each tap of a segment reads 8 neighbouring floats of L.
  void direct(int64_t b, int64_t oh0, int64_t oh1, int64_t j0, int64_t j1, float* out,
              const float* scale, const float* bias) {
    const int64_t rows = (oh1 - oh0) + g.offh_max;
    fill(g, x, b, j0 * g.d, (j1 - j0) * g.d, oh0, rows, pl.plane, L.get());
    set_koff(pl.plane);
    const int64_t sstride = g.d * g.nph * pl.plane;
    const int64_t HWo = g.OH * g.OW;
    const int64_t per_row = ceil8(g.OW);
    const int64_t count = (oh1 - oh0) * per_row;
    const float* xs[V];
    float* outs[V];
    for (int64_t q0 = 0; q0 < count; q0 += V) {
      runs.clear();
      bool full = true;
      for (int v = 0; v < V; ++v) {
        const int64_t q = std::min(q0 + v, count - 1);  // a missing segment repeats the last
        const int64_t oh = oh0 + q / per_row, ow = (q % per_row) * 8;
        xs[v] = L.get() + (oh - oh0) * g.Wq + ow;
        outs[v] = out + b * g.n * HWo + oh * g.OW + ow;
        const int64_t len = q0 + v < count ? std::min<int64_t>(8, g.OW - ow) : 0;
        full = full && len == 8;
        if (len > 0) runs.push_back({8 * v, len, b * g.n * HWo + oh * g.OW + ow});
      }
      tile(nullptr, xs, sstride, j0, j1, false, full ? outs : nullptr, HWo, scale, bias);
      if (!full) write_runs(Y.get(), P, runs, g.n, HWo, out, scale, bias);
    }
  }

  // Packed mode: images [b0, b1), slices [j0, j1). A tile is P outputs in (image, row,
  // column) order; their patches are copied into Xp for each slice.
  void packed(int64_t b0, int64_t b1, int64_t j0, int64_t j1, float* out, const float* scale,
              const float* bias) {
    const int64_t cn = (j1 - j0) * g.d;
    const int64_t img = cn * g.nph * pl.plane;
    for (int64_t b = b0; b < b1; ++b)
      fill(g, x, b, j0 * g.d, cn, 0, g.Hq, pl.plane, L.get() + (b - b0) * img);
    set_koff(pl.plane);
    const int64_t sstride = g.d * g.nph * pl.plane;
    const int64_t HWo = g.OH * g.OW;
    const int64_t total = (b1 - b0) * HWo;
    for (int64_t p0 = 0; p0 < total; p0 += P) {
      runs.clear();
      for (int64_t p = 0; p < P; ++p) {
        const int64_t gp = p0 + p;
        if (gp >= total) {
          pix[p] = -1;
          continue;
        }
        const int64_t im = gp / HWo, r = gp % HWo, oh = r / g.OW, ow = r % g.OW;
        pix[p] = im * img + oh * g.Wq + ow;
        if (runs.empty() || r == 0) runs.push_back({p, 0, (b0 + im) * g.n * HWo + r});
        runs.back().len += 1;
      }
      if (runs.size() == 1 && runs[0].len == P) {
        float* outs[V];
        for (int v = 0; v < V; ++v) outs[v] = out + runs[0].off + 8 * v;
        tile(L.get(), nullptr, sstride, j0, j1, true, outs, HWo, scale, bias);
      } else {
        tile(L.get(), nullptr, sstride, j0, j1, true, nullptr, HWo, scale, bias);
        write_runs(Y.get(), P, runs, g.n, HWo, out, scale, bias);
      }
    }
  }
};

Geometry make_geometry(const std::vector<int64_t>& xs, int64_t n, int64_t m, int64_t d,
                       int64_t KH, int64_t KW, const std::vector<int64_t>& stride,
                       const std::vector<int64_t>& padding,
                       const std::vector<int64_t>& dilation) {
  Geometry g;
  g.N = xs[0], g.C = xs[1], g.H = xs[2], g.W = xs[3];
  g.n = n, g.m = m, g.d = d, g.s = g.C / d, g.KH = KH, g.KW = KW;
  g.SH = stride[0], g.SW = stride[1], g.PH = padding[0], g.PW = padding[1];
  g.DH = dilation[0], g.DW = dilation[1];
  const int64_t Hp = g.H + 2 * g.PH, Wp = g.W + 2 * g.PW;
  g.OH = (Hp - g.DH * (KH - 1) - 1) / g.SH + 1;
  g.OW = (Wp - g.DW * (KW - 1) - 1) / g.SW + 1;
  g.Hq = ceil_div(Hp, g.SH), g.Wq = ceil_div(Wp, g.SW), g.nph = g.SH * g.SW;
  g.KK = KH * KW, g.K = d * g.KK;
  g.offh_max = (KH - 1) * g.DH / g.SH, g.offw_max = (KW - 1) * g.DW / g.SW;
  for (int64_t kh = 0; kh < KH; ++kh) {
    for (int64_t kw = 0; kw < KW; ++kw) {
      const int64_t rh = kh * g.DH, rw = kw * g.DW;
      g.tap_phase.push_back((rh % g.SH) * g.SW + rw % g.SW);
      g.tap_offh.push_back(rh / g.SH);
      g.tap_offw.push_back(rw / g.SW);
    }
  }
  return g;
}

// Estimated cycles per output pixel of the bank responses with tiles of 8*V pixels, of which a
// fraction `used` are real outputs. Per tap, a block of TR filters takes about
// max(TR*V/2 FMAs on 2 ports, (TR + V + 1)/2 loads on 2 ports, 5 cycles of FMA latency).
double tile_cost(int64_t m, int V, double used, bool pack) {
  double cycles = 0.0;
  for (int tr : block_rows(m, V))
    cycles += std::max({tr * V / 2.0, (tr + V + 1) / 2.0, 5.0});
  if (pack) cycles += 8.0 * V;  // copying the patch: about one cycle per float
  return cycles / (8.0 * V * used);
}

// The cheapest tile width: direct tiles hold segments of 8 of the `count` outputs of a row;
// packed tiles hold 8*V of the `count` outputs of a group.
std::pair<int, double> best_width(int64_t m, int64_t count, bool pack) {
  std::pair<int, double> best{1, 1e300};
  for (int V = 1; V <= 4; ++V) {
    const int64_t unit = pack ? 8 * V : 8;
    const double used = static_cast<double>(count) / (ceil_div(count, unit) * unit);
    const double cost = tile_cost(m, V, used, pack);
    if (cost < best.second * 0.999) best = {V, cost};
  }
  return best;
}

// mode: 0 = choose, 1 = direct, 2 = packed. threads: the number the items are cut for.
Plan make_plan(const Geometry& g, int64_t mode, int64_t threads) {
  Plan pl{};
  // Below about a million MACs, waking other threads costs more than it saves.
  const double macs = static_cast<double>(g.N) * g.OH * g.OW * g.m * g.C * g.KK;
  if (macs < 1e6) threads = 1;
  pl.threads = threads;
  const int64_t HWo = g.OH * g.OW;
  const auto direct = best_width(g.m, g.OW, false);
  const auto packed = best_width(g.m, g.N * HWo, true);
  pl.packed = mode == 2 || (mode == 0 && packed.second < direct.second);
  pl.V = pl.packed ? packed.first : direct.first;
  const int64_t P = 8 * pl.V;
  const int64_t target = threads > 1 ? 4 * threads : 1;
  int64_t items;
  if (pl.packed) {
    pl.images_per_group = std::max<int64_t>(1, ceil_div(P, HWo));
    // Spread the images over the threads when there are few.
    pl.images_per_group =
        std::min(pl.images_per_group, std::max<int64_t>(1, g.N / std::min(target, g.N)));
    pl.groups = ceil_div(g.N, pl.images_per_group);
    pl.bands = 1, pl.rows_per_band = g.OH;
    pl.plane = g.Hq * g.Wq;
    items = pl.groups;
  } else {
    pl.bands = g.N >= target ? 1 : std::min(g.OH, ceil_div(target, g.N));
    pl.rows_per_band = ceil_div(g.OH, pl.bands);
    // Keep the local copy of the input within about 512 KiB (an L2 cache).
    const int64_t cap = 131072 / std::max<int64_t>(1, g.C * g.nph * g.Wq) - g.offh_max;
    pl.rows_per_band = std::max<int64_t>(1, std::min(pl.rows_per_band, cap));
    pl.bands = ceil_div(g.OH, pl.rows_per_band);
    const int64_t rows = pl.rows_per_band + g.offh_max;
    // The last segment of the last row reads up to ceil8(OW)*8 + offw_max floats into it.
    pl.plane = std::max(rows * g.Wq, (rows - 1) * g.Wq + ceil8(g.OW) * 8 + g.offw_max);
    pl.groups = g.N, pl.images_per_group = 1;
    items = g.N * pl.bands;
  }
  const bool enough = threads <= 1 || items >= 2 * threads;
  pl.splits = enough ? 1 : std::min(g.s, ceil_div(2 * threads, items));
  pl.per_split = ceil_div(g.s, pl.splits);
  // Chunks of slices whose responses fit in 32 KiB; splits start at a chunk boundary.
  pl.slices_per_chunk = std::max<int64_t>(1, std::min(pl.per_split, 8192 / (g.m * P)));
  pl.per_split = ceil_div(pl.per_split, pl.slices_per_chunk) * pl.slices_per_chunk;
  pl.splits = ceil_div(g.s, pl.per_split);
  return pl;
}

template <int V>
void run(const Geometry& g, const Plan& pl, const float* x, const float* bank,
         const int32_t* idx, float* out, const float* scale, const float* bias, float* partial) {
  constexpr int64_t P = 8 * V;
  std::vector<int32_t> zoff(g.n * g.s);
  for (int64_t i = 0; i < g.n; ++i)
    for (int64_t j = 0; j < g.s; ++j)
      zoff[i * g.s + j] =
          static_cast<int32_t>(((j % pl.slices_per_chunk) * g.m + idx[i * g.s + j]) * P);
  const int64_t outer = pl.packed ? pl.groups : g.N * pl.bands;
  const int64_t items = outer * pl.splits;
  const int64_t cn = pl.per_split * g.d;
  const int64_t local = pl.packed ? pl.images_per_group * cn * g.nph * pl.plane
                                  : cn * g.nph * pl.plane;
  at::parallel_for(0, items, pl.threads > 1 ? 1 : items, [&](int64_t begin, int64_t end) {
    Worker<V> w(g, pl, x, bank, zoff.data(), local);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t o = it / pl.splits, sp = it % pl.splits;
      const int64_t j0 = sp * pl.per_split, j1 = std::min(g.s, j0 + pl.per_split);
      float* dst = out;
      const float* sc = scale;
      const float* bi = bias;
      if (pl.splits > 1) {
        dst = partial + sp * g.N * g.n * g.OH * g.OW;
        sc = nullptr, bi = nullptr;
      }
      if (pl.packed) {
        const int64_t b0 = o * pl.images_per_group;
        w.packed(b0, std::min(g.N, b0 + pl.images_per_group), j0, j1, dst, sc, bi);
      } else {
        const int64_t b = o / pl.bands, band = o % pl.bands;
        const int64_t oh0 = band * pl.rows_per_band;
        w.direct(b, oh0, std::min(g.OH, oh0 + pl.rows_per_band), j0, j1, dst, sc, bi);
      }
    }
  });
  if (pl.splits > 1) {  // out = scale * sum of the partial sums + bias
    const int64_t HWo = g.OH * g.OW, total = g.N * g.n * HWo;
    at::parallel_for(0, g.N * g.n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bi = begin; bi < end; ++bi) {
        const int64_t i = bi % g.n;
        const float s = scale ? scale[i] : 1.0f, c = bias ? bias[i] : 0.0f;
        float* o = out + bi * HWo;
        for (int64_t e = 0; e < HWo; ++e) {
          float acc = 0.0f;
          for (int64_t sp = 0; sp < pl.splits; ++sp) acc += partial[sp * total + bi * HWo + e];
          o[e] = acc * s + c;
        }
      }
    });
  }
}

void check_inputs(const torch::Tensor& x, const torch::Tensor& bank_t, const torch::Tensor& idx,
                  int64_t d, int64_t KH, int64_t KW) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 4,
              "slbf kernel: x must be a float32 CPU tensor (N, C, H, W)");
  TORCH_CHECK(bank_t.scalar_type() == torch::kFloat && bank_t.dim() == 2 &&
                  bank_t.size(0) == d * KH * KW && bank_t.is_contiguous(),
              "slbf kernel: bank must be contiguous float32 (d*kh*kw, m)");
  TORCH_CHECK(idx.scalar_type() == torch::kInt && idx.dim() == 2 && idx.is_contiguous(),
              "slbf kernel: indices must be contiguous int32 (n, s)");
  TORCH_CHECK(d > 0 && x.size(1) % d == 0 && idx.size(1) == x.size(1) / d,
              "slbf kernel: slice width must divide the channels, indices must be (n, c/d)");
  const int64_t m = bank_t.size(1);
  const int32_t* ip = idx.data_ptr<int32_t>();
  bool ok = m >= 1;
  for (int64_t e = 0; e < idx.numel(); ++e) ok = ok && ip[e] >= 0 && ip[e] < m;
  TORCH_CHECK(ok, "slbf kernel: selection index outside the bank");
}

}  // namespace

// y = slbf_conv2d(x, bank_t[K, m], idx[n, s], scale?, bias?, kernel (kh, kw), stride, padding,
//                 dilation, mode)
torch::Tensor slbf_conv2d(const torch::Tensor& x_in, const torch::Tensor& bank_t,
                          const torch::Tensor& idx, const c10::optional<torch::Tensor>& scale,
                          const c10::optional<torch::Tensor>& bias, std::vector<int64_t> kernel,
                          std::vector<int64_t> stride, std::vector<int64_t> padding,
                          std::vector<int64_t> dilation, int64_t mode) {
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "slbf kernel: kernel, stride, padding and dilation must be pairs");
  const int64_t KH = kernel[0], KW = kernel[1];
  const int64_t d = KH * KW > 0 ? bank_t.size(0) / (KH * KW) : 0;
  check_inputs(x_in, bank_t, idx, d, KH, KW);
  const torch::Tensor x = x_in.contiguous();
  const Geometry g = make_geometry(x.sizes().vec(), idx.size(0), bank_t.size(1), d, KH, KW, stride, padding,
                                   dilation);
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "slbf kernel: the output would be empty");
  auto opts = x.options();
  torch::Tensor out = torch::empty({g.N, g.n, g.OH, g.OW}, opts);
  if (g.N == 0) return out;
  torch::Tensor sc, bi;
  if (scale.has_value()) sc = scale->contiguous().to(torch::kFloat);
  if (bias.has_value()) bi = bias->contiguous().to(torch::kFloat);
  const Plan pl = make_plan(g, mode, at::get_num_threads());
  torch::Tensor partial;
  if (pl.splits > 1) partial = torch::empty({pl.splits, g.N, g.n, g.OH, g.OW}, opts);
  const float* scp = sc.defined() ? sc.data_ptr<float>() : nullptr;
  const float* bip = bi.defined() ? bi.data_ptr<float>() : nullptr;
  float* pp = partial.defined() ? partial.data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  const float* bp = bank_t.data_ptr<float>();
  const int32_t* ip = idx.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  switch (pl.V) {
    case 1: run<1>(g, pl, xp, bp, ip, op, scp, bip, pp); break;
    case 2: run<2>(g, pl, xp, bp, ip, op, scp, bip, pp); break;
    case 3: run<3>(g, pl, xp, bp, ip, op, scp, bip, pp); break;
    default: run<4>(g, pl, xp, bp, ip, op, scp, bip, pp); break;
  }
  return out;
}

// The plan the kernel would use for this call, for tests and benchmarks.
std::vector<int64_t> slbf_plan(std::vector<int64_t> x_shape, int64_t n, int64_t m, int64_t d,
                               std::vector<int64_t> kernel, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, std::vector<int64_t> dilation,
                               int64_t mode, int64_t threads) {
  TORCH_CHECK(x_shape.size() == 4 && kernel.size() == 2, "slbf_plan: bad shapes");
  const Geometry g = make_geometry(x_shape, n, m, d, kernel[0], kernel[1], stride, padding,
                                   dilation);
  const Plan pl = make_plan(g, mode, threads);
  return {pl.packed ? 2 : 1, pl.V, pl.bands, pl.groups, pl.splits, pl.slices_per_chunk,
          pl.threads};
}

std::string build_info() {
  std::string isa;
#if defined(__AVX512F__)
  isa += "avx512f ";
#endif
#if defined(__AVX2__)
  isa += "avx2 ";
#endif
#if defined(__FMA__)
  isa += "fma ";
#endif
#if defined(__ARM_NEON)
  isa += "neon ";
#endif
  if (isa.empty()) isa = "generic ";
  isa.pop_back();
  return isa;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("slbf_conv2d", &slbf_conv2d, "Fused SLBF convolution (float32, NCHW, CPU)");
  mod.def("slbf_plan", &slbf_plan, "The work plan of slbf_conv2d for a shape");
  mod.def("build_info", &build_info, "Instruction sets the kernel was compiled for");
}
