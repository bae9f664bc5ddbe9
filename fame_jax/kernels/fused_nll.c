// FAME's training output layer on a CPU with AVX-512, as one kernel (fame_jax/cpu_kernels.py
// builds and calls it; model.item_tables and scoring._row_blocked_nll are the same
// computation in XLA).
//
// The mixture rule with K heads of D = 32: the per-head item tables T_k = E W_k (Eq. 9;
// E the item embeddings, d wide), and for each position r with a target t_r,
//   loss_r = -log sum_k exp(logw_rk) softmax(U_k[r] . T_k^T)[t_r],
// with the gradients of U, logw, E and W. The call runs G groups of K threads; thread k of
// group g does head k for the row blocks g, g + G, g + 2G, ...: it scores each block of RB
// rows against the whole catalogue, 8 items at a time, the block's rows in the lanes of
// two zmm registers. As each tile of logits comes out of the
// matmul it is turned into exps (against a stabiliser per row fixed after the first 32
// items, `block_exps`), summed into the normaliser, and multiplied into the user
// vectors' gradient while still in registers: one sweep over the table makes the
// logits, the exps and dU. The exps are kept (RB x V floats a head, in L2 when they
// fit) for the table's gradient, the one matmul that needs the mixture's posterior
// first. XLA:CPU instead writes the logits and the exps to memory and reads them back
// between four kernels. A block where the stabiliser proves too low is scored again
// against each row's best logit, so no exp overflows whatever the logits. A group's
// threads meet twice a block (after the exps, and after the mixture that its thread 0
// computes). All threads share the work before and after the blocks: the tables T_k
// (each head's items split between its G threads), the sum of the groups' dT (items
// split), dW (rows of W split between a head's threads) and dE (items split). The
// result does not depend on timing: every sum has a fixed order (for a given G).
#include <errno.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define D 32        // the one vector size this kernel is written for (two zmm registers)
#define RB 32       // rows a block: the lanes of two zmm registers
#define MAX_HEADS 16
#define MAX_THREADS 64  // K x G

// 2^y for y <= 0 (a vector): 2^round(y) times a degree-6 polynomial for 2^f, f in
// [-1/2, 1/2] (relative error 1e-7); far below 2^-126 the result is 0.
static inline __m512 exp2_512(__m512 y) {
  __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(1.5345810970757157e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3399930903688073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618489071726799e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550328642129898e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022646248340607f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471824645996f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

#define LOG2E 1.44269504088896341f

typedef struct {  // A barrier for n threads: spins briefly, then yields the core.
  atomic_int count, sense;
  int n;
} __attribute__((aligned(64))) Barrier;  // One a cache line.

static void barrier_wait(Barrier *b, int *local_sense) {
  *local_sense = !*local_sense;
  if (atomic_fetch_add(&b->count, 1) == b->n - 1) {
    atomic_store(&b->count, 0);
    atomic_store(&b->sense, *local_sense);
    return;
  }
  for (int spins = 0; atomic_load(&b->sense) != *local_sense; spins++) {
    if (spins < 4096) _mm_pause();
    else sched_yield();
  }
}

typedef struct {
  int K, G, R, V, Vp, d, rows;  // heads, groups of K threads, positions (a multiple of RB),
                                // items, items padded to 8, embedding size and rows (>= V + 1)
  const float *U;      // [K][R][D]
  const float *logw;   // [R][K]
  const int *tgt;      // [R]: item index, or -1 for a position without a target
  const float *emb;    // [rows][d]: row 0 is padding, row v + 1 item v
  const float *W;      // [K][d][D]
  float *dU, *demb, *dW, *dlogw;  // like U, emb, W, logw
  // Below, a "slot" is thread k of group g: index g K + k.
  float *T;            // [K][Vp][D]: T_k = E W_k (rows past V zero)
  float *dT;           // [G][K][Vp][D]: each group's share of T_k's gradient; group 0's
                       // becomes the whole gradient
  float *WT;           // [K][D][d]: W_k transposed
  float *E;            // [slot][Vp][RB]: a block's logits, then exps (rows are lanes)
  float *Z, *lt, *c, *q;  // [slot][RB]: normaliser, target logit - m, c = q / Z, posterior q
  float tmax2[MAX_THREADS];  // per slot, max |T_k[v]|^2 over the slot's items
  double loss[MAX_THREADS];  // per group
  Barrier all, group[MAX_THREADS];
} Problem;

// [first, last) of n things split into `parts` shares of whole multiples of `unit`.
static void share(int n, int unit, int part, int parts, int *first, int *last) {
  *first = (int)((long)n * part / parts / unit * unit);
  *last = part == parts - 1 ? n : (int)((long)n * (part + 1) / parts / unit * unit);
}

// Logits of rows r0..r0+31 (lanes) against items v..v+7: a[j][0..1] for item v+j.
// UT holds the rows' vectors dimension-major: UT[d][row].
static inline void tile_logits(__m512 a[8][2], const float *UT, const float *T, size_t v) {
  for (int j = 0; j < 8; j++) a[j][0] = a[j][1] = _mm512_setzero_ps();
  for (int d = 0; d < D; d++) {
    __m512 u0 = _mm512_load_ps(UT + d * RB), u1 = _mm512_load_ps(UT + d * RB + 16);
    for (int j = 0; j < 8; j++) {
      __m512 b = _mm512_set1_ps(T[(v + j) * D + d]);
      a[j][0] = _mm512_fmadd_ps(b, u0, a[j][0]);
      a[j][1] = _mm512_fmadd_ps(b, u1, a[j][1]);
    }
  }
}

// S[d][rows] += sum_j T[v+j][d] x[j][rows]: the user vectors' gradient, before scaling,
// from a tile of exps still in registers.
static inline void tile_sum(float *S, __m512 x[8][2], const float *T, size_t v) {
  for (int d = 0; d < D; d++) {
    __m512 s0 = _mm512_load_ps(S + d * RB), s1 = _mm512_load_ps(S + d * RB + 16);
    for (int j = 0; j < 8; j++) {
      __m512 b = _mm512_set1_ps(T[(v + j) * D + d]);
      s0 = _mm512_fmadd_ps(b, x[j][0], s0);
      s1 = _mm512_fmadd_ps(b, x[j][1], s1);
    }
    _mm512_store_ps(S + d * RB, s0);
    _mm512_store_ps(S + d * RB + 16, s1);
  }
}

static float dot(const float *x, const float *y) {
  float s = 0;
  for (int d = 0; d < D; d++) s += x[d] * y[d];
  return s;
}

// Head k's exps for rows r0.. into E: exp(logit - m) with a stabiliser m per row, their sums
// into Z, each target's logit - m into lt, and S[d][i] = sum_v E[v][i] T[v][d]. In one
// pass over the catalogue, m is the smaller of a bound that no logit passes
// (|u| max_v |T_v|) and the best logit of the first 32 items plus 40: the best logit
// then lies at most 40 below m, and an exp can only overflow if it lies far above.
// A block where some row's sum of exps is not below 2^80 (a logit some 46-55 or more
// above m, an overflow, or a NaN) is scored again with m = each row's best logit
// (`exact`: logits first, then exps).
static void block_exps(Problem *p, int k, int g, float tmax, int r0, float S[D][RB],
                       int exact) {
  int slot = g * p->K + k;
  const float *U = p->U + ((size_t)k * p->R + r0) * D;
  const float *T = p->T + (size_t)k * p->Vp * D;
  float *E = p->E + (size_t)slot * RB * p->Vp;
  memset(S, 0, sizeof(float) * D * RB);
  float UT[D][RB] __attribute__((aligned(64)));
  for (int i = 0; i < RB; i++)
    for (int d = 0; d < D; d++) UT[d][i] = U[i * D + d];
  int V = p->V, full = V / 8 * 8;
  int head = exact ? p->Vp : (32 < p->Vp ? 32 : p->Vp);  // Items stored as raw logits first.
  __m512 best[2] = {_mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY)};
  __m512 z[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, ml[2] = {z[0], z[0]};
  const __m512 log2e = _mm512_set1_ps(LOG2E);
  for (int v0 = 0; v0 < p->Vp; v0 += 8) {
    __m512 a[8][2];
    int n = v0 < full ? 8 : V - v0;  // Real items in this tile.
    const float *Tv = T + (size_t)v0 * D;
    tile_logits(a, &UT[0][0], Tv, 0);
    if (v0 < head) {
      for (int j = 0; j < n; j++)
        for (int h = 0; h < 2; h++) best[h] = _mm512_max_ps(best[h], a[j][h]);
    } else {
      for (int j = 0; j < 8; j++)
        for (int h = 0; h < 2; h++) {
          a[j][h] = j < n ? exp2_512(_mm512_fmsub_ps(a[j][h], log2e, ml[h]))
                          : _mm512_setzero_ps();
          z[h] = _mm512_add_ps(z[h], a[j][h]);
        }
      tile_sum(&S[0][0], a, Tv, 0);
    }
    for (int j = 0; j < 8; j++) {
      _mm512_store_ps(E + (size_t)(v0 + j) * RB, a[j][0]);
      _mm512_store_ps(E + (size_t)(v0 + j) * RB + 16, a[j][1]);
    }
    if (v0 + 8 == head) {  // The stabilisers, as m log2(e) (ml) per row.
      float m[RB] __attribute__((aligned(64)));
      _mm512_store_ps(m, best[0]);
      _mm512_store_ps(m + 16, best[1]);
      for (int i = 0; i < RB; i++) {
        if (!exact) {
          float bound = sqrtf(dot(U + i * D, U + i * D)) * tmax;
          m[i] = m[i] + 40.0f < bound ? m[i] + 40.0f : bound;
        }
        m[i] *= LOG2E;
      }
      ml[0] = _mm512_load_ps(m), ml[1] = _mm512_load_ps(m + 16);
      for (int w0 = 0; w0 < head; w0 += 8) {  // The raw logits so far, to exps.
        __m512 x[8][2];
        for (int j = 0; j < 8; j++) {
          int v = w0 + j;
          for (int h = 0; h < 2; h++) {
            float *e = E + (size_t)v * RB + 16 * h;
            x[j][h] = v < V ? exp2_512(_mm512_fmsub_ps(_mm512_load_ps(e), log2e, ml[h]))
                            : _mm512_setzero_ps();
            _mm512_store_ps(e, x[j][h]);
            z[h] = _mm512_add_ps(z[h], x[j][h]);
          }
        }
        tile_sum(&S[0][0], x, T, w0);
      }
    }
  }
  float zs[RB] __attribute__((aligned(64))), ms[RB] __attribute__((aligned(64)));
  for (int h = 0; h < 2; h++) {
    _mm512_store_ps(zs + 16 * h, z[h]);
    _mm512_store_ps(ms + 16 * h, ml[h]);
  }
  if (!exact)
    for (int i = 0; i < RB; i++)
      if (!(zs[i] < 0x1p80f)) {  // Too large, infinite or NaN: score the block again.
        block_exps(p, k, g, tmax, r0, S, 1);
        return;
      }
  for (int i = 0; i < RB; i++) {
    p->Z[slot * RB + i] = zs[i];
    int t = p->tgt[r0 + i];
    double m = (double)ms[i] * 0.6931471805599453;  // The stabiliser the exps used.
    p->lt[slot * RB + i] = t >= 0 ? (float)((double)dot(U + i * D, T + (size_t)t * D) - m) : 0.0f;
  }
}

// The mixture over heads, in the log domain (group g's thread 0, between the barriers).
static void block_mixture(Problem *p, int g, int r0) {
  const float *lt = p->lt + (size_t)g * p->K * RB, *Z = p->Z + (size_t)g * p->K * RB;
  float *q = p->q + (size_t)g * p->K * RB, *c = p->c + (size_t)g * p->K * RB;
  for (int i = 0; i < RB; i++) {
    int real = p->tgt[r0 + i] >= 0;
    double lp[MAX_HEADS], top = -INFINITY, total = 0;
    for (int h = 0; h < p->K; h++) {
      lp[h] = p->logw[(size_t)(r0 + i) * p->K + h] + lt[h * RB + i] - log(Z[h * RB + i]);
      top = lp[h] > top ? lp[h] : top;
    }
    for (int h = 0; h < p->K; h++) total += exp(lp[h] - top);
    if (real) p->loss[g] -= top + log(total);
    for (int h = 0; h < p->K; h++) {
      float qh = real ? (float)(exp(lp[h] - top) / total) : 0.0f;
      q[h * RB + i] = qh;
      c[h * RB + i] = qh / Z[h * RB + i];
      p->dlogw[(size_t)(r0 + i) * p->K + h] = -qh;
    }
  }
}

// dU[r] = c_r S[.][r] - q_r T[t_r];  dT[v] += sum_r E[v,r] c_r U[r] - [v = t_r] q_r U[r].
static void block_grads(Problem *p, int k, int g, int r0, float S[D][RB]) {
  int slot = g * p->K + k;
  const float *U = p->U + ((size_t)k * p->R + r0) * D;
  const float *T = p->T + (size_t)k * p->Vp * D;
  const float *E = p->E + (size_t)slot * RB * p->Vp;
  const float *c = p->c + slot * RB, *q = p->q + slot * RB;
  float *dU = p->dU + ((size_t)k * p->R + r0) * D;
  float *dT = p->dT + (size_t)slot * p->Vp * D;
  float s[RB][D] __attribute__((aligned(64))), cu[RB][D] __attribute__((aligned(64)));
  for (int i = 0; i < RB; i++)
    for (int d = 0; d < D; d++) s[i][d] = S[d][i];
  for (int i = 0; i < RB; i++) {
    int t = p->tgt[r0 + i];
    __m512 ci = _mm512_set1_ps(c[i]), qi = _mm512_set1_ps(q[i]);
    for (int h = 0; h < 2; h++) {
      __m512 tv = t >= 0 ? _mm512_loadu_ps(T + (size_t)t * D + 16 * h) : _mm512_setzero_ps();
      _mm512_storeu_ps(dU + i * D + 16 * h,
                       _mm512_fnmadd_ps(qi, tv, _mm512_mul_ps(ci, _mm512_load_ps(&s[i][16 * h]))));
      _mm512_store_ps(&cu[i][16 * h], _mm512_mul_ps(ci, _mm512_loadu_ps(U + i * D + 16 * h)));
    }
  }
  for (int v0 = 0; v0 < p->Vp; v0 += 8) {  // Items past V have exps of 0.
    const float *e = E + (size_t)v0 * RB;
    __m512 a[8][2];
    for (int j = 0; j < 8; j++) a[j][0] = a[j][1] = _mm512_setzero_ps();
    for (int i = 0; i < RB; i++) {
      __m512 u0 = _mm512_load_ps(&cu[i][0]), u1 = _mm512_load_ps(&cu[i][16]);
      for (int j = 0; j < 8; j++) {
        __m512 b = _mm512_set1_ps(e[j * RB + i]);
        a[j][0] = _mm512_fmadd_ps(b, u0, a[j][0]);
        a[j][1] = _mm512_fmadd_ps(b, u1, a[j][1]);
      }
    }
    for (int j = 0; j < 8; j++) {
      float *o = dT + (size_t)(v0 + j) * D;
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), a[j][0]));
      _mm512_storeu_ps(o + 16, _mm512_add_ps(_mm512_loadu_ps(o + 16), a[j][1]));
    }
  }
  for (int i = 0; i < RB; i++)
    if (p->tgt[r0 + i] >= 0)
      for (int d = 0; d < D; d++) dT[(size_t)p->tgt[r0 + i] * D + d] -= q[i] * U[i * D + d];
}

// T_k = E W_k for the n <= 8 items v0.. (E's rows v0+1..), zeros for the rest of the
// tile's 8 rows; the largest |T_k[v]|^2 into tmax2.
static inline __attribute__((always_inline)) void project_tile(Problem *p, int k, int v0,
                                                                int n, float *tmax2) {
  const float *W = p->W + (size_t)k * p->d * D, *e = p->emb + (size_t)(v0 + 1) * p->d;
  __m512 a[8][2];
  for (int j = 0; j < 8; j++) a[j][0] = a[j][1] = _mm512_setzero_ps();
  for (int i = 0; i < p->d; i++) {
    __m512 w0 = _mm512_loadu_ps(W + i * D), w1 = _mm512_loadu_ps(W + i * D + 16);
    for (int j = 0; j < n; j++) {
      __m512 b = _mm512_set1_ps(e[(size_t)j * p->d + i]);
      a[j][0] = _mm512_fmadd_ps(b, w0, a[j][0]);
      a[j][1] = _mm512_fmadd_ps(b, w1, a[j][1]);
    }
  }
  float *T = p->T + ((size_t)k * p->Vp + v0) * D;
  for (int j = 0; j < 8; j++) {
    _mm512_store_ps(T + j * D, a[j][0]);
    _mm512_store_ps(T + j * D + 16, a[j][1]);
    float n2 = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_mul_ps(a[j][0], a[j][0]),
                                                  _mm512_mul_ps(a[j][1], a[j][1])));
    *tmax2 = n2 > *tmax2 ? n2 : *tmax2;
  }
}

// dW_k[i] = sum_v E[v+1][i] dT_k[v] for rows i in [i_first, i_last) (multiples of 8), in
// chunks of items that stay in L1.
static void projection_grad(Problem *p, int k, int i_first, int i_last) {
  enum { CHUNK = 64 };
  const float *dT = p->dT + (size_t)k * p->Vp * D;
  float *dW = p->dW + (size_t)k * p->d * D;
  memset(dW + (size_t)i_first * D, 0, sizeof(float) * (i_last - i_first) * D);
  for (int v0 = 0; v0 < p->V; v0 += CHUNK) {
    int v1 = v0 + CHUNK < p->V ? v0 + CHUNK : p->V;
    for (int i0 = i_first; i0 < i_last; i0 += 8) {
      __m512 a[8][2];
      for (int i = 0; i < 8; i++) {
        a[i][0] = _mm512_loadu_ps(dW + (i0 + i) * D);
        a[i][1] = _mm512_loadu_ps(dW + (i0 + i) * D + 16);
      }
      for (int v = v0; v < v1; v++) {
        __m512 g0 = _mm512_load_ps(dT + (size_t)v * D);
        __m512 g1 = _mm512_load_ps(dT + (size_t)v * D + 16);
        const float *e = p->emb + (size_t)(v + 1) * p->d + i0;
        for (int i = 0; i < 8; i++) {
          __m512 b = _mm512_set1_ps(e[i]);
          a[i][0] = _mm512_fmadd_ps(b, g0, a[i][0]);
          a[i][1] = _mm512_fmadd_ps(b, g1, a[i][1]);
        }
      }
      for (int i = 0; i < 8; i++) {
        _mm512_storeu_ps(dW + (i0 + i) * D, a[i][0]);
        _mm512_storeu_ps(dW + (i0 + i) * D + 16, a[i][1]);
      }
    }
  }
}

// dE[v+1] = sum_h dT_h[v] W_h^T for thread t's share of the items (after every head's dT
// is complete); thread 0 also zeroes the rows that are not items.
static void embedding_grad(Problem *p, int t) {
  int first, last;
  share(p->V, 8, t, p->K * p->G, &first, &last);
  if (t == 0) {
    memset(p->demb, 0, sizeof(float) * p->d);
    memset(p->demb + (size_t)(p->V + 1) * p->d, 0,
           sizeof(float) * (size_t)(p->rows - p->V - 1) * p->d);
  }
  for (int v0 = first; v0 < last; v0 += 8) {
    int n = last - v0 < 8 ? last - v0 : 8;
    for (int i0 = 0; i0 < p->d; i0 += 32) {
      __m512 a[8][2];
      for (int j = 0; j < 8; j++) a[j][0] = a[j][1] = _mm512_setzero_ps();
      for (int h = 0; h < p->K; h++) {
        const float *WT = p->WT + (size_t)h * D * p->d + i0;
        const float *g = p->dT + ((size_t)h * p->Vp + v0) * D;
        for (int c = 0; c < D; c++) {
          __m512 w0 = _mm512_loadu_ps(WT + (size_t)c * p->d);
          __m512 w1 = _mm512_loadu_ps(WT + (size_t)c * p->d + 16);
          for (int j = 0; j < 8; j++) {
            __m512 b = _mm512_set1_ps(g[j * D + c]);
            a[j][0] = _mm512_fmadd_ps(b, w0, a[j][0]);
            a[j][1] = _mm512_fmadd_ps(b, w1, a[j][1]);
          }
        }
      }
      for (int j = 0; j < n; j++) {
        float *o = p->demb + (size_t)(v0 + j + 1) * p->d + i0;
        _mm512_storeu_ps(o, a[j][0]);
        _mm512_storeu_ps(o + 16, a[j][1]);
      }
    }
  }
}

// dT_h[v] (group 0's) += the other groups' dT_h[v], for thread t's share of the items.
static void sum_groups(Problem *p, int t) {
  int first, last;
  share(p->Vp, 8, t, p->K * p->G, &first, &last);
  size_t table = (size_t)p->K * p->Vp * D;
  for (int h = 0; h < p->K; h++) {
    float *o = p->dT + ((size_t)h * p->Vp + first) * D;
    for (int g = 1; g < p->G; g++) {
      const float *x = o + g * table;
      for (size_t i = 0; i < (size_t)(last - first) * D; i += 16)
        _mm512_store_ps(o + i, _mm512_add_ps(_mm512_load_ps(o + i), _mm512_load_ps(x + i)));
    }
  }
}

typedef struct {
  Problem *p;
  int t;
  atomic_int *go;  // 0 until every thread has started, then 1 (or -1: stop)
} Worker;

static void *run_thread(void *arg) {
  Worker *w = arg;
  Problem *p = w->p;
  int t = w->t, k = t % p->K, g = t / p->K, sense = 0, group_sense = 0, first, last;
  while (atomic_load(w->go) == 0) sched_yield();
  if (atomic_load(w->go) < 0) return NULL;
  float tmax2 = 0;
  share(p->Vp, 8, g, p->G, &first, &last);  // This thread's tiles of T_k.
  for (int v0 = first; v0 < last; v0 += 8) {
    if (p->V - v0 >= 8) project_tile(p, k, v0, 8, &tmax2);  // Unrolled for whole tiles.
    else project_tile(p, k, v0, p->V - v0, &tmax2);
  }
  p->tmax2[t] = tmax2;
  if (g == 0)
    for (int i = 0; i < p->d; i++)
      for (int c = 0; c < D; c++)
        p->WT[((size_t)k * D + c) * p->d + i] = p->W[((size_t)k * p->d + i) * D + c];
  memset(p->dT + (size_t)t * p->Vp * D, 0, (size_t)p->Vp * D * sizeof(float));
  if (p->G > 1) barrier_wait(&p->all, &sense);  // T complete (one group: each its own T_k).
  for (int other = 0; other < p->G; other++)  // Over the head's threads, one a group.
    tmax2 = fmaxf(tmax2, p->tmax2[other * p->K + k]);
  float tmax = sqrtf(tmax2);  // max_v |T_k[v]|
  float S[D][RB] __attribute__((aligned(64)));
  for (int r0 = g * RB; r0 < p->R; r0 += p->G * RB) {
    block_exps(p, k, g, tmax, r0, S, 0);
    barrier_wait(&p->group[g], &group_sense);
    if (k == 0) block_mixture(p, g, r0);
    barrier_wait(&p->group[g], &group_sense);
    block_grads(p, k, g, r0, S);
  }
  if (p->G > 1) {
    barrier_wait(&p->all, &sense);
    sum_groups(p, t);
    barrier_wait(&p->all, &sense);
  }
  share(p->d, 8, g, p->G, &first, &last);
  projection_grad(p, k, first, last);
  barrier_wait(&p->all, &sense);
  embedding_grad(p, t);
  return NULL;
}

// Runs G groups of K threads (see the top). Returns 0, or EINVAL (R not a multiple of 32,
// d not a multiple of 32, more than MAX_HEADS heads or MAX_THREADS threads, fewer than
// V + 1 embedding rows, or a target outside -1..V-1), or ENOMEM.
int fame_fused_nll(int K, int G, int R, int V, int d, int rows, const float *U,
                   const float *logw, const int *tgt, const float *emb, const float *W,
                   double *loss, float *dU, float *demb, float *dW, float *dlogw) {
  if (K < 1 || K > MAX_HEADS || G < 1 || K * G > MAX_THREADS || R % RB || V < 1 || d < 32 ||
      d % 32 || rows < V + 1)
    return EINVAL;
  for (int r = 0; r < R; r++)
    if (tgt[r] < -1 || tgt[r] >= V) return EINVAL;
  Problem p = {.K = K, .G = G, .R = R, .V = V, .Vp = (V + 7) / 8 * 8, .d = d, .rows = rows, .U = U,
               .logw = logw, .tgt = tgt, .emb = emb, .W = W, .dU = dU, .demb = demb, .dW = dW,
               .dlogw = dlogw};
  int n = K * G;
  size_t table = (size_t)K * p.Vp * D, e = (size_t)n * RB * p.Vp, small = (size_t)n * RB;
  size_t floats = (1 + (size_t)G) * table + (size_t)K * D * d + e + 4 * small;
  float *work = aligned_alloc(64, floats * sizeof(float));
  if (!work) return ENOMEM;
  p.T = work, p.dT = p.T + table, p.WT = p.dT + G * table, p.E = p.WT + (size_t)K * D * d;
  p.Z = p.E + e, p.lt = p.Z + small, p.c = p.lt + small, p.q = p.c + small;
  atomic_init(&p.all.count, 0);
  atomic_init(&p.all.sense, 0);
  p.all.n = n;
  for (int g = 0; g < G; g++) {
    atomic_init(&p.group[g].count, 0);
    atomic_init(&p.group[g].sense, 0);
    p.group[g].n = K;
  }
  atomic_int go;
  atomic_init(&go, 0);
  pthread_t threads[MAX_THREADS];
  Worker workers[MAX_THREADS];
  for (int t = 0; t < n; t++) workers[t] = (Worker){&p, t, &go};
  int started = 1;
  while (started < n && !pthread_create(&threads[started], NULL, run_thread, &workers[started]))
    started++;
  atomic_store(&go, started == n ? 1 : -1);
  if (started == n) run_thread(&workers[0]);
  for (int t = 1; t < started; t++) pthread_join(threads[t], NULL);
  free(work);
  if (started < n) return ENOMEM;
  *loss = 0;
  for (int g = 0; g < G; g++) *loss += p.loss[g];
  return 0;
}
