// mtpnb's CPU verify kernels (mtpnb/cpu_kernels.py compiles and calls them), float32:
//   mtpnb_small_matmul  y[M, N] = x[M, K] . W[N, K]^T for 1 <= M <= 8 rows (W float32, or bfloat16:
//                       mtpnb_small_matmul_bf16, see below);
//   mtpnb_gated_delta   the Gated DeltaNet recurrence over T steps (below);
//   mtpnb_qwen_head_steps  a Qwen3.5 MTP head's draft steps (at the end).
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
// A weight matrix whose float32 values all are bfloat16 numbers (a checkpoint stored in bf16, loaded as
// float32) can be passed as its bf16 half (the upper 16 bits of each float): each weight is widened back
// to the same float32 in a register, so the sums are bitwise those of the float32 call, at half the bytes
// read. The cost of a call being those bytes over the bandwidth, it runs up to twice as fast.
//
// Portable C with GCC/Clang vector extensions: compiled with -march=native it uses AVX-512, AVX2
// or NEON registers of whatever width the machine has.
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
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
typedef unsigned int vu __attribute__((vector_size(VBYTES)));
typedef unsigned short vh_unaligned __attribute__((vector_size(VBYTES / 2), aligned(2), may_alias));
typedef unsigned short bf16;

static inline vf load(const float* p) { return *(const vf_unaligned*)p; }
// LANES bfloat16 numbers widened to float32: each one's bits become the upper half of a float's.
static inline vf load_bf16(const bf16* p) { return (vf)(__builtin_convertvector(*(const vh_unaligned*)p, vu) << 16); }
static inline float get(const float* p, int k) { return p[k]; }
static inline float get_bf16(const bf16* p, int k) {
    const unsigned int bits = (unsigned int)p[k] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

// The lanes summed pairwise (halving: a short dependency chain; with AVX-512, its reduce
// instruction sequence); the caller then adds the K % LANES tail: the order depends on K only.
static inline float reduce(vf acc) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)acc);
#else
    float t[LANES];
    memcpy(t, &acc, sizeof t);
    for (int width = LANES / 2; width >= 1; width /= 2)
        for (int i = 0; i < width; i++) t[i] += t[i + width];
    return t[0];
#endif
}

static inline float finish(vf acc, const float* w, const float* x, int kv, int K) {
    float s = reduce(acc);
    for (int k = kv; k < K; k++) s += w[k] * x[k];
    return s;
}

// Rows n0..n1 of the output for MM rows of x, weights of type WT read by LOAD (a vector) and GET (the
// tail). One function per MM (1..8) and weight type, so that the accumulators are arrays of constant
// size that live in registers; two weight rows per step share each load of x.
#define ROWS_FOR(MM, NAME, WT, LOAD, GET)                                                          \
    static void NAME##_##MM(const float* x, const WT* W, float* y, int N, int K, int n0, int n1) {   \
        const int kv = K - K % LANES;                                                              \
        int n = n0;                                                                                \
        for (; n + 2 <= n1; n += 2) {                                                              \
            const WT* w0 = W + (size_t)n * K;                                                      \
            const WT* w1 = w0 + K;                                                                 \
            vf a0[MM], a1[MM];                                                                     \
            for (int m = 0; m < MM; m++) a0[m] = a1[m] = (vf){0};                                  \
            for (int k = 0; k < kv; k += LANES) {                                                  \
                __builtin_prefetch(w0 + k + PREFETCH_FLOATS, 0, 3);                                \
                __builtin_prefetch(w1 + k + PREFETCH_FLOATS, 0, 3);                                \
                const vf v0 = LOAD(w0 + k), v1 = LOAD(w1 + k);                                     \
                for (int m = 0; m < MM; m++) {                                                     \
                    const vf xv = load(x + (size_t)m * K + k);                                     \
                    a0[m] += v0 * xv;                                                              \
                    a1[m] += v1 * xv;                                                              \
                }                                                                                  \
            }                                                                                      \
            for (int m = 0; m < MM; m++) {                                                         \
                const float* xm = x + (size_t)m * K;                                               \
                float s0 = reduce(a0[m]), s1 = reduce(a1[m]);                                      \
                for (int k = kv; k < K; k++) { /* fused: the same rounding whatever the compiler */ \
                    s0 = fmaf(GET(w0, k), xm[k], s0);                                              \
                    s1 = fmaf(GET(w1, k), xm[k], s1);                                              \
                }                                                                                  \
                y[(size_t)m * N + n] = s0;                                                         \
                y[(size_t)m * N + n + 1] = s1;                                                     \
            }                                                                                      \
        }                                                                                          \
        for (; n < n1; n++) { /* the odd row: the same sums, one weight row at a time */           \
            const WT* w0 = W + (size_t)n * K;                                                      \
            vf a0[MM];                                                                             \
            for (int m = 0; m < MM; m++) a0[m] = (vf){0};                                          \
            for (int k = 0; k < kv; k += LANES) {                                                  \
                const vf v0 = LOAD(w0 + k);                                                        \
                for (int m = 0; m < MM; m++) a0[m] += v0 * load(x + (size_t)m * K + k);            \
            }                                                                                      \
            for (int m = 0; m < MM; m++) {                                                         \
                const float* xm = x + (size_t)m * K;                                               \
                float s0 = reduce(a0[m]);                                                          \
                for (int k = kv; k < K; k++) s0 = fmaf(GET(w0, k), xm[k], s0);                      \
                y[(size_t)m * N + n] = s0;                                                         \
            }                                                                                      \
        }                                                                                          \
    }
#define ROWS_1_TO_8(NAME, WT, LOAD, GET)                                                           \
    ROWS_FOR(1, NAME, WT, LOAD, GET) ROWS_FOR(2, NAME, WT, LOAD, GET) ROWS_FOR(3, NAME, WT, LOAD, GET) \
    ROWS_FOR(4, NAME, WT, LOAD, GET) ROWS_FOR(5, NAME, WT, LOAD, GET) ROWS_FOR(6, NAME, WT, LOAD, GET) \
    ROWS_FOR(7, NAME, WT, LOAD, GET) ROWS_FOR(8, NAME, WT, LOAD, GET)
ROWS_1_TO_8(rows, float, load, get)
ROWS_1_TO_8(rows_bf16, bf16, load_bf16, get_bf16)

typedef void (*rows_fn)(const float*, const float*, float*, int, int, int, int);
typedef void (*rows_bf16_fn)(const float*, const bf16*, float*, int, int, int, int);
static const rows_fn ROWS[MAX_ROWS + 1] = {0, rows_1, rows_2, rows_3, rows_4, rows_5, rows_6, rows_7, rows_8};
static const rows_bf16_fn ROWS_BF16[MAX_ROWS + 1] = {0, rows_bf16_1, rows_bf16_2, rows_bf16_3, rows_bf16_4,
                                                     rows_bf16_5, rows_bf16_6, rows_bf16_7, rows_bf16_8};

int mtpnb_max_rows(void) { return MAX_ROWS; }
int mtpnb_vector_bytes(void) { return VBYTES; }

// Returns 0, or -1 when a size is out of range. `threads` split N; no sum depends on the split.
#define SMALL_MATMUL(NAME, WT, TABLE)                                                              \
    int NAME(const float* x, const WT* W, float* y, int M, int N, int K, int threads) {              \
        if (M < 1 || M > MAX_ROWS || N < 1 || K < 1) return -1;                                    \
        if (threads < 1 || N < 64 * threads) threads = 1;                                          \
        if (threads == 1) {                                                                        \
            TABLE[M](x, W, y, N, K, 0, N);                                                         \
            return 0;                                                                              \
        }                                                                                          \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                          \
        for (int t = 0; t < threads; t++) {                                                        \
            int n0 = (int)((long)N * t / threads), n1 = (int)((long)N * (t + 1) / threads);        \
            TABLE[M](x, W, y, N, K, n0, n1);                                                       \
        }                                                                                          \
        return 0;                                                                                  \
    }
SMALL_MATMUL(mtpnb_small_matmul, float, ROWS)
SMALL_MATMUL(mtpnb_small_matmul_bf16, bf16, ROWS_BF16)

// ---- Gated DeltaNet recurrence -------------------------------------------------------------------
// mlx-lm's gated delta rule (gated_delta.py, _gated_delta_step_ops, scalar gate per head), one head
// and one step at a time, each row of the state read once per step:
//     S = S * g_t;  delta = (v_t - S k_t) * beta_t;  S = S + delta k_t^T;  y_t = S q_t
// q, k [T, H, Dk] (q/k heads already repeated to the value heads), v [T, H, Dv], g and beta [T, H],
// state0 [H, Dv, Dk] -> y [T, H, Dv], state [H, Dv, Dk] after the last step. The arithmetic of a step
// is the same whatever T is, so T steps at once equal T calls of one step, bitwise: a rollback gets the
// state after the first n steps of a verify by running those n steps again.

static inline float dot(const float* a, const float* b, int n) {
    const int nv = n - n % LANES;
    vf acc = (vf){0};
    for (int i = 0; i < nv; i += LANES) acc += load(a + i) * load(b + i);
    float s = finish(acc, a, b, nv, n);
    return s;
}

static void delta_head(const float* q, const float* k, const float* v, const float* g, const float* beta,
                       const float* state0, float* y, float* state, int T, int H, int Dk, int Dv, int h) {
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
    }
}

int mtpnb_gated_delta(const float* q, const float* k, const float* v, const float* g, const float* beta,
                      const float* state0, float* y, float* state, int T, int H, int Dk, int Dv,
                      int threads) {
    if (T < 1 || H < 1 || Dk < 1 || Dv < 1) return -1;
    if (threads < 1 || T < 16) threads = 1;  // a verify's few steps cost less than waking a thread
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int h = 0; h < H; h++) delta_head(q, k, v, g, beta, state0, y, state, T, H, Dk, Dv, h);
    return 0;
}

// ---- Draft steps of a Qwen3.5 MTP head --------------------------------------------------------------
// The draft steps of a one-layer Qwen3.5 / Qwen3-Next MTP head (mtpnb/head.py's MTPHead: pre-fc norms, fc,
// one gated full-attention decoder layer with a dense MLP, the final norm) and their draft logits. Through
// MLX each step is about nine kernel calls, each waiting for the small MLX ops before it (norms, RoPE,
// attention): on a CPU that waiting, not the arithmetic, was most of a draft step.
//
// A round's rows, at positions offset + r (r = 0, 1, ..): draft step 0's n input rows (the positions the
// last verify committed, each with the token after it), then one row per later step (the previous step's
// output g with its draft). Each row attends over the cache's `offset` committed rows and the round's rows
// up to itself; the round's K and V rows (after k_norm and RoPE, as the MLX cache stores them) go to
// round_keys / round_values [rows of the round, nkv * hd], from which the caller copies step 0's rows into
// the head's cache. One call runs a whole round. Of a step's input rows only the last one drafts:
// the others need their K and V only (one layer: nothing else of theirs is read).
// The drafts only propose: their numbers need not match MLX's bitwise (the verify decides).
//
// w: embed [V, H], pre_fc_norm_embedding [H], pre_fc_norm_hidden [H], fc [H, 2H], input_layernorm [H],
// q_proj [nh * 2 * hd, H] (per head: query, then gate), k_proj, v_proj [nkv * hd, H], q_norm, k_norm
// [hd], o_proj [H, nh * hd], post_attention_layernorm [H], gate_proj, up_proj [I, H], down_proj [H, I],
// norm [H], draft [Vq, H] (the output rows the head drafts from), all float32; with bf16_matrices, fc,
// the projections, the MLP's and draft are bfloat16 (see mtpnb_small_matmul_bf16). context_draft
// [context_rows, H] (same type as draft; NULL when context_rows is 0): more output rows, the generation's
// own context tokens outside the shortlist, after draft's (one generation's, where draft is the model's).
// vocab [Vq + context_rows]: the rows' token ids (NULL: row i is token i, and no context rows). width >=
// Vq + context_rows: the length of a logits row, -inf past the rows' columns (a generation keeps one width
// while its context rows grow, so that what reads the logits keeps its shapes).
// dims: H, nh, nkv, hd, rot (RoPE's rotated dims, non-traditional), I, Vq.
// keys, values: the cache [nkv, cap, hd] (NULL when offset is 0). Step 0 runs on the n input rows
// hidden [n, H] and tokens [n]; g [H] gets each step's output. logits [steps, width]; each step's draft row goes to columns [steps], and
// its token, with g, is the next step's input row. The draft: the row's argmax (greedy, `sampling` NULL),
// or a draw (draw_row, which turns the step's logits into the distribution drawn from) with the step's
// uniform number uniforms[s] in [0, 1).
enum { W_EMBED, W_NORM_E, W_NORM_H, W_FC, W_NORM_IN, W_Q, W_K, W_V, W_QNORM, W_KNORM, W_O, W_NORM_POST,
       W_GATE, W_UP, W_DOWN, W_NORM, W_DRAFT };

static void rms_norm(const float* x, const float* w, float* y, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

static void rope(float* x, int rot, int position, float log_base) {
    const int half = rot / 2;
    for (int i = 0; i < half; i++) {
        const float angle = (float)position * expf(-(float)i * log_base / (float)half);
        const float c = cosf(angle), s = sinf(angle), x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c - x2 * s;
        x[i + half] = x1 * s + x2 * c;
    }
}

// y[M, N] = x[M, K] . W^T for any M: mtpnb_small_matmul(_bf16) on blocks of MAX_ROWS rows.
static void matmul(const float* x, const void* W, int bf16_weights, float* y, int M, int N, int K, int threads) {
    for (int m = 0; m < M; m += MAX_ROWS) {
        const int rows = M - m < MAX_ROWS ? M - m : MAX_ROWS;
        if (bf16_weights)
            mtpnb_small_matmul_bf16(x + (size_t)m * K, W, y + (size_t)m * N, rows, N, K, threads);
        else
            mtpnb_small_matmul(x + (size_t)m * K, W, y + (size_t)m * N, rows, N, K, threads);
    }
}

// A sampled draft. The drafts only propose: the acceptance is exact for any distribution q they are drawn
// from, as long as it reads that q. So the row of logits becomes q, as normalized log-probabilities (-inf
// where filtered), and the draft is drawn from it. q follows the target's processing (mtpnb.sampling:
// top-p, min-p and top-k on the untempered log-probabilities keep a prefix of the tokens ranked by
// probability, top-p judged on the whole row's mass; the temperature divides what survives), so that the
// drafts are accepted as often as the head allows. sampling: temperature (> 0), top-p, min-p, top-k (0:
// none); ranked [Vq]: scratch. The draw: inverse CDF at u over the survivors, the most probable first.
// Returns the drawn row.
struct ranked {
    float logit;
    int row;
};

static int by_logit(const void* a, const void* b) {  // descending; ties by row, so the order is total
    const struct ranked *x = a, *y = b;
    if (x->logit != y->logit) return x->logit < y->logit ? 1 : -1;
    return x->row - y->row;
}

// The k best rows, best first (ties: the lower row first, as by_logit), by insertion into a sorted prefix.
static int best_of(const float* row, int Vq, int k, struct ranked* ranked) {
    int n = 0;
    for (int i = 0; i < Vq; i++) {
        if (n == k && row[i] <= ranked[n - 1].logit) continue;
        int j = n < k ? n++ : n - 1;
        for (; j > 0 && ranked[j - 1].logit < row[i]; j--) ranked[j] = ranked[j - 1];
        ranked[j] = (struct ranked){row[i], i};
    }
    return n;
}

#define RANK_FIRST 64

static int draw_row(float* row, int Vq, const float* sampling, float u, struct ranked* ranked) {
    const float temperature = sampling[0], top_p = sampling[1], min_p = sampling[2];
    const int top_k = (int)sampling[3];
    float top = row[0];
    for (int i = 1; i < Vq; i++)
        if (row[i] > top) top = row[i];
    double total = 0.0;
    for (int i = 0; i < Vq; i++) total += exp((double)row[i] - top);
    const double log_z = top + log(total);  // the untempered log-probabilities: row - log_z
    int n;  // the candidates in ranked[0, n), best first
    if (top_k > 0 && top_k < Vq) {
        n = best_of(row, Vq, top_k, ranked);
    } else if (top_p < 1.0f || min_p > 0.0f) {
        // Their prefix is short on a peaked row: the RANK_FIRST best are ranked, and the whole row is sorted
        // (a large vocabulary's cost) only if the prefix could run past them.
        n = best_of(row, Vq, RANK_FIRST < Vq ? RANK_FIRST : Vq, ranked);
        double mass = 0.0;
        for (int r = 0; r < n; r++) mass += exp(ranked[r].logit - log_z);
        const int ends = (top_p < 1.0f && mass >= top_p)
                         || (min_p > 0.0f && ranked[n - 1].logit < ranked[0].logit + log((double)min_p));
        if (!ends && n < Vq) {
            for (int i = 0; i < Vq; i++) ranked[i] = (struct ranked){row[i], i};
            qsort(ranked, Vq, sizeof *ranked, by_logit);
            n = Vq;
        }
    } else {  // no filter: every row, in any order
        for (int i = 0; i < Vq; i++) ranked[i] = (struct ranked){row[i], i};
        n = Vq;
    }
    // the prefix that top-p and min-p keep (the best token always)
    int m = 1;
    double mass = exp(ranked[0].logit - log_z);
    const double lowest = min_p > 0.0f ? ranked[0].logit + log((double)min_p) : -INFINITY;
    while (m < n && (top_p >= 1.0f || mass < top_p) && ranked[m].logit >= lowest)
        mass += exp(ranked[m++].logit - log_z);
    // tempered and normalized over the survivors (none above the row's best: the sum cannot overflow)
    const double best = (top - log_z) / temperature;
    double tempered = 0.0;
    for (int r = 0; r < m; r++) tempered += exp((ranked[r].logit - log_z) / temperature - best);
    const double log_t = best + log(tempered);
    for (int i = 0; i < Vq; i++) row[i] = -INFINITY;
    double cdf = 0.0;
    for (int r = 0; r < m; r++) {
        row[ranked[r].row] = (float)((ranked[r].logit - log_z) / temperature - log_t);
        cdf += exp((double)row[ranked[r].row]);
    }
    const double target = u * cdf;  // the float q sums to 1 within rounding: draw against its own total
    double below = 0.0;
    for (int r = 0; r < m - 1; r++)
        if ((below += exp((double)row[ranked[r].row])) > target) return ranked[r].row;
    return ranked[m - 1].row;
}

int mtpnb_qwen_head_steps(const void* const* weights, int bf16_matrices, const int* vocab, const void* context_draft,
                          int context_rows, int width, const int* dims, float eps, float log_base, const float* keys, const float* values, int cap, int offset,
                          float* round_keys, float* round_values, const float* hidden, const int* tokens, int n,
                          float* g, int steps, const float* sampling, const float* uniforms, int* columns,
                          float* logits, int threads) {
    const float* const* w = (const float* const*)weights;  // the float32 ones; the matrices through `weights`
    const int bf = bf16_matrices;
    const int H = dims[0], nh = dims[1], nkv = dims[2], hd = dims[3], rot = dims[4], I = dims[5], Vq = dims[6];
    const int Vt = Vq + context_rows;  // a logits row: the shortlist's, then the context's
    if (context_rows < 0 || (context_rows && !(context_draft && vocab)) || width < Vt)
        return -1;
    if (H < 1 || nh < 1 || nkv < 1 || nh % nkv || hd < 1 || rot > hd || rot % 2 || I < 1 || Vq < 1 || steps < 1
        || n < 1 || offset < 0 || offset > cap || (offset && !(keys && values)) || !columns
        || (sampling && !(uniforms && sampling[0] > 0.0f)))
        return -1;
    const int qg = nh * 2 * hd, kvd = nkv * hd, group = nh / nkv;
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t need = (size_t)n * (2 * H + H + H + 2 * kvd) + qg + nh * hd + 4 * H + 2 * I + offset + n
                        + steps;
    float* buf = malloc(sizeof(float) * need);
    struct ranked* ranked = sampling ? malloc(sizeof(struct ranked) * Vt) : NULL;
    if (!buf || (sampling && !ranked)) {
        free(buf);
        return -2;
    }
    float *x2 = buf, *z = x2 + (size_t)n * 2 * H, *r = z + (size_t)n * H, *k = r + (size_t)n * H;
    float *v = k + (size_t)n * kvd, *q = v + (size_t)n * kvd, *att = q + qg, *o = att + nh * hd, *h = o + H;
    float *r2 = h + H, *mlp = r2 + H, *up = mlp + H, *gt = up + I, *score = gt + I;
    int row0 = 0, token = 0;  // token: the previous step's draft, for the steps after the first
    for (int s = 0; s < steps; s++) {
        const int m = s ? 1 : n;  // the step's input rows; the last one drafts
        for (int i = 0; i < m; i++) {
            rms_norm(w[W_EMBED] + (size_t)(s ? token : tokens[i]) * H, w[W_NORM_E], x2 + (size_t)i * 2 * H, H, eps);
            rms_norm(s ? g : hidden + (size_t)i * H, w[W_NORM_H], x2 + (size_t)i * 2 * H + H, H, eps);
        }
        matmul(x2, weights[W_FC], bf, z, m, H, 2 * H, threads);
        for (int i = 0; i < m; i++) rms_norm(z + (size_t)i * H, w[W_NORM_IN], r + (size_t)i * H, H, eps);
        matmul(r, weights[W_K], bf, k, m, kvd, H, threads);
        matmul(r, weights[W_V], bf, v, m, kvd, H, threads);
        for (int i = 0; i < m; i++) {
            for (int j = 0; j < nkv; j++) {
                float* kj = round_keys + (size_t)(row0 + i) * kvd + (size_t)j * hd;
                rms_norm(k + (size_t)i * kvd + (size_t)j * hd, w[W_KNORM], kj, hd, eps);
                rope(kj, rot, offset + row0 + i, log_base);
            }
            memcpy(round_values + (size_t)(row0 + i) * kvd, v + (size_t)i * kvd, sizeof(float) * kvd);
        }
        row0 += m;
        const int seen = offset + row0;  // the rows the drafting row attends over, itself the last
        const float *zl = z + (size_t)(m - 1) * H, *rl = r + (size_t)(m - 1) * H;
        matmul(rl, weights[W_Q], bf, q, 1, qg, H, threads);
        for (int i = 0; i < nh; i++) {
            float qi[hd];
            rms_norm(q + (size_t)i * 2 * hd, w[W_QNORM], qi, hd, eps);
            rope(qi, rot, seen - 1, log_base);
            const int j = i / group;
            const float* Kj = keys + (size_t)j * cap * hd;
            const float* Vj = values + (size_t)j * cap * hd;
            float top = -INFINITY;
            for (int t = 0; t < seen; t++) {
                const float* kt = t < offset ? Kj + (size_t)t * hd
                                             : round_keys + (size_t)(t - offset) * kvd + (size_t)j * hd;
                score[t] = dot(qi, kt, hd) * scale;
                if (score[t] > top) top = score[t];
            }
            float total = 0.0f;
            for (int t = 0; t < seen; t++) total += (score[t] = expf(score[t] - top));
            float* out = att + (size_t)i * hd;
            for (int d = 0; d < hd; d++) out[d] = 0.0f;
            for (int t = 0; t < seen; t++) {
                const float* vt = t < offset ? Vj + (size_t)t * hd
                                             : round_values + (size_t)(t - offset) * kvd + (size_t)j * hd;
                const float p = score[t] / total;
                for (int d = 0; d < hd; d++) out[d] += p * vt[d];
            }
            const float* gate = q + (size_t)i * 2 * hd + hd;
            for (int d = 0; d < hd; d++) out[d] *= 1.0f / (1.0f + expf(-gate[d]));
        }
        matmul(att, weights[W_O], bf, o, 1, H, nh * hd, threads);
        for (int i = 0; i < H; i++) h[i] = zl[i] + o[i];
        rms_norm(h, w[W_NORM_POST], r2, H, eps);
        matmul(r2, weights[W_GATE], bf, gt, 1, I, H, threads);
        matmul(r2, weights[W_UP], bf, up, 1, I, H, threads);
        for (int i = 0; i < I; i++) gt[i] = gt[i] / (1.0f + expf(-gt[i])) * up[i];
        matmul(gt, weights[W_DOWN], bf, mlp, 1, H, I, threads);
        for (int i = 0; i < H; i++) h[i] += mlp[i];
        rms_norm(h, w[W_NORM], g, H, eps);
        float* row = logits + (size_t)s * width;
        matmul(g, weights[W_DRAFT], bf, row, 1, Vq, H, threads);
        if (context_rows)
            matmul(g, context_draft, bf, row + Vq, 1, context_rows, H, threads);
        for (int i = Vt; i < width; i++) row[i] = -INFINITY;
        int drafted = 0;
        if (sampling) {
            drafted = draw_row(row, Vt, sampling, uniforms[s], ranked);
        } else {
            for (int i = 1; i < Vt; i++)
                if (row[i] > row[drafted]) drafted = i;
        }
        columns[s] = drafted;
        token = vocab ? vocab[drafted] : drafted;
    }
    free(ranked);
    free(buf);
    return 0;
}
