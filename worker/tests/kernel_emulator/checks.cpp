// Randomized checks of every kernel in worker/src/backend/cuda/kernel_src.rs, run on the CPU.
//
// tests/cuda_kernels_emulated.rs writes kernel_src::source(), rewritten for stub.h, to
// kernels_emulated.h next to this file, compiles the three with the host C++ compiler and runs
// the result. So the exact generated kernels execute here, thread by thread, and their outputs
// are compared with references that are C++ ports of the Rust CPU code in worker/src:
//   route_topk            moe.rs Router::route_one and top_k_indices (bit for bit: ids and weights)
//   attention             attention.rs forward: scaled dot products, softmax, weighted values
//                         (computed naively in double; paged KV, GQA, sliding window, padding rows)
//   rope                  kernels.rs Rope::cos_sin / Rope::apply (split halves and interleaved)
//   rmsnorm               kernels.rs rmsnorm / rmsnorm_inplace
//   silu_mul              kernels.rs silu_mul_fused
//   shared_gate           moe.rs MoeLayer::shared_forward's gate: y * sigmoid(dot(x, g))
//   moe_align             the grouping it documents: every choice once, in a tile of its expert,
//                         tiles in expert order, padding -1, src_row pointing back; bad ids flagged
//   expert_gemm_*         per grouped row, W_e · x[token] with x rounded to W's dtype (naive, in
//                         double); padding rows 0, a missing expert flagged, another launch's
//                         experts left alone
//   cast_f32_bf16         half::bf16::from_f32 (round to nearest even, quiet NaN)
//   the rest              direct restatements of the documented data movement (embed_rows_*,
//                         cast_f32_f16, add_inplace, add_bias, clamp_inplace, kv_write,
//                         gather_rows, combine_rows, split_cols, mla_assemble)
// Launch shapes follow backend/cuda/geometry.rs; some grids are deliberately smaller than the
// work so the kernels' grid-stride loops are exercised too.
//
// Each check prints its name and max error (or how many values differ, for exact checks); the
// exit status is nonzero when any check fails.
#include "stub.h"
#include "kernels_emulated.h"

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>

static std::mt19937 rng(12345);
static float urand(float a = -1, float b = 1) { return std::uniform_real_distribution<float>(a, b)(rng); }
static std::vector<float> rv(size_t n, float a = -1, float b = 1) {
  std::vector<float> v(n);
  for (auto& x : v) x = urand(a, b);
  return v;
}

static std::string fmt(const char* f, ...) {
  char buf[256];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

static int n_checks = 0, n_failures = 0;

// A toleranced check: max |got - want| over all elements, NaN on one side only counts as inf.
static double max_err(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return INFINITY;
  double m = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i]) && std::isnan(want[i])) continue;
    const double d = std::fabs((double)got[i] - want[i]);
    if (!(d <= m)) m = d;  // NaN or larger
  }
  return std::isnan(m) ? INFINITY : m;
}

static void near(const std::string& name, const std::vector<float>& got, const std::vector<float>& want, double tol) {
  const double e = max_err(got, want);
  const bool ok = e <= tol;
  ++n_checks;
  n_failures += !ok;
  printf("%-4s %-58s max err %.3g (tol %.3g)\n", ok ? "ok" : "FAIL", name.c_str(), e, tol);
}

// An exact check: values must match bit for bit (any two NaNs match).
template <class T>
static void exact(const std::string& name, const std::vector<T>& got, const std::vector<T>& want) {
  size_t differ = got.size() == want.size() ? 0 : std::max(got.size(), want.size());
  double e = 0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    if constexpr (std::is_same_v<T, float>) {
      if (std::isnan(got[i]) && std::isnan(want[i])) continue;
      if (__float_as_uint(got[i]) != __float_as_uint(want[i])) {
        ++differ;
        const double d = std::fabs((double)got[i] - want[i]);
        e = std::isnan(d) ? INFINITY : std::max(e, d);
      }
    } else if (got[i] != want[i]) {
      ++differ;
      e = std::max(e, std::fabs((double)got[i] - (double)want[i]));
    }
  }
  ++n_checks;
  n_failures += differ != 0;
  printf("%-4s %-58s max err %.3g (exact: %zu of %zu differ)\n", differ ? "FAIL" : "ok", name.c_str(), e, differ, want.size());
}

// ---- route_topk: port of moe.rs Router::route_one and top_k_indices ----

// f32::total_cmp's key.
static int32_t total_key(float f) {
  int32_t i;
  memcpy(&i, &f, 4);
  return i ^ (int32_t)(((uint32_t)(i >> 31)) >> 1);
}

// Indices of the k largest values, largest first, ties to the lower index, NaN as -inf.
static std::vector<int> top_k_indices(const std::vector<float>& v, size_t k) {
  std::vector<int> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0);
  auto key = [&](int i) { return std::isnan(v[i]) ? total_key(-INFINITY) : total_key(v[i]); };
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return key(a) != key(b) ? key(a) > key(b) : a < b; });
  idx.resize(std::min(k, v.size()));
  return idx;
}

struct RouterCfg {
  int n_experts, k, scoring, has_bias, n_group, topk_group, group_score;
  float masked_value;
  int norm_topk;
  float norm_eps, scaling;
};

static void route_one(const RouterCfg& c, std::vector<float> scores, const std::vector<float>& bias, unsigned* ids, float* ws) {
  const int e = c.n_experts;
  if (c.scoring == 0) {  // kernels.rs softmax_inplace
    float mx = -INFINITY;
    for (float v : scores) mx = std::fmax(mx, v);
    float s = 0;
    for (auto& v : scores) { v = expf(v - mx); s += v; }
    const float inv = 1.0f / s;
    for (auto& v : scores) v *= inv;
  } else {
    for (auto& v : scores) v = 1.0f / (1.0f + expf(-v));
  }
  std::vector<float> choice = scores;
  if (c.has_bias) for (int i = 0; i < e; ++i) choice[i] = scores[i] + bias[i];
  std::vector<float> weight_src = scores;
  if (c.n_group > 0) {
    const int per = e / c.n_group;
    std::vector<float> group_scores;
    for (int g = 0; g < c.n_group; ++g) {
      std::vector<float> grp(choice.begin() + g * per, choice.begin() + (g + 1) * per);
      if (c.group_score == 0) {
        float m = -INFINITY;
        for (float v : grp) m = std::fmax(m, v);
        group_scores.push_back(m);
      } else {
        float s = -0.0f;  // f32's Sum starts at -0.0 (as the kernel's sum of one or two values)
        for (int i : top_k_indices(grp, 2)) s += grp[i];
        group_scores.push_back(s);
      }
    }
    std::vector<bool> keep(c.n_group);
    for (int i : top_k_indices(group_scores, c.topk_group)) keep[i] = true;
    for (int g = 0; g < c.n_group; ++g)
      if (!keep[g]) for (int i = 0; i < per; ++i) choice[g * per + i] = c.masked_value;
    if (!c.has_bias) weight_src = choice;
  }
  const auto top = top_k_indices(choice, c.k);
  for (int j = 0; j < c.k; ++j) { ids[j] = 0; ws[j] = 0; }
  float sum = 0;
  for (size_t j = 0; j < top.size(); ++j) {
    ids[j] = top[j];
    ws[j] = weight_src[top[j]];
    sum += ws[j];
  }
  if (c.norm_topk) {
    const float d = sum + c.norm_eps;
    for (int j = 0; j < c.k; ++j) ws[j] /= d;
  }
  if (c.scaling != 1.0f) for (int j = 0; j < c.k; ++j) ws[j] *= c.scaling;
}

static void check_route_topk() {
  const int shapes[][2] = {{8, 1}, {8, 2}, {8, 4}, {8, 8}, {16, 4}, {6, 3}, {4, 4}, {12, 2}, {1, 1}};
  const int trials = 360;
  std::vector<unsigned> all_ids, all_ref_ids;
  std::vector<float> all_w, all_ref_w;
  int bad_trials = 0;
  for (int trial = 0; trial < trials; ++trial) {
    RouterCfg c;
    const auto sh = shapes[trial % 9];
    c.n_experts = sh[0];
    const int ng = sh[1];
    c.n_group = (trial / 9) % 3 == 0 ? 0 : ng;
    c.topk_group = 1 + (int)(rng() % (ng + 1)) - (trial % 7 == 0 ? 1 : 0);  // 0 ..= ng + 1
    c.group_score = trial & 1;
    c.scoring = (trial >> 1) & 1;
    c.has_bias = (trial >> 2) & 1;
    c.masked_value = (trial >> 3) & 1 ? -INFINITY : 0.0f;
    c.norm_topk = (trial >> 4) & 1;
    c.norm_eps = 1e-20f;
    c.scaling = trial % 5 == 0 ? 2.5f : 1.0f;
    c.k = 1 + rng() % (c.n_experts + 1);  // up to n_experts + 1: padded slots
    const int rows = 1 + rng() % 70;      // more than one 64-thread block at times
    auto logits = rv((size_t)rows * c.n_experts, -3, 3), bias = rv(c.n_experts, -0.5, 0.5);
    // Ties, NaN and -inf logits.
    for (auto& v : logits) {
      const unsigned r = rng() % 10;
      if (r == 0) v = 0.5f;
      else if (r == 1 && trial % 3 == 0) v = NAN;
      else if (r == 2) v = -INFINITY;
    }
    if (trial % 4 == 0) for (auto& b : bias) b = 0.25f;
    std::vector<float> scratch((size_t)rows * 2 * c.n_experts), w((size_t)rows * c.k, -7), ref_w = w;
    std::vector<unsigned> ids((size_t)rows * c.k, 99), ref_ids = ids;
    launch(dim((rows + 63) / 64), dim(64), 0, [&] {
      route_topk(logits.data(), c.has_bias ? bias.data() : nullptr, scratch.data(), ids.data(), w.data(), rows, c.n_experts, c.k,
                 c.scoring, c.has_bias, c.n_group, c.topk_group, c.group_score, c.masked_value, c.norm_topk, c.norm_eps, c.scaling);
    });
    for (int r = 0; r < rows; ++r)
      route_one(c, std::vector<float>(logits.begin() + r * c.n_experts, logits.begin() + (r + 1) * c.n_experts), bias,
                &ref_ids[r * c.k], &ref_w[r * c.k]);
    bool same = ids == ref_ids;
    for (size_t i = 0; i < w.size(); ++i)
      same &= __float_as_uint(w[i]) == __float_as_uint(ref_w[i]) || (std::isnan(w[i]) && std::isnan(ref_w[i]));
    if (!same && ++bad_trials <= 5)
      printf("     route_topk differs: trial %d E=%d k=%d n_group=%d topk_group=%d group_score=%d scoring=%d has_bias=%d\n", trial,
             c.n_experts, c.k, c.n_group, c.topk_group, c.group_score, c.scoring, c.has_bias);
    all_ids.insert(all_ids.end(), ids.begin(), ids.end());
    all_ref_ids.insert(all_ref_ids.end(), ref_ids.begin(), ref_ids.end());
    all_w.insert(all_w.end(), w.begin(), w.end());
    all_ref_w.insert(all_ref_w.end(), ref_w.begin(), ref_w.end());
  }
  exact(fmt("route_topk ids (%d configs)", trials), all_ids, all_ref_ids);
  exact(fmt("route_topk weights (%d configs)", trials), all_w, all_ref_w);
}

// ---- attention: attention.rs forward, computed naively in double ----

static void check_attention() {
  struct Case { int rows, nh, nkv, qd, vd, page, window; };
  const Case cases[] = {{3, 4, 2, 16, 8, 4, 0}, {2, 2, 1, 24, 130, 16, 0}, {2, 4, 4, 8, 300, 5, 50}, {4, 3, 1, 12, 512, 7, 0}};
  for (auto cs : cases) {
    const int n_seq = 2, max_ctx = 300;  // 300 positions: three 128-position chunks
    const int pages_per_seq = (max_ctx + cs.page - 1) / cs.page;
    const int n_pages = n_seq * pages_per_seq + 3;
    std::vector<int> perm(n_pages);  // pages scattered over the pool
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int> table(perm.begin(), perm.begin() + n_seq * pages_per_seq), table_start = {0, pages_per_seq};
    const long long slots = (long long)n_pages * cs.page;
    auto K = rv(slots * cs.nkv * cs.qd), V = rv(slots * cs.nkv * cs.vd);
    std::vector<int> seq(cs.rows), pos(cs.rows);
    for (int r = 0; r < cs.rows; ++r) { seq[r] = r % n_seq; pos[r] = (int)(rng() % max_ctx); }
    pos[0] = max_ctx - 1;
    if (cs.rows > 1) pos[1] = 0;
    if (cs.rows > 3) seq[3] = -1;  // padding row: zeros
    auto Q = rv((size_t)cs.rows * cs.nh * cs.qd, -3, 3);
    const float scale = 1.0f / sqrtf((float)cs.qd);
    std::vector<float> out((size_t)cs.rows * cs.nh * cs.vd, 9), ref(out.size(), 0);
    for (int r = 0; r < cs.rows; ++r)
      for (int h = 0; h < cs.nh; ++h) {
        if (seq[r] < 0) continue;
        const int kvh = h / (cs.nh / cs.nkv), p = pos[r];
        const int first = cs.window > 0 ? std::max(0, p + 1 - cs.window) : 0;
        std::vector<double> sc;
        std::vector<long long> sl;
        for (int j = first; j <= p; ++j) {
          const long long s = (long long)table[table_start[seq[r]] + j / cs.page] * cs.page + j % cs.page;
          sl.push_back(s);
          double d = 0;
          for (int i = 0; i < cs.qd; ++i) d += (double)Q[((size_t)r * cs.nh + h) * cs.qd + i] * K[s * cs.nkv * cs.qd + kvh * cs.qd + i];
          sc.push_back(d * scale);
        }
        double mx = -1e300, sum = 0;
        for (double s : sc) mx = std::max(mx, s);
        for (auto& s : sc) { s = std::exp(s - mx); sum += s; }
        for (int d = 0; d < cs.vd; ++d) {
          double a = 0;
          for (size_t j = 0; j < sc.size(); ++j) a += sc[j] / sum * V[sl[j] * cs.nkv * cs.vd + kvh * cs.vd + d];
          ref[((size_t)r * cs.nh + h) * cs.vd + d] = (float)a;
        }
      }
    // geometry.rs attention: grid (rows, heads), 128 threads, (qd + 128) floats of dynamic smem.
    launch(dim(cs.rows, cs.nh), dim(128), (cs.qd + 128) * 4, [&] {
      attention(Q.data(), K.data(), V.data(), table.data(), table_start.data(), seq.data(), pos.data(), out.data(), cs.nh, cs.nkv,
                cs.qd, cs.vd, cs.page, scale, cs.window);
    });
    near(fmt("attention rows=%d heads=%d/%d qd=%d vd=%d page=%d window=%d", cs.rows, cs.nh, cs.nkv, cs.qd, cs.vd, cs.page, cs.window),
          out, ref, 1e-5);
  }
}

// ---- rope: kernels.rs Rope::cos_sin + Rope::apply ----

static void check_rope() {
  for (int interleaved = 0; interleaved < 2; ++interleaved)
    for (int half : {3, 64, 512}) {
      const int rows = 3, nh = 2, off = 5, stride = off + 2 * half + 3;
      const float factor = 0.9f;
      auto x = rv(rows * nh * stride), ref = x, inv_freq = rv(half, 0, 1);
      std::vector<int> pos = {0, 7, 1234};
      for (int r = 0; r < rows; ++r)
        for (int h = 0; h < nh; ++h) {
          float* v = &ref[(r * nh + h) * stride + off];
          if (interleaved) {
            std::vector<float> t(v, v + 2 * half);
            for (int i = 0; i < half; ++i) { v[i] = t[2 * i]; v[half + i] = t[2 * i + 1]; }
          }
          for (int i = 0; i < half; ++i) {
            const float a = v[i], b = v[half + i], ang = (float)pos[r] * inv_freq[i];
            const float c = cosf(ang) * factor, s = sinf(ang) * factor;
            v[i] = a * c - b * s;
            v[half + i] = b * c + a * s;
          }
        }
      // geometry.rs rope: grid (rows, heads); the half == 64 cases use a 2x1 grid instead so the
      // kernel's row and head loops take over.
      const uint3 grid = half == 64 ? dim(2, 1) : dim(rows, nh);
      launch(grid, dim(64), 0, [&] { rope(x.data(), pos.data(), inv_freq.data(), rows, nh, stride, off, half, factor, interleaved); });
      near(fmt("rope half=%d interleaved=%d grid=%ux%u", half, interleaved, grid.x, grid.y), x, ref, 1e-5);
    }
}

// ---- per-row kernels ----

static void check_rows() {
  const float eps = 1e-6f;
  for (int n : {1, 7, 256, 1000}) {  // kernels.rs rmsnorm
    const int rows = 3;
    auto x = rv(rows * n), w = rv(n);
    // Row 1 is small enough that eps matters (mean square ~3e-7 vs eps 1e-6), row 2 large.
    for (int i = 0; i < n; ++i) { x[n + i] *= 1e-3f; x[2 * n + i] *= 10.0f; }
    std::vector<float> y(x.size(), 9), ref(x.size());
    for (int r = 0; r < rows; ++r) {
      float ss = 0;
      for (int i = 0; i < n; ++i) ss += x[r * n + i] * x[r * n + i];
      ss /= n;
      const float inv = 1.0f / sqrtf(ss + eps);
      for (int i = 0; i < n; ++i) ref[r * n + i] = x[r * n + i] * inv * w[i];
    }
    launch(dim(2), dim(256), 0, [&] { rmsnorm(x.data(), w.data(), y.data(), rows, n, eps); });
    near(fmt("rmsnorm n=%d (grid 2 for 3 rows)", n), y, ref, 1e-5);
    launch(dim(rows), dim(256), 0, [&] { rmsnorm(x.data(), w.data(), x.data(), rows, n, eps); });
    near(fmt("rmsnorm n=%d in place", n), x, ref, 1e-5);
  }
  {  // moe.rs shared_forward's gate: y (the shared expert's output) *= sigmoid(dot(x, g))
    const int rows = 2, hidden = 300;
    auto x = rv(rows * hidden), g = rv(hidden), y = rv(rows * hidden), ref = y, ref_x = x;
    for (int r = 0; r < rows; ++r) {
      double d = 0;
      for (int i = 0; i < hidden; ++i) d += x[r * hidden + i] * g[i];
      const float s = 1.0f / (1.0f + expf(-(float)d));
      for (int i = 0; i < hidden; ++i) { ref[r * hidden + i] *= s; ref_x[r * hidden + i] *= s; }
    }
    launch(dim(rows), dim(256), 0, [&] { shared_gate(x.data(), g.data(), y.data(), rows, hidden); });
    near("shared_gate", y, ref, 1e-5);
    launch(dim(1), dim(256), 0, [&] { shared_gate(x.data(), g.data(), x.data(), rows, hidden); });
    near("shared_gate in place (grid 1 for 2 rows)", x, ref_x, 1e-5);
  }
  const int rows = 5, hidden = 40;
  auto x = rv(rows * hidden);
  {  // gather_rows: -1 is a padding row (zeros)
    std::vector<int> idx = {4, -1, 0, 2, 2};
    std::vector<float> out(rows * hidden, 9), ref(rows * hidden, 0);
    for (int r = 0; r < rows; ++r)
      if (idx[r] >= 0) for (int i = 0; i < hidden; ++i) ref[r * hidden + i] = x[idx[r] * hidden + i];
    launch(dim(rows), dim(256), 0, [&] { gather_rows(x.data(), idx.data(), out.data(), rows, hidden); });
    exact("gather_rows", out, ref);
  }
  {  // combine_rows: sum over j in order, skipping -1
    const int tokens = 3, k = 2;
    std::vector<int> src = {0, 3, -1, 1, 4, -1};
    std::vector<float> w = {0.25f, 0.75f, 5.f, 1.f, 0.5f, 3.f}, out(tokens * hidden, 7), ref(tokens * hidden, 0);
    for (int t = 0; t < tokens; ++t)
      for (int i = 0; i < hidden; ++i) {
        float s = 0;
        for (int j = 0; j < k; ++j)
          if (src[t * k + j] >= 0) s += w[t * k + j] * x[src[t * k + j] * hidden + i];
        ref[t * hidden + i] = s;
      }
    launch(dim(2), dim(256), 0, [&] { combine_rows(x.data(), src.data(), w.data(), out.data(), tokens, k, hidden); });
    exact("combine_rows (grid 2 for 3 tokens)", out, ref);
  }
  {  // kv_write: -1 has no slot
    std::vector<float> pool(10 * hidden, 3);
    std::vector<int> slots = {7, -1, 2, 9, 0};
    auto ref = pool;
    for (int r = 0; r < rows; ++r)
      if (slots[r] >= 0) for (int i = 0; i < hidden; ++i) ref[slots[r] * hidden + i] = x[r * hidden + i];
    launch(dim(rows), dim(256), 0, [&] { kv_write(x.data(), pool.data(), slots.data(), rows, hidden); });
    exact("kv_write", pool, ref);
  }
}

// ---- 16-bit conversions and embedding rows ----

static unsigned short bf16_ref(float f) {  // round to nearest even; NaN stays a quiet NaN
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffff) > 0x7f800000) return (u >> 16) | 0x40;
  return (unsigned short)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static float f16_bits_to_f32(unsigned short h) {  // independent of stub.h's _Float16
  const int s = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  const float v = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexpf((float)(m | 0x400), e - 25);
  return s ? -v : v;
}

static void check_conversions() {
  const int n = 1000;
  auto x = rv(n, -100, 100);
  // NaN, inf, bf16 overflow on rounding, ties (even down, odd up), -0, a subnormal, f16 limits.
  const float special[] = {NAN, INFINITY, 3.4e38f, 1.00390625f, 1.01171875f, -0.0f, 1e-40f, 65504.0f, 65520.0f, 6e-8f, -1e-3f};
  std::copy(std::begin(special), std::end(special), x.begin());
  std::vector<unsigned short> y(n), want(n);
  launch(dim(2), dim(256), 0, [&] { cast_f32_bf16(x.data(), y.data(), n); });
  for (int i = 0; i < n; ++i) want[i] = bf16_ref(x[i]);
  exact("cast_f32_bf16 (round to nearest even)", y, want);
  launch(dim(1), dim(256), 0, [&] { cast_f32_f16(x.data(), y.data(), n); });
  for (int i = 0; i < n; ++i) want[i] = ptx_cvt_rn_f16_f32(x[i]);  // the instruction itself is emulated
  exact("cast_f32_f16 (grid 1 for 1000)", y, want);

  // embed_rows_*: table rows picked by id, repeated ids, a grid smaller than the row count.
  const int table_rows = 6, hidden = 300;
  const std::vector<unsigned> ids = {5, 0, 5, 2, 1};
  const int rows = (int)ids.size();
  auto table = rv(table_rows * hidden, -70000, 70000);  // past the f16 range too
  std::vector<unsigned short> t_bf16(table.size()), t_f16(table.size());
  for (size_t i = 0; i < table.size(); ++i) { t_bf16[i] = bf16_ref(table[i]); t_f16[i] = ptx_cvt_rn_f16_f32(table[i]); }
  std::vector<float> ref32(rows * hidden), ref_bf16(rows * hidden), ref_f16(rows * hidden);
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < hidden; ++i) {
      const size_t s = ids[r] * hidden + i;
      ref32[r * hidden + i] = table[s];
      ref_bf16[r * hidden + i] = __uint_as_float((uint32_t)t_bf16[s] << 16);
      ref_f16[r * hidden + i] = f16_bits_to_f32(t_f16[s]);
    }
  std::vector<float> out(rows * hidden, 9);
  launch(dim(2), dim(256), 0, [&] { embed_rows_f32(table.data(), ids.data(), out.data(), rows, hidden); });
  exact("embed_rows_f32 (grid 2 for 5 rows)", out, ref32);
  std::fill(out.begin(), out.end(), 9);
  launch(dim(rows), dim(256), 0, [&] { embed_rows_bf16(t_bf16.data(), ids.data(), out.data(), rows, hidden); });
  exact("embed_rows_bf16", out, ref_bf16);
  std::fill(out.begin(), out.end(), 9);
  launch(dim(rows), dim(256), 0, [&] { embed_rows_f16(t_f16.data(), ids.data(), out.data(), rows, hidden); });
  exact("embed_rows_f16", out, ref_f16);
}

// ---- elementwise and reshaping kernels ----

static void check_elementwise() {
  const int rows = 3, m = 137;
  {  // add_bias
    auto a = rv(rows * m), b = rv(m), ref = a;
    for (int r = 0; r < rows; ++r) for (int i = 0; i < m; ++i) ref[r * m + i] += b[i];
    launch(dim(1), dim(256), 0, [&] { add_bias(a.data(), b.data(), rows, m); });
    exact("add_bias (grid 1)", a, ref);
  }
  {  // kernels.rs silu_mul_fused: rows are [gate | up]
    auto gu = rv(rows * 2 * m, -5, 5);
    std::vector<float> out(rows * m, 9), ref(rows * m);
    for (int r = 0; r < rows; ++r)
      for (int i = 0; i < m; ++i) {
        const float g = gu[r * 2 * m + i], u = gu[r * 2 * m + m + i];
        ref[r * m + i] = g / (1.0f + expf(-g)) * u;
      }
    launch(dim(1), dim(256), 0, [&] { silu_mul(gu.data(), out.data(), rows, m); });
    exact("silu_mul (grid 1)", out, ref);
  }
  {  // split_cols
    const int ac = 5, bc = 9;
    auto src = rv(rows * (ac + bc));
    std::vector<float> A(rows * ac, 9), B(rows * bc, 9), RA(rows * ac), RB(rows * bc);
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < ac; ++c) RA[r * ac + c] = src[r * (ac + bc) + c];
      for (int c = 0; c < bc; ++c) RB[r * bc + c] = src[r * (ac + bc) + ac + c];
    }
    launch(dim(1), dim(256), 0, [&] { split_cols(src.data(), A.data(), B.data(), rows, ac, bc); });
    A.insert(A.end(), B.begin(), B.end());
    RA.insert(RA.end(), RB.begin(), RB.end());
    exact("split_cols", A, RA);
  }
  {  // mla_assemble: k = [kv nope | k_pe shared by heads], v = kv's value part
    const int nh = 3, nope = 4, rd = 2, vd = 5;
    auto kv = rv(rows * nh * (nope + vd)), kpe = rv(rows * rd);
    std::vector<float> K(rows * nh * (nope + rd), 9), V(rows * nh * vd, 9), RK(K.size()), RV(V.size());
    for (int r = 0; r < rows; ++r)
      for (int h = 0; h < nh; ++h) {
        const int rh = r * nh + h;
        for (int d = 0; d < nope + rd; ++d) RK[rh * (nope + rd) + d] = d < nope ? kv[rh * (nope + vd) + d] : kpe[r * rd + d - nope];
        for (int d = 0; d < vd; ++d) RV[rh * vd + d] = kv[rh * (nope + vd) + nope + d];
      }
    launch(dim(1), dim(256), 0, [&] { mla_assemble(kv.data(), kpe.data(), K.data(), V.data(), rows, nh, nope, rd, vd); });
    K.insert(K.end(), V.begin(), V.end());
    RK.insert(RK.end(), RV.begin(), RV.end());
    exact("mla_assemble", K, RK);
  }
  {  // clamp_inplace: f32::max/min semantics, a NaN becomes -c
    auto x = rv(600, -3, 3);
    x[0] = NAN;
    auto ref = x;
    for (auto& v : ref) v = std::fmin(std::fmax(v, -1.5f), 1.5f);
    launch(dim(1), dim(256), 0, [&] { clamp_inplace(x.data(), 600, 1.5f); });
    exact("clamp_inplace", x, ref);
  }
  {  // add_inplace
    auto p = rv(600), q = rv(600), ref = p;
    for (int i = 0; i < 600; ++i) ref[i] += q[i];
    launch(dim(1), dim(256), 0, [&] { add_inplace(p.data(), q.data(), 600); });
    exact("add_inplace", p, ref);
  }
}

// ---- moe_align + expert_gemm_*: a MoE layer's experts with the routing on the device ----

struct Aligned {
  std::vector<int> sorted, tile_expert, src_row;
  int error = 0;
};

static Aligned run_align(const std::vector<unsigned>& ids, int n_experts) {
  const int choices = (int)ids.size();
  const int tiles = (choices + 15) / 16 + std::min(n_experts, choices);
  Aligned a;
  a.sorted.assign(tiles * 16, 77);
  a.tile_expert.assign(tiles, 77);
  a.src_row.assign(choices, 77);
  launch(dim(1), dim(256), 0, [&] {
    moe_align(ids.data(), choices, n_experts, tiles, a.sorted.data(), a.tile_expert.data(), a.src_row.data(), &a.error);
  });
  return a;
}

// How many ways the grouping breaks its contract (0: none).
static size_t align_violations(const std::vector<unsigned>& ids, int n_experts, const Aligned& a) {
  size_t bad = 0;
  const int tiles = (int)a.tile_expert.size();
  std::vector<int> seen(ids.size(), 0);
  int prev = -1;
  bool past_end = false;
  for (int t = 0; t < tiles; ++t) {
    const int e = a.tile_expert[t];
    if (e < 0) { past_end = true; for (int r = 0; r < 16; ++r) bad += a.sorted[t * 16 + r] != -1; continue; }
    bad += past_end || e < prev || e >= n_experts;  // used tiles first, experts ascending
    prev = e;
    bool padding = false;
    for (int r = 0; r < 16; ++r) {
      const int c = a.sorted[t * 16 + r];
      if (c < 0) { padding = true; bad += c != -1; continue; }
      bad += padding;  // padding only at the end of an expert's rows
      if (c >= (int)ids.size() || (int)ids[c] != e) { ++bad; continue; }
      ++seen[c];
      bad += a.src_row[c] != t * 16 + r;
    }
  }
  for (size_t i = 0; i < ids.size(); ++i) bad += ids[i] < (unsigned)n_experts ? seen[i] != 1 : (seen[i] != 0 || a.src_row[i] != -1);
  // Each expert's rows fill whole tiles but the last: ceil(count / 16) tiles.
  std::vector<int> count(n_experts, 0), owned(n_experts, 0);
  for (unsigned e : ids) if (e < (unsigned)n_experts) ++count[e];
  for (int e : a.tile_expert) if (e >= 0 && e < n_experts) ++owned[e];
  for (int e = 0; e < n_experts; ++e) bad += owned[e] != (count[e] + 15) / 16;
  return bad;
}

static void check_moe_align() {
  size_t violations = 0, total = 0;
  for (int n_experts : {1, 3, 8, 64, 256}) {
    for (int choices : {1, 5, 16, 17, 100, 2500}) {
      std::vector<unsigned> ids(choices);
      // Skewed: half the choices on two experts, so some experts span several tiles.
      for (auto& id : ids) id = urand(0, 1) < 0.5f ? (unsigned)(rng() % std::min(2, n_experts)) : (unsigned)(rng() % n_experts);
      const Aligned a = run_align(ids, n_experts);
      violations += align_violations(ids, n_experts, a) + (a.error != 0);
      total += ids.size();
    }
  }
  ++n_checks;
  n_failures += violations != 0;
  printf("%-4s %-58s %zu violations over %zu choices\n", violations ? "FAIL" : "ok", "moe_align (5 expert counts x 6 batch sizes)", violations, total);
  std::vector<unsigned> ids = {0, 5, 1, 9, 2};
  const Aligned a = run_align(ids, 4);
  exact("moe_align flags ids out of range", std::vector<int>{a.error, a.src_row[1], a.src_row[3]}, std::vector<int>{1, -1, -1});
  exact("moe_align places the valid choices", std::vector<size_t>{align_violations(ids, 4, a)}, std::vector<size_t>{0});
}

template <class T>
static float weight_value(const T& w) {
  if constexpr (std::is_same_v<T, float>) return w;
  else return __uint_as_float((unsigned)w << 16);
}

static void check_expert_gemm() {
  // t tokens x top-k choices over e experts; n output columns, k_dim the reduction (neither a
  // multiple of its tile); x rounded to bf16 for the bf16 weights, as the cast does.
  const int t = 9, top_k = 2, e = 5, n = 70, k_dim = 45;
  std::vector<unsigned> ids(t * top_k);
  for (int i = 0; i < t * top_k; ++i) ids[i] = (i % top_k == 0) ? 1 : (unsigned)(rng() % e);
  const Aligned a = run_align(ids, e);
  const int tiles = (int)a.tile_expert.size(), rows = tiles * 16;
  auto x = rv(t * k_dim);
  std::vector<std::vector<float>> wf(e);
  std::vector<std::vector<unsigned short>> wb(e);
  for (int j = 0; j < e; ++j) {
    wf[j] = rv(n * k_dim);
    for (float v : wf[j]) wb[j].push_back(bf16_ref(v));
  }
  // Row p's reference for expert weights w (as float), x rounded by round.
  auto want = [&](auto& w, auto round) {
    std::vector<float> out(rows * n, -5.0f);
    for (int p = 0; p < rows; ++p) {
      if (a.tile_expert[p / 16] < 0) continue;
      const int c = a.sorted[p];
      for (int col = 0; col < n; ++col) {
        if (c < 0) { out[p * n + col] = 0; continue; }
        double s = 0;
        for (int i = 0; i < k_dim; ++i) s += (double)round(x[(c / top_k) * k_dim + i]) * weight_value(w[ids[c]][col * k_dim + i]);
        out[p * n + col] = (float)s;
      }
    }
    return out;
  };
  auto grid = dim(tiles, (n + 63) / 64);
  {
    std::vector<unsigned long long> table(e);
    for (int j = 0; j < e; ++j) table[j] = (unsigned long long)wf[j].data();
    std::vector<float> out(rows * n, -5.0f);
    int error = 0;
    launch(grid, dim(256), 0, [&] { expert_gemm_f32(x.data(), a.sorted.data(), top_k, table.data(), a.tile_expert.data(), out.data(), n, k_dim, &error); });
    near("expert_gemm_f32 (gathered rows, padding 0)", out, want(wf, [](float v) { return v; }), 1e-5);
    exact("expert_gemm_f32 error word", std::vector<int>{error}, std::vector<int>{0});
  }
  {
    std::vector<unsigned long long> table(e);
    for (int j = 0; j < e; ++j) table[j] = (unsigned long long)wb[j].data();
    std::vector<float> out(rows * n, -5.0f);
    int error = 0;
    launch(grid, dim(256), 0, [&] { expert_gemm_bf16(x.data(), a.sorted.data(), top_k, table.data(), a.tile_expert.data(), out.data(), n, k_dim, &error); });
    near("expert_gemm_bf16 (x rounded to bf16)", out, want(wb, [](float v) { return __uint_as_float((unsigned)bf16_ref(v) << 16); }), 1e-5);
  }
  {  // row_div 0: the input is already grouped (row p); expert 1 in another launch; 3 missing
    std::vector<float> xg(rows * k_dim);
    for (int p = 0; p < rows; ++p)
      for (int i = 0; i < k_dim; ++i) xg[p * k_dim + i] = a.sorted[p] >= 0 ? x[(a.sorted[p] / top_k) * k_dim + i] : NAN;
    std::vector<unsigned long long> table(e);
    for (int j = 0; j < e; ++j) table[j] = (unsigned long long)wf[j].data();
    table[1] = 1;  // WEIGHTS_IN_OTHER_LAUNCH
    std::vector<float> out(rows * n, -5.0f);
    int error = 0;
    launch(grid, dim(256), 0, [&] { expert_gemm_f32(xg.data(), a.sorted.data(), 0, table.data(), a.tile_expert.data(), out.data(), n, k_dim, &error); });
    auto ref = want(wf, [](float v) { return v; });
    for (int p = 0; p < rows; ++p)
      if (a.tile_expert[p / 16] == 1) for (int col = 0; col < n; ++col) ref[p * n + col] = -5.0f;  // untouched
    near("expert_gemm_f32 on grouped rows, one expert skipped", out, ref, 1e-5);
    table[3] = 0;
    const bool routed_to_3 = std::find(ids.begin(), ids.end(), 3u) != ids.end();
    launch(grid, dim(256), 0, [&] { expert_gemm_f32(xg.data(), a.sorted.data(), 0, table.data(), a.tile_expert.data(), out.data(), n, k_dim, &error); });
    exact("expert_gemm_* flags a routed expert with no weights", std::vector<int>{error}, std::vector<int>{routed_to_3 ? 2 : 0});
  }
}

int main() {
  setvbuf(stdout, nullptr, _IOLBF, 0);  // a hung run still shows how far it got
  check_conversions();
  check_elementwise();
  check_rows();
  check_rope();
  check_attention();
  check_route_topk();
  check_moe_align();
  check_expert_gemm();
  if (n_failures) printf("FAILED: %d of %d checks\n", n_failures, n_checks);
  else printf("all %d checks passed\n", n_checks);
  return n_failures != 0;
}
