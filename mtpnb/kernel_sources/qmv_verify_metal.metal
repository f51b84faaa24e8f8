// mtpnb verify-shaped quantized mat-vec for MLX's Metal backend (mx.fast.metal_kernel).
//
// UNTESTED: written here without a Mac; nobody has compiled or run it yet. mtpnb.kernels
// checks it against mx.quantized_matmul before first use and falls back (saying so) if it
// fails to compile or disagrees. tests/test_kernels.py::test_metal_kernel_matches_stock is the
// test to run on a Mac.
//
// Same algorithm as the CUDA kernel (kernels/qmv_verify_cuda.cuh), without tensor cores:
// y[M, N] = x[M, K] @ dequant(W)^T for M = 1..8, W in MLX's affine layout (packed uint32
// [N, K*BITS/32], scales/biases [N, K/GS]). Each weight is read once for all M rows: a lane
// holds 8 consecutive k's of ROWS output rows and of all M rows of x, accumulates the integer
// dot products per row and token, and applies the group's scale and bias in fp32 afterwards:
//   sum_k (s*w_k + b) x_k = s * sum_k w_k x_k + b * sum_k x_k.
// A simdgroup owns ROWS output rows and walks K in steps of 32 lanes x 8 k's; simd_sum
// reduces at the end. Template constants: T, BITS (4|8), GS (32|64), ROWS, SIMDS.
//
// The text before the "body" marker line below is the kernel header, the rest the body.

// ---- body ----
  const int M = int(x_shape[0]);
  const int K = int(x_shape[1]);
  const int N = int(w_shape[0]);
  const int G = K / GS;
  const int wstride = K * BITS / 32;
  const uint lane = thread_index_in_simdgroup;
  const int row0 =
      (int(threadgroup_position_in_grid.x) * SIMDS + int(simdgroup_index_in_threadgroup)) * ROWS;
  if (row0 >= N) {
    return;
  }

  float acc[ROWS][8];
  for (int r = 0; r < ROWS; ++r) {
    for (int m = 0; m < 8; ++m) {
      acc[r][m] = 0.0f;
    }
  }

  for (int k0 = int(lane) * 8; k0 < K; k0 += 32 * 8) {
    const int j = k0 / GS;
    float xv[8][8];
    float xs[8];
    for (int m = 0; m < 8; ++m) {
      xs[m] = 0.0f;
      for (int i = 0; i < 8; ++i) {
        float v = (m < M) ? float(x[m * K + k0 + i]) : 0.0f;
        xv[m][i] = v;
        xs[m] += v;
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      const int row = min(row0 + r, N - 1);
      float wv[8];
      if (BITS == 4) {
        const uint q = w[row * wstride + k0 / 8];
        for (int i = 0; i < 8; ++i) {
          wv[i] = float((q >> (4 * i)) & 0xFu);
        }
      } else {
        const uint q0 = w[row * wstride + k0 / 4];
        const uint q1 = w[row * wstride + k0 / 4 + 1];
        for (int i = 0; i < 4; ++i) {
          wv[i] = float((q0 >> (8 * i)) & 0xFFu);
          wv[4 + i] = float((q1 >> (8 * i)) & 0xFFu);
        }
      }
      const float s = float(scales[row * G + j]);
      const float b = float(biases[row * G + j]);
      for (int m = 0; m < 8; ++m) {
        if (m < M) {
          float d = 0.0f;
          for (int i = 0; i < 8; ++i) {
            d = fma(wv[i], xv[m][i], d);
          }
          acc[r][m] += s * d + b * xs[m];
        }
      }
    }
  }

  for (int r = 0; r < ROWS; ++r) {
    for (int m = 0; m < 8; ++m) {
      const float v = simd_sum(acc[r][m]);
      if (lane == 0 && m < M && row0 + r < N) {
        y[m * N + row0 + r] = static_cast<T>(v);
      }
    }
  }
