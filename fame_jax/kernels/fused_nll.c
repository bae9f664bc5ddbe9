// FAME's training output layer on a CPU with AVX-512, as one kernel (fame_jax/cpu_kernels.py
// builds and calls it; scoring._row_blocked_nll is the same computation in XLA).
//
// The mixture rule with K heads of D = 32: for each position r with a target t_r,
//   loss_r = -log sum_k exp(logw_rk) softmax(U_k[r] . T_k^T)[t_r],
// and the gradients of U, T and logw. Blocks of RB rows are scored against the whole
// catalogue. A block's logits, then its exps, stay in one core's L2 (RB x V floats a
// head) and are used there for the normaliser and both gradient matmuls: they are never
// written to memory, where XLA:CPU writes and reads them between its matmul and exp
// kernels. The exps are taken as the logits come out of the matmul, against a
// stabiliser per row fixed after the first 32 items (`block_exps`); a block where it
// proves too low is scored again against each row's best logit, so no exp overflows
// whatever the logits. Thread k does head k (threads meet twice a block: after the
// exps, and after the mixture that thread 0 computes). The result does not depend on
// timing: every sum has a fixed order.
#include <errno.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define D 32        // the one vector size this kernel is written for (two zmm registers)
#define RB 32       // rows a block
#define VCHUNK 512  // items a chunk of the user vectors' gradient (its table rows stay in L1/L2)
#define MAX_HEADS 16

static inline __m512 exp512(__m512 x) {  // exp(x) for x <= 0: Cephes' expf polynomial.
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  return _mm512_scalef_ps(_mm512_add_ps(p, _mm512_set1_ps(1.0f)), n);
}

static __mmask16 tail_mask(int v0, int V) {
  return v0 + 16 <= V ? 0xFFFF : (v0 >= V ? 0 : (__mmask16)((1u << (V - v0)) - 1));
}

typedef struct {  // A barrier for the call's threads: spins briefly, then yields the core.
  atomic_int count, sense;
  int n;
} Barrier;

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
  int K, R, V, Vp;     // heads, rows (a multiple of RB), items, items padded to 32
  const float *U;      // [K][R][D]
  const float *logw;   // [R][K]
  const int *tgt;      // [R]: item index, or -1 for a position without a target
  const float *T;      // [K][V][D]
  float *dU, *dT;      // like U, T
  float *dlogw;        // [R][K]
  float *TT;           // [K][Vp/32][D][32]: T in tiles of 32 items, dimensions major
  float *E;            // [K][RB][Vp]: a block's logits, then exps
  float *Z, *lt, *c, *q;  // [K][RB]: normaliser, target logit - m, c = q / Z, posterior q
  float tmax[MAX_HEADS];   // max_v |T_k[v]|
  double loss;
  Barrier barrier;
} Problem;

// Logits of head k's rows r0.. against items v0..v0+31 (a tile of TT): a[i][0..1] for row g+i.
#define TILE_LOGITS(a, U, tile, g)                                                      \
  for (int i = 0; i < 8; i++) a[i][0] = a[i][1] = _mm512_setzero_ps();                 \
  for (int d = 0; d < D; d++) {                                                         \
    __m512 t0 = _mm512_load_ps(tile + d * 32), t1 = _mm512_load_ps(tile + d * 32 + 16); \
    for (int i = 0; i < 8; i++) {                                                       \
      __m512 b = _mm512_set1_ps(U[(g + i) * D + d]);                                    \
      a[i][0] = _mm512_fmadd_ps(b, t0, a[i][0]);                                        \
      a[i][1] = _mm512_fmadd_ps(b, t1, a[i][1]);                                        \
    }                                                                                   \
  }

static float dot(const float *x, const float *y) {
  float s = 0;
  for (int d = 0; d < D; d++) s += x[d] * y[d];
  return s;
}

// Head k's exps for rows r0.. into E: exp(logit - m) with a stabiliser m per row, their sums
// into Z, each target's logit - m into lt. In one pass over the catalogue, m is the smaller
// of a bound that no logit passes (|u| max_v |T_v|) and the best logit of the first 32 items
// plus 40, so no exp of a row whose best logit lies within 40 of that guess (almost all)
// can overflow. A block where some row's best logit lies more than 60 above its m is
// scored again with m = its best logit (`exact`: logits first, then their exps).
static void block_exps(Problem *p, int k, int r0, int exact) {
  const float *U = p->U + ((size_t)k * p->R + r0) * D;
  const float *TT = p->TT + (size_t)k * D * p->Vp;
  float *E = p->E + (size_t)k * RB * p->Vp;
  float m[RB];
  __m512 best[RB], z[RB], mv[RB];
  for (int i = 0; i < RB; i++) best[i] = _mm512_set1_ps(-INFINITY), z[i] = _mm512_setzero_ps();
  for (int v0 = 0; v0 < p->Vp; v0 += 32) {
    const float *tile = TT + (size_t)v0 * D;
    __mmask16 m0 = tail_mask(v0, p->V), m1 = tail_mask(v0 + 16, p->V);
    int raw = exact || v0 == 0;  // Logits stored as they are, to be exponentiated after.
    for (int g = 0; g < RB; g += 8) {
      __m512 a[8][2];
      TILE_LOGITS(a, U, tile, g)
      for (int i = 0; i < 8; i++) {
        int r = g + i;
        best[r] = _mm512_mask_max_ps(best[r], m0, best[r], a[i][0]);
        best[r] = _mm512_mask_max_ps(best[r], m1, best[r], a[i][1]);
        if (!raw) {
          a[i][0] = _mm512_maskz_mov_ps(m0, exp512(_mm512_sub_ps(a[i][0], mv[r])));
          a[i][1] = _mm512_maskz_mov_ps(m1, exp512(_mm512_sub_ps(a[i][1], mv[r])));
          z[r] = _mm512_add_ps(z[r], _mm512_add_ps(a[i][0], a[i][1]));
        }
        _mm512_store_ps(E + (size_t)r * p->Vp + v0, a[i][0]);
        _mm512_store_ps(E + (size_t)r * p->Vp + v0 + 16, a[i][1]);
      }
    }
    if (v0 == 0 && !exact)
      for (int i = 0; i < RB; i++) {
        float bound = sqrtf(dot(U + i * D, U + i * D)) * p->tmax[k];
        float guess = _mm512_reduce_max_ps(best[i]) + 40.0f;
        m[i] = guess < bound ? guess : bound;
        mv[i] = _mm512_set1_ps(m[i]);
      }
  }
  int width = exact ? p->Vp : 32;  // What is still raw logits.
  for (int i = 0; i < RB; i++) {
    float top = _mm512_reduce_max_ps(best[i]);
    if (exact) m[i] = top, mv[i] = _mm512_set1_ps(top);
    else if (top - m[i] > 60.0f) {
      block_exps(p, k, r0, 1);
      return;
    }
    float *e = E + (size_t)i * p->Vp;
    for (int v0 = 0; v0 < width; v0 += 16) {
      __m512 x = _mm512_maskz_mov_ps(tail_mask(v0, p->V),
                                     exp512(_mm512_sub_ps(_mm512_load_ps(e + v0), mv[i])));
      _mm512_store_ps(e + v0, x);
      z[i] = _mm512_add_ps(z[i], x);
    }
    p->Z[k * RB + i] = _mm512_reduce_add_ps(z[i]);
    int t = p->tgt[r0 + i];
    p->lt[k * RB + i] = t >= 0 ? dot(U + i * D, p->T + ((size_t)k * p->V + t) * D) - m[i] : 0.0f;
  }
}

// The mixture over heads, in the log domain (thread 0, between the barriers).
static void block_mixture(Problem *p, int r0) {
  for (int i = 0; i < RB; i++) {
    int real = p->tgt[r0 + i] >= 0;
    double lp[MAX_HEADS], top = -INFINITY, total = 0;
    for (int h = 0; h < p->K; h++) {
      lp[h] = p->logw[(size_t)(r0 + i) * p->K + h] + p->lt[h * RB + i] - log(p->Z[h * RB + i]);
      top = lp[h] > top ? lp[h] : top;
    }
    for (int h = 0; h < p->K; h++) total += exp(lp[h] - top);
    if (real) p->loss -= top + log(total);
    for (int h = 0; h < p->K; h++) {
      float q = real ? (float)(exp(lp[h] - top) / total) : 0.0f;
      p->q[h * RB + i] = q;
      p->c[h * RB + i] = q / p->Z[h * RB + i];
      p->dlogw[(size_t)(r0 + i) * p->K + h] = -q;
    }
  }
}

// dU[r] = c_r sum_v E[r,v] T[v] - q_r T[t_r];  dT[v] += sum_r E[r,v] c_r U[r] - [v = t_r] q_r U[r].
static void block_grads(Problem *p, int k, int r0) {
  const float *U = p->U + ((size_t)k * p->R + r0) * D;
  const float *T = p->T + (size_t)k * p->V * D;
  const float *E = p->E + (size_t)k * RB * p->Vp;
  const float *c = p->c + k * RB, *q = p->q + k * RB;
  float *dU = p->dU + ((size_t)k * p->R + r0) * D;
  float *dT = p->dT + (size_t)k * p->V * D;
  __m512 acc[RB][2];
  for (int i = 0; i < RB; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int vc = 0; vc < p->V; vc += VCHUNK) {
    int ve = vc + VCHUNK < p->V ? vc + VCHUNK : p->V;
    for (int g = 0; g < RB; g += 8) {
      __m512 a[8][2];
      for (int i = 0; i < 8; i++) a[i][0] = acc[g + i][0], a[i][1] = acc[g + i][1];
      for (int v = vc; v < ve; v++) {
        __m512 t0 = _mm512_loadu_ps(T + (size_t)v * D);
        __m512 t1 = _mm512_loadu_ps(T + (size_t)v * D + 16);
        for (int i = 0; i < 8; i++) {
          __m512 b = _mm512_set1_ps(E[(size_t)(g + i) * p->Vp + v]);
          a[i][0] = _mm512_fmadd_ps(b, t0, a[i][0]);
          a[i][1] = _mm512_fmadd_ps(b, t1, a[i][1]);
        }
      }
      for (int i = 0; i < 8; i++) acc[g + i][0] = a[i][0], acc[g + i][1] = a[i][1];
    }
  }
  float cu[RB][D] __attribute__((aligned(64)));
  for (int i = 0; i < RB; i++) {
    int t = p->tgt[r0 + i];
    __m512 ci = _mm512_set1_ps(c[i]), qi = _mm512_set1_ps(q[i]);
    for (int h = 0; h < 2; h++) {
      __m512 tv = t >= 0 ? _mm512_loadu_ps(T + (size_t)t * D + 16 * h) : _mm512_setzero_ps();
      _mm512_storeu_ps(dU + i * D + 16 * h,
                       _mm512_fnmadd_ps(qi, tv, _mm512_mul_ps(ci, acc[i][h])));
      _mm512_store_ps(&cu[i][16 * h], _mm512_mul_ps(ci, _mm512_loadu_ps(U + i * D + 16 * h)));
    }
  }
  for (int v0 = 0; v0 < p->V; v0 += 8) {
    int n = p->V - v0 < 8 ? p->V - v0 : 8;
    __m512 a[8][2];
    for (int j = 0; j < 8; j++) a[j][0] = a[j][1] = _mm512_setzero_ps();
    for (int i = 0; i < RB; i++) {
      __m512 u0 = _mm512_load_ps(&cu[i][0]), u1 = _mm512_load_ps(&cu[i][16]);
      const float *e = E + (size_t)i * p->Vp + v0;
      for (int j = 0; j < 8; j++) {
        __m512 b = _mm512_set1_ps(e[j]);
        a[j][0] = _mm512_fmadd_ps(b, u0, a[j][0]);
        a[j][1] = _mm512_fmadd_ps(b, u1, a[j][1]);
      }
    }
    for (int j = 0; j < n; j++) {
      float *o = dT + (size_t)(v0 + j) * D;
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), a[j][0]));
      _mm512_storeu_ps(o + 16, _mm512_add_ps(_mm512_loadu_ps(o + 16), a[j][1]));
    }
  }
  for (int i = 0; i < RB; i++)
    if (p->tgt[r0 + i] >= 0)
      for (int d = 0; d < D; d++) dT[(size_t)p->tgt[r0 + i] * D + d] -= q[i] * U[i * D + d];
}

typedef struct {
  Problem *p;
  int k;
  atomic_int *go;  // 0 until every thread has started, then 1 (or -1: stop)
} Worker;

static void *run_head(void *arg) {
  Worker *w = arg;
  Problem *p = w->p;
  int k = w->k, sense = 0;
  while (atomic_load(w->go) == 0) sched_yield();
  if (atomic_load(w->go) < 0) return NULL;
  const float *T = p->T + (size_t)k * p->V * D;
  float *TT = p->TT + (size_t)k * D * p->Vp;
  for (int v = 0; v < p->Vp; v++)
    for (int d = 0; d < D; d++)
      TT[(size_t)(v / 32) * 32 * D + d * 32 + v % 32] = v < p->V ? T[(size_t)v * D + d] : 0.0f;
  float tmax = 0;
  for (int v = 0; v < p->V; v++) {
    float n = dot(T + (size_t)v * D, T + (size_t)v * D);
    tmax = n > tmax ? n : tmax;
  }
  p->tmax[k] = sqrtf(tmax);
  memset(p->dT + (size_t)k * p->V * D, 0, (size_t)p->V * D * sizeof(float));
  for (int r0 = 0; r0 < p->R; r0 += RB) {
    block_exps(p, k, r0, 0);
    barrier_wait(&p->barrier, &sense);
    if (k == 0) block_mixture(p, r0);
    barrier_wait(&p->barrier, &sense);
    block_grads(p, k, r0);
  }
  return NULL;
}

// Returns 0, or EINVAL (R not a multiple of 32, more than MAX_HEADS heads, or a target
// outside -1..V-1), or ENOMEM.
int fame_fused_nll(int K, int R, int V, const float *U, const float *logw, const int *tgt,
                   const float *T, double *loss, float *dU, float *dT, float *dlogw) {
  if (K < 1 || K > MAX_HEADS || R % RB || V < 1) return EINVAL;
  for (int r = 0; r < R; r++)
    if (tgt[r] < -1 || tgt[r] >= V) return EINVAL;
  Problem p = {.K = K, .R = R, .V = V, .Vp = (V + 31) / 32 * 32, .U = U, .logw = logw,
               .tgt = tgt, .T = T, .dU = dU, .dT = dT, .dlogw = dlogw};
  size_t tt = (size_t)K * D * p.Vp, e = (size_t)K * RB * p.Vp, small = (size_t)K * RB;
  float *work = aligned_alloc(64, (tt + e + 4 * small) * sizeof(float));
  if (!work) return ENOMEM;
  p.TT = work, p.E = work + tt, p.Z = p.E + e, p.lt = p.Z + small, p.c = p.lt + small;
  p.q = p.c + small;
  atomic_init(&p.barrier.count, 0);
  atomic_init(&p.barrier.sense, 0);
  p.barrier.n = K;
  atomic_int go;
  atomic_init(&go, 0);
  pthread_t threads[MAX_HEADS];
  Worker workers[MAX_HEADS];
  for (int k = 0; k < K; k++) workers[k] = (Worker){&p, k, &go};
  int started = 1;
  while (started < K && !pthread_create(&threads[started], NULL, run_head, &workers[started]))
    started++;
  atomic_store(&go, started == K ? 1 : -1);
  if (started == K) run_head(&workers[0]);
  for (int k = 1; k < started; k++) pthread_join(threads[k], NULL);
  free(work);
  if (started < K) return ENOMEM;
  *loss = p.loss;
  return 0;
}
