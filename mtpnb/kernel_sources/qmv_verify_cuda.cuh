// mtpnb verify-shaped quantized mat-vec for MLX's CUDA backend (header part).
//
// y[M, N] = x[M, K] @ dequant(W)^T   for M = 1..8 activation rows,
// W in MLX's affine layout (mx.quantize): packed uint32 [N, K*BITS/32],
// scales and biases [N, K/GS] in the activation dtype. BITS in {4, 8},
// GS in {32, 64}, T in {bfloat16, float16}.
//
// Each weight is read from memory once for all M rows: the M (<= 8) rows of x
// are the N=8 side of one tensor-core mma.m16n8k16, the weights are the
// 16-row A side. Per group the quad of lanes that shares a mma covers exactly
// that group, so the group's scale and bias are applied after the mma, in fp32:
//
//   sum_k (s*w_k + b) x_k = s * sum_k (w_k + OFF) x_k + (b - OFF*s) * sum_k x_k
//
// where (w_k + OFF) is what the packed nibble/byte turns into with one LOP3
// (the "magic number" trick: OR the integer into the mantissa of a constant),
// and sum_k x_k comes from one more mma against an all-ones A. No per-weight
// multiply by the scale, no bf16 rounding of dequantized weights.
//
// Thread layout: lane = 4*g + c (g = groupID 0..7, c = thread in quad 0..3).
// Per group and 16-row tile, lane (g, c) loads WPT consecutive words of rows
// g and g+8 (the c-th quarter of the group), and x[token g] for those k's.
// Which k goes into which mma k-slot is free as long as A and B agree:
//   4-bit word (k0..k7): slots {2c,2c+1} <- (k0,k4), {2c+8,2c+9} <- (k1,k5),
//                        then a second mma with (k2,k6), (k3,k7);
//   8-bit word (k0..k3): slots {2c,2c+1} <- (k0,k2), {2c+8,2c+9} <- (k1,k3),
//                        low nibbles in one mma, high nibbles (x16) in another.
// A block = KSPLIT warps on the same 16*TILES rows, splitting K in batches of
// U groups; partial sums are added through shared memory at the end.

#ifndef MTPNB_QMV_VERIFY_CUH
#define MTPNB_QMV_VERIFY_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mtpnb_qmv {

// (a & b) | c in one LOP3. Written out because with two immediates the
// compiler emits an AND and an OR; here mask and magic live in registers.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <typename T>
struct Traits;

template <>
struct Traits<__nv_bfloat16> {
  static constexpr uint32_t MAGIC_LO = 0x43004300u;  // 128 + v   (v < 128)
  static constexpr uint32_t MAGIC_HI = 0x45004500u;  // 2048 + 16 v (v < 16)
  static constexpr uint32_t ONES = 0x3F803F80u;      // 1.0, 1.0
  static constexpr float OFF4 = 128.0f;
  static constexpr float OFF8 = 2176.0f;             // 128 + 2048
  // v: the 16 bits (in the low half); hi/raw: whether they are the high
  // half of raw (bf16 -> f32 is then one AND instead of a shift).
  static __device__ __forceinline__ float half_to_float(uint32_t v, bool hi, uint32_t raw) {
    return __uint_as_float(hi ? (raw & 0xFFFF0000u) : (v << 16));
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16(v);
  }
  static __device__ __forceinline__ void mma(
      float d[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
      uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

template <>
struct Traits<__half> {
  static constexpr uint32_t MAGIC_LO = 0x64006400u;  // 1024 + v
  static constexpr uint32_t MAGIC_HI = 0x74007400u;  // 16384 + 16 v
  static constexpr uint32_t ONES = 0x3C003C00u;
  static constexpr float OFF4 = 1024.0f;
  static constexpr float OFF8 = 17408.0f;            // 1024 + 16384
  static __device__ __forceinline__ float half_to_float(uint32_t v, bool, uint32_t) {
    return __half2float(__ushort_as_half((unsigned short)(v & 0xFFFFu)));
  }
  static __device__ __forceinline__ __half from_float(float v) {
    return __float2half_rn(v);
  }
  static __device__ __forceinline__ void mma(
      float d[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
      uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

// Streamed weight loads: read once, keep them out of L1, ask L2 for the whole
// 128-byte line (the quad reads 8-16 bytes of a row per instruction; the
// following groups of the same row are in the same line).
template <int NW>
struct WVec;
template <>
struct WVec<1> {
  static __device__ __forceinline__ void load(uint32_t* d, const uint32_t* p) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::128B.u32 %0, [%1];\n"
                 : "=r"(d[0]) : "l"(p));
  }
};
template <>
struct WVec<2> {
  static __device__ __forceinline__ void load(uint32_t* d, const uint32_t* p) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v2.u32 {%0,%1}, [%2];\n"
                 : "=r"(d[0]), "=r"(d[1]) : "l"(p));
  }
};
template <>
struct WVec<4> {
  static __device__ __forceinline__ void load(uint32_t* d, const uint32_t* p) {
    asm volatile(
        "ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]) : "l"(p));
  }
};

// cp.async (LDGSTS): global -> shared without registers; each lane later reads
// only the bytes it copied itself, so waiting on its own groups is enough.
template <int BYTES>
__device__ __forceinline__ void cp_async(uint32_t saddr, const void* g) {
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(saddr), "l"(g));
  } else {
    asm volatile("cp.async.ca.shared.global.L2::128B [%0], [%1], %2;\n" ::"r"(saddr), "l"(g),
                 "n"(BYTES));
  }
}
// 16 bytes, or zeros when src_bytes == 0 (lanes whose token row does not exist).
__device__ __forceinline__ void cp_async16_zfill(uint32_t saddr, const void* g, int src_bytes) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(g),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// U consecutive 16-bit values (scales or biases of U consecutive groups),
// kept packed two to a register.
template <int U>
struct SVec {
  static constexpr int NR = (U + 1) / 2;
  static __device__ __forceinline__ void load(uint32_t* d, const uint16_t* p) {
    if constexpr (U == 1) {
      d[0] = __ldg(p);
    } else if constexpr (U == 2) {
      d[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
    } else {
      static_assert(U == 4, "U");
      uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
      d[0] = v.x;
      d[1] = v.y;
    }
  }
  // Value u as float (T given by the traits).
  template <typename Tr>
  static __device__ __forceinline__ float get(const uint32_t* d, int u) {
    const uint32_t r = d[u >> 1];
    return Tr::half_to_float((u & 1) ? (r >> 16) : (r & 0xFFFFu), (u & 1) != 0, r);
  }
};

template <int TILES, int U, int WPT>
struct Batch {
  uint32_t w[TILES][2][U][WPT];
  uint32_t s[TILES][2][SVec<U>::NR];
  uint32_t b[TILES][2][SVec<U>::NR];
};

// acc[t][2h+e] is (row blockIdx.x * 16 * TILES + 16t + 8h + g, token 2c + e): add the
// KSPLIT warps' partial sums (shared memory) and write y[token, row] for token < M.
template <typename T, int TILES, int KSPLIT>
__device__ __forceinline__ void store_rows(
    const float (&acc)[TILES][4], T* __restrict__ y, const int M, const int N,
    const int warp, const int g, const int c) {
  using Tr = Traits<T>;
  constexpr int ROWS = 16 * TILES;
  // acc[t][2h+e] is (row row0 + 16t + 8h + g, token 2c + e).
  const int row0 = blockIdx.x * ROWS;
  if constexpr (KSPLIT == 1) {
#pragma unroll
    for (int t = 0; t < TILES; ++t) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = row0 + 16 * t + 8 * h + g;
          const int tok = 2 * c + e;
          if (tok < M) {
            y[long(tok) * N + r] = Tr::from_float(acc[t][2 * h + e]);
          }
        }
      }
    }
  } else {
    __shared__ float red[KSPLIT][ROWS * 8];
#pragma unroll
    for (int t = 0; t < TILES; ++t) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          red[warp][(16 * t + 8 * h + g) * 8 + 2 * c + e] = acc[t][2 * h + e];
        }
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < ROWS * 8; i += 32 * KSPLIT) {
      const int tok = i / ROWS;
      const int rl = i % ROWS;
      float v = 0.0f;
#pragma unroll
      for (int k = 0; k < KSPLIT; ++k) v += red[k][rl * 8 + tok];
      if (tok < M) {
        y[long(tok) * N + row0 + rl] = Tr::from_float(v);
      }
    }
  }
}

// One batch of U groups: B holds this lane's packed words, scales and biases,
// get_x(u, v) the v-th 8 x values of group u for token g. Accumulates into acc.
template <typename T, int BITS, int GS, int TILES, int U, class XGet>
__device__ __forceinline__ void compute_batch(
    const Batch<TILES, U, GS * BITS / 128>& B, XGet get_x, float (&acc)[TILES][4]) {
  using Tr = Traits<T>;
  constexpr int WPT = GS * BITS / 128;
  constexpr int XV = GS / 32;
  constexpr float OFF = (BITS == 4) ? Tr::OFF4 : Tr::OFF8;
  const uint32_t MASK = 0x000F000Fu;
  const uint32_t MLO = Tr::MAGIC_LO;
  const uint32_t MHI = Tr::MAGIC_HI;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    uint4 xv[XV];
#pragma unroll
    for (int v = 0; v < XV; ++v) xv[v] = get_x(u, v);
    float X[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float D[TILES][4];
#pragma unroll
    for (int t = 0; t < TILES; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) D[t][e] = 0.0f;
    }
#pragma unroll
    for (int wi = 0; wi < WPT; ++wi) {
      if constexpr (BITS == 4) {
        const uint4 xr = xv[wi];
        // x0..x7 of this word's 8 k's, paired as the weights are.
        const uint32_t b00 = __byte_perm(xr.x, xr.z, 0x5410);  // (x0, x4)
        const uint32_t b01 = __byte_perm(xr.x, xr.z, 0x7632);  // (x1, x5)
        const uint32_t b10 = __byte_perm(xr.y, xr.w, 0x5410);  // (x2, x6)
        const uint32_t b11 = __byte_perm(xr.y, xr.w, 0x7632);  // (x3, x7)
        Tr::mma(X, Tr::ONES, Tr::ONES, Tr::ONES, Tr::ONES, b00, b01);
        Tr::mma(X, Tr::ONES, Tr::ONES, Tr::ONES, Tr::ONES, b10, b11);
#pragma unroll
        for (int t = 0; t < TILES; ++t) {
          const uint32_t q0 = B.w[t][0][u][wi];  // row g
          const uint32_t q1 = B.w[t][1][u][wi];  // row g + 8
          const uint32_t p00 = and_or(q0, MASK, MLO);          // (w0, w4)
          const uint32_t p10 = and_or(q0 >> 4, MASK, MLO);     // (w1, w5)
          const uint32_t p20 = and_or(q0 >> 8, MASK, MLO);     // (w2, w6)
          const uint32_t p30 = and_or(q0 >> 12, MASK, MLO);    // (w3, w7)
          const uint32_t p01 = and_or(q1, MASK, MLO);
          const uint32_t p11 = and_or(q1 >> 4, MASK, MLO);
          const uint32_t p21 = and_or(q1 >> 8, MASK, MLO);
          const uint32_t p31 = and_or(q1 >> 12, MASK, MLO);
          Tr::mma(D[t], p00, p01, p10, p11, b00, b01);
          Tr::mma(D[t], p20, p21, p30, p31, b10, b11);
        }
      } else {
        const uint4 xr = xv[wi >> 1];
        const uint32_t r0 = (wi & 1) ? xr.z : xr.x;  // (x0, x1)
        const uint32_t r1 = (wi & 1) ? xr.w : xr.y;  // (x2, x3)
        const uint32_t b0 = __byte_perm(r0, r1, 0x5410);  // (x0, x2)
        const uint32_t b1 = __byte_perm(r0, r1, 0x7632);  // (x1, x3)
        Tr::mma(X, Tr::ONES, Tr::ONES, Tr::ONES, Tr::ONES, b0, b1);
#pragma unroll
        for (int t = 0; t < TILES; ++t) {
          const uint32_t q0 = B.w[t][0][u][wi];
          const uint32_t q1 = B.w[t][1][u][wi];
          const uint32_t l0 = and_or(q0, MASK, MLO);           // (lo b0, lo b2)
          const uint32_t h0 = and_or(q0 >> 4, MASK, MHI);      // (hi b0, hi b2)
          const uint32_t l0b = and_or(q0 >> 8, MASK, MLO);     // (lo b1, lo b3)
          const uint32_t h0b = and_or(q0 >> 12, MASK, MHI);    // (hi b1, hi b3)
          const uint32_t l1 = and_or(q1, MASK, MLO);
          const uint32_t h1 = and_or(q1 >> 4, MASK, MHI);
          const uint32_t l1b = and_or(q1 >> 8, MASK, MLO);
          const uint32_t h1b = and_or(q1 >> 12, MASK, MHI);
          Tr::mma(D[t], l0, l1, l0b, l1b, b0, b1);
          Tr::mma(D[t], h0, h1, h0b, h1b, b0, b1);
        }
      }
    }
    // Per-group scale and bias, in fp32.
#pragma unroll
    for (int t = 0; t < TILES; ++t) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float s = SVec<U>::template get<Tr>(B.s[t][h], u);
        const float bb = SVec<U>::template get<Tr>(B.b[t][h], u);
        const float bo = fmaf(-OFF, s, bb);
        acc[t][2 * h + 0] = fmaf(s, D[t][2 * h + 0], fmaf(bo, X[0], acc[t][2 * h + 0]));
        acc[t][2 * h + 1] = fmaf(s, D[t][2 * h + 1], fmaf(bo, X[1], acc[t][2 * h + 1]));
      }
    }
  }
}

template <typename T, int BITS, int GS, int TILES, int KSPLIT, int U>
__device__ __forceinline__ void qmv_verify_impl(
    const T* __restrict__ x,
    const uint32_t* __restrict__ w,
    const T* __restrict__ scales,
    const T* __restrict__ biases,
    T* __restrict__ y,
    const int M,
    const int N,
    const int K) {
  static_assert(BITS == 4 || BITS == 8, "bits");
  static_assert(GS == 32 || GS == 64 || GS == 128, "group size");
  using Tr = Traits<T>;
  constexpr int ROWS = 16 * TILES;
  constexpr int WPG = GS * BITS / 32;   // packed words per group and row
  constexpr int WPT = WPG / 4;          // ... per lane of the quad
  constexpr int KPT = GS / 4;           // k's per lane per group
  static_assert(WPT == 1 || WPT == 2 || WPT == 4, "words per lane");

  // The caller guarantees N % ROWS == 0, K % (GS * U) == 0, 1 <= M <= 8.
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int c = lane & 3;
  const int G = K / GS;                 // groups per row
  const int NB = G / U;                 // batches of U groups
  const int wstride = K * BITS / 32;    // words per row
  const int row = blockIdx.x * ROWS + g;

  // Lane's first row (tile 0, half 0); the others are 8 * wstride apart.
  const uint32_t* wp = w + long(row) * wstride + c * WPT;
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales) + long(row) * G;
  const uint16_t* bp = reinterpret_cast<const uint16_t*>(biases) + long(row) * G;
  const int w8 = 8 * wstride;
  const int s8 = 8 * G;

  const bool has_tok = g < M;
  const T* xp = x + long(has_tok ? g : 0) * K + c * KPT;


  float acc[TILES][4];
#pragma unroll
  for (int t = 0; t < TILES; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = 0.0f;
  }

  auto load_batch = [&](Batch<TILES, U, WPT>& B, int bi) {
#pragma unroll
    for (int t = 0; t < TILES; ++t) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int th = 2 * t + h;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          WVec<WPT>::load(B.w[t][h][u], wp + th * w8 + (bi * U + u) * WPG);
        }
        SVec<U>::load(B.s[t][h], sp + th * s8 + bi * U);
        SVec<U>::load(B.b[t][h], bp + th * s8 + bi * U);
      }
    }
  };

  auto compute_v1 = [&](const Batch<TILES, U, WPT>& B, int bi) {
    compute_batch<T, BITS, GS, TILES, U>(
        B,
        [&](int u, int v) -> uint4 {
          return has_tok ? __ldg(reinterpret_cast<const uint4*>(xp + (bi * U + u) * GS) + v)
                         : make_uint4(0u, 0u, 0u, 0u);
        },
        acc);
  };

  // Two register sets: the next batch's loads are in flight while this one
  // is computed.
  Batch<TILES, U, WPT> b0, b1;
  int bi = warp;
  if (bi < NB) load_batch(b0, bi);
  while (bi < NB) {
    int nb = bi + KSPLIT;
    if (nb < NB) load_batch(b1, nb);
    compute_v1(b0, bi);
    bi = nb;
    if (bi >= NB) break;
    nb = bi + KSPLIT;
    if (nb < NB) load_batch(b0, nb);
    compute_v1(b1, bi);
    bi = nb;
  }

  store_rows<T, TILES, KSPLIT>(acc, y, M, N, warp, g, c);
}


// The same computation with a deeper pipeline: each lane copies its packed
// words, scales, biases and x values for a batch straight into its own slice
// of shared memory (cp.async), S batches ahead, so up to S-1 batches per warp
// are in flight without holding registers, and the mma loop never waits on a
// global load of x. Dynamic shared memory: KSPLIT * S * 32 * ring_lane_bytes().
// Correct, but measured slower than qmv_verify_impl on the H200 (48 vs 39 us on a
// 5120x17408 4-bit matrix; kernels/NOTES.md): the loader uses it only as a fallback.
template <int BITS, int GS, int TILES, int U>
__host__ __device__ constexpr int ring_lane_bytes() {
  // sizeof(Batch) + the x values, rounded up to an odd number of 16-byte
  // units so that lanes' 16-byte reads do not share banks.
  return ((((4 * (TILES * 2 * U * (GS * BITS / 128) + 2 * TILES * 2 * ((U + 1) / 2)) +
             U * (GS / 32) * 16) / 16) | 1) * 16);
}

template <typename T, int BITS, int GS, int TILES, int KSPLIT, int U, int S>
__device__ __forceinline__ void qmv_verify_ring_impl(
    const T* __restrict__ x,
    const uint32_t* __restrict__ w,
    const T* __restrict__ scales,
    const T* __restrict__ biases,
    T* __restrict__ y,
    const int M,
    const int N,
    const int K) {
  static_assert(U == 2 || U == 4, "ring: U in {2, 4}");
  static_assert(S >= 2 && S <= 16, "stages");
  constexpr int ROWS = 16 * TILES;
  constexpr int WPG = GS * BITS / 32;
  constexpr int WPT = WPG / 4;
  constexpr int KPT = GS / 4;
  constexpr int XV = KPT / 8;
  constexpr int NR = (U + 1) / 2;
  using BatchT = Batch<TILES, U, WPT>;
  constexpr int WBYTES = TILES * 2 * U * WPT * 4;
  constexpr int SBYTES = TILES * 2 * NR * 4;
  constexpr int XOFF = int(sizeof(BatchT));
  constexpr int P = ring_lane_bytes<BITS, GS, TILES, U>();
  static_assert(XOFF == WBYTES + 2 * SBYTES && XOFF % 16 == 0, "layout");
  static_assert(P >= XOFF + U * XV * 16, "lane bytes");

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int c = lane & 3;
  const int G = K / GS;
  const int NB = G / U;
  const int wstride = K * BITS / 32;
  const int row = blockIdx.x * ROWS + g;
  const uint32_t* wp = w + long(row) * wstride + c * WPT;
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales) + long(row) * G;
  const uint16_t* bp = reinterpret_cast<const uint16_t*>(biases) + long(row) * G;
  const int w8 = 8 * wstride;
  const int s8 = 8 * G;
  const bool has_tok = g < M;
  const T* xp = x + long(has_tok ? g : 0) * K + c * KPT;

  extern __shared__ uint4 mtpnb_ring[];
  unsigned char* lane_base =
      reinterpret_cast<unsigned char*>(mtpnb_ring) + (warp * S * 32 + lane) * P;
  const uint32_t lane_saddr = uint32_t(__cvta_generic_to_shared(lane_base));

  auto issue = [&](int slot, int bi) {
    const uint32_t sa = lane_saddr + slot * 32 * P;
#pragma unroll
    for (int t = 0; t < TILES; ++t) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int th = 2 * t + h;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          cp_async<WPT * 4>(sa + (th * U + u) * WPT * 4, wp + th * w8 + (bi * U + u) * WPG);
        }
        cp_async<2 * U>(sa + WBYTES + th * NR * 4, sp + th * s8 + bi * U);
        cp_async<2 * U>(sa + WBYTES + SBYTES + th * NR * 4, bp + th * s8 + bi * U);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int v = 0; v < XV; ++v) {
        cp_async16_zfill(sa + XOFF + (u * XV + v) * 16, xp + (bi * U + u) * GS + v * 8,
                         has_tok ? 16 : 0);
      }
    }
  };

  float acc[TILES][4];
#pragma unroll
  for (int t = 0; t < TILES; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = 0.0f;
  }

  // This warp's batches: warp, warp + KSPLIT, ...
  const int nmy = warp < NB ? (NB - 1 - warp) / KSPLIT + 1 : 0;
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < nmy) issue(s, warp + s * KSPLIT);
    cp_async_commit();
  }
  int slot = 0;
  int nslot = S - 1;
  for (int i = 0; i < nmy; ++i) {
    cp_async_wait<S - 2>();  // batch i (this lane's copies) has landed
    const unsigned char* base = lane_base + slot * 32 * P;
    const BatchT& B = *reinterpret_cast<const BatchT*>(base);
    const uint4* xs = reinterpret_cast<const uint4*>(base + XOFF);
    compute_batch<T, BITS, GS, TILES, U>(
        B, [&](int u, int v) -> uint4 { return xs[u * XV + v]; }, acc);
    if (i + S - 1 < nmy) issue(nslot, warp + (i + S - 1) * KSPLIT);
    cp_async_commit();
    slot = (slot + 1 == S) ? 0 : slot + 1;
    nslot = (nslot + 1 == S) ? 0 : nslot + 1;
  }
  cp_async_wait<0>();

  store_rows<T, TILES, KSPLIT>(acc, y, M, N, warp, g, c);
}

}  // namespace mtpnb_qmv

#endif
