// mtpnb's CPU verify kernels (mtpnb/cpu_kernels.py compiles and calls them), float32:
//   mtpnb_small_matmul  y[M, N] = x[M, K] . W[N, K]^T for 1 <= M <= 8 rows;
//   mtpnb_gated_delta   the Gated DeltaNet recurrence over T steps (below).
//
// A verify of M tokens multiplies M rows by every weight matrix of the model. BLAS's gemm packs the
// weights into panels sized for large M, so each extra row costs almost as much as the first (and
// OpenBLAS 0.3.21 runs M = 1 through that path too). Here every weight row is read once, from
// memory, for all M rows of x, which stay in L1: the cost of a call is the weight bytes over the
// memory bandwidth, nearly whatever M is.
//
// Each output element is summed in an order that depends on K only, never on M or on the thread
// split: row m of a call with M rows is bitwise the result of a call with that row alone, so a
// verify scores a token exactly as plain decoding does.
//
// Portable C with GCC/Clang vector extensions: compiled with -march=native it uses AVX-512, AVX2
// or NEON registers of whatever width the machine has.
#include <stddef.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define VBYTES 64
#elif defined(__AVX__)
#define VBYTES 32
#else
#define VBYTES 16
#endif
#define LANES (VBYTES / 4)
#define MAX_ROWS 8
#define PREFETCH_FLOATS 256  // 1 KiB ahead on each weight row: keeps enough loads in flight

typedef float vf __attribute__((vector_size(VBYTES)));
typedef float vf_unaligned __attribute__((vector_size(VBYTES), aligned(4), may_alias));

static inline vf load(const float* p) { return *(const vf_unaligned*)p; }

// The lanes summed pairwise (halving: a short dependency chain; with AVX-512, its reduce
// instruction sequence), then the K % LANES tail: the order depends on K only.
static inline float finish(vf acc, const float* w, const float* x, int kv, int K) {
#if defined(__AVX512F__)
    float s = _mm512_reduce_add_ps((__m512)acc);
#else
    float t[LANES];
    memcpy(t, &acc, sizeof t);
    for (int width = LANES / 2; width >= 1; width /= 2)
        for (int i = 0; i < width; i++) t[i] += t[i + width];
    float s = t[0];
#endif
    for (int k = kv; k < K; k++) s += w[k] * x[k];
    return s;
}

// Rows n0..n1 of the output for MM rows of x. One function per MM (1..8), so that the accumulators
// are arrays of constant size that live in registers; two weight rows per step share each load of x.
#define ROWS_FOR(MM)                                                                               \
    static void rows_##MM(const float* x, const float* W, float* y, int N, int K, int n0, int n1) {  \
        const int kv = K - K % LANES;                                                              \
        int n = n0;                                                                                \
        for (; n + 2 <= n1; n += 2) {                                                              \
            const float* w0 = W + (size_t)n * K;                                                   \
            const float* w1 = w0 + K;                                                              \
            vf a0[MM], a1[MM];                                                                     \
            for (int m = 0; m < MM; m++) a0[m] = a1[m] = (vf){0};                                  \
            for (int k = 0; k < kv; k += LANES) {                                                  \
                __builtin_prefetch(w0 + k + PREFETCH_FLOATS, 0, 3);                                \
                __builtin_prefetch(w1 + k + PREFETCH_FLOATS, 0, 3);                                \
                const vf v0 = load(w0 + k), v1 = load(w1 + k);                                     \
                for (int m = 0; m < MM; m++) {                                                     \
                    const vf xv = load(x + (size_t)m * K + k);                                     \
                    a0[m] += v0 * xv;                                                              \
                    a1[m] += v1 * xv;                                                              \
                }                                                                                  \
            }                                                                                      \
            for (int m = 0; m < MM; m++) {                                                         \
                y[(size_t)m * N + n] = finish(a0[m], w0, x + (size_t)m * K, kv, K);                \
                y[(size_t)m * N + n + 1] = finish(a1[m], w1, x + (size_t)m * K, kv, K);            \
            }                                                                                      \
        }                                                                                          \
        for (; n < n1; n++) { /* the odd row: the same sums, one weight row at a time */           \
            const float* w0 = W + (size_t)n * K;                                                   \
            vf a0[MM];                                                                             \
            for (int m = 0; m < MM; m++) a0[m] = (vf){0};                                          \
            for (int k = 0; k < kv; k += LANES) {                                                  \
                const vf v0 = load(w0 + k);                                                        \
                for (int m = 0; m < MM; m++) a0[m] += v0 * load(x + (size_t)m * K + k);            \
            }                                                                                      \
            for (int m = 0; m < MM; m++) y[(size_t)m * N + n] = finish(a0[m], w0, x + (size_t)m * K, kv, K); \
        }                                                                                          \
    }
ROWS_FOR(1) ROWS_FOR(2) ROWS_FOR(3) ROWS_FOR(4) ROWS_FOR(5) ROWS_FOR(6) ROWS_FOR(7) ROWS_FOR(8)

typedef void (*rows_fn)(const float*, const float*, float*, int, int, int, int);
static const rows_fn ROWS[MAX_ROWS + 1] = {0, rows_1, rows_2, rows_3, rows_4, rows_5, rows_6, rows_7, rows_8};

int mtpnb_max_rows(void) { return MAX_ROWS; }
int mtpnb_vector_bytes(void) { return VBYTES; }

// Returns 0, or -1 when a size is out of range. `threads` split N; no sum depends on the split.
int mtpnb_small_matmul(const float* x, const float* W, float* y, int M, int N, int K, int threads) {
    if (M < 1 || M > MAX_ROWS || N < 1 || K < 1) return -1;
    if (threads < 1 || N < 64 * threads) threads = 1;
    if (threads == 1) {
        ROWS[M](x, W, y, N, K, 0, N);
        return 0;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
        int n0 = (int)((long)N * t / threads), n1 = (int)((long)N * (t + 1) / threads);
        ROWS[M](x, W, y, N, K, n0, n1);
    }
    return 0;
}

// ---- Gated DeltaNet recurrence -------------------------------------------------------------------
// mlx-lm's gated delta rule (gated_delta.py, _gated_delta_step_ops, scalar gate per head), one head
// and one step at a time, each row of the state read once per step:
//     S = S * g_t;  delta = (v_t - S k_t) * beta_t;  S = S + delta k_t^T;  y_t = S q_t
// q, k [T, H, Dk] (q/k heads already repeated to the value heads), v [T, H, Dv], g and beta [T, H],
// state0 [H, Dv, Dk] -> y [T, H, Dv], state [H, Dv, Dk] after the last step and, if `states` is not
// NULL, the state after every step [T, H, Dv, Dk] (what a rollback keeps). The arithmetic of a step
// is the same whatever T is, so T steps at once equal T calls of one step, bitwise.

static inline float dot(const float* a, const float* b, int n) {
    const int nv = n - n % LANES;
    vf acc = (vf){0};
    for (int i = 0; i < nv; i += LANES) acc += load(a + i) * load(b + i);
    float s = finish(acc, a, b, nv, n);
    return s;
}

static void delta_head(const float* q, const float* k, const float* v, const float* g, const float* beta,
                       const float* state0, float* y, float* state, float* states, int T, int H, int Dk,
                       int Dv, int h) {
    float* S = state + (size_t)h * Dv * Dk;
    memcpy(S, state0 + (size_t)h * Dv * Dk, sizeof(float) * Dv * Dk);
    for (int t = 0; t < T; t++) {
        const size_t th = (size_t)t * H + h;
        const float* qt = q + th * Dk;
        const float* kt = k + th * Dk;
        const float* vt = v + th * Dv;
        const float gt = g[th], bt = beta[th];
        for (int i = 0; i < Dv; i++) {
            float* row = S + (size_t)i * Dk;
            for (int j = 0; j < Dk; j++) row[j] *= gt;
            const float delta = (vt[i] - dot(row, kt, Dk)) * bt;
            for (int j = 0; j < Dk; j++) row[j] += kt[j] * delta;
            y[th * Dv + i] = dot(row, qt, Dk);
        }
        if (states) memcpy(states + th * Dv * Dk, S, sizeof(float) * Dv * Dk);
    }
}

int mtpnb_gated_delta(const float* q, const float* k, const float* v, const float* g, const float* beta,
                      const float* state0, float* y, float* state, float* states, int T, int H, int Dk,
                      int Dv, int threads) {
    if (T < 1 || H < 1 || Dk < 1 || Dv < 1) return -1;
    if (threads < 1 || T < 16) threads = 1;  // a verify's few steps cost less than waking a thread
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int h = 0; h < H; h++) delta_head(q, k, v, g, beta, state0, y, state, states, T, H, Dk, Dv, h);
    return 0;
}
