// CUDA kernels for BitStack linears: y = x·Wᵀ with W = Σ_b S_b ⊙ (u_b·vt_b).
//
// Sign layout ("mma tiles", made on the host by `cuda::pack::mma_sign_words`):
// rows in tiles of 16, columns in chunks of 64. Word (tile·chunks + chunk)·32
// + lane holds exactly the 64 signs that warp lane `lane` needs as the A
// operand of four m16n8k16 mma steps over that 16×64 piece, so a warp reads
// a tile's signs as one coalesced 128-byte load per chunk. For step s (16
// columns) and A register `reg` (0: row g, cols 2t..; 1: row g+8, cols 2t..;
// 2: row g, cols 2t+8..; 3: row g+8, cols 2t+8.., with g = lane/4 and
// t = lane%4), the sign of the lower column is bit s·4 + reg and that of
// the upper one bit s·4 + reg + 16. A set bit is −1: it is the sign bit of
// the ±1 operand, so two shifts and a mask turn the word into two halves.
//
// Grid planes (optional, after the blocks; see `GridRef` on the Rust side):
// W_grid[i,c] = center[i,g] + half[i,g]·Σ_b s_b(i,c)·2^-(b+1), g = c / group,
// except at an outlier (i, g·group + col), where it is the outlier's f16
// value v; each plane's signs in the same mma-tile layout. Decode adds them
// in a kernel of their own (one more slot of the split sums), each outlier
// as (v − q_p)·x[col] with q_p its grid point read from the planes; prefill
// dequantizes them into the rebuilt weight, v at the outliers.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

// Output rows per decode block: 8 warps of one 16-row tile each.
constexpr int DECODE_WARPS = 8;
constexpr int DECODE_ROWS = DECODE_WARPS * 16;
// Columns staged per step (four 64-column sign chunks).
constexpr int STAGE_COLS = 256;
// Rank columns (rows of x times rank index) per pass: eight n8 mma tiles.
constexpr int PASS_COLS = 64;
// Row stride of the staged operand in halves: 132 words puts the 32 lanes
// of a fragment load on 32 different banks.
constexpr int Z_STRIDE = STAGE_COLS + 8;
// Largest rows of x one decode call takes (the host splits larger calls).
constexpr int DECODE_MAX_ROWS = 32;
// Outputs (row of W, row of x) each thread accumulates.
constexpr int OUTS_PER_THREAD = DECODE_ROWS * DECODE_MAX_ROWS / (DECODE_WARPS * 32);

struct BlockPtrs {
  const uint32_t* signs;
  const __half* u;
  const __half* vt;
};

// The grid planes on the device (made by `CudaGrid`: eleven pointers, then
// four ints and the prefix scale with a pad, 112 bytes). Each plane is an upload of its own, so a stack
// that gains or loses a plane re-uses the others. The numbers are either
// f16 (`center`, `half`, `ovalue`; format 2) or 8-bit codes under per-row
// f16 steps (`ccode`, `hcode`, `ocode`, `cstep`, `hstep`, `ostep`; format
// 3): the other set is null.
struct GridDesc {
  const uint32_t* const* planes;  // nplanes addresses of words, the mma-tile layout each
  const __half* center;    // m × groups, or null
  const __half* half;      // m × groups, or null
  const uint8_t* ocol;     // m × groups × outliers: column within the group
  const __half* ovalue;    // m × groups × outliers: the outlier's weight, or null
  const int8_t* ccode;     // m × groups, or null
  const uint8_t* hcode;    // m × groups, or null
  const __half* cstep;     // m, or null
  const __half* hstep;     // m, or null
  const int8_t* ocode;     // m × groups × outliers, or null
  const __half* ostep;     // m, or null
  int nplanes;
  int group;
  int outliers;
  int groups;
  float prefix_scale;      // σ_p: the factor on every half-range with these planes
  int pad;
};

// (center, σ_p·half) of cell `cell` (= i·groups + g). An f16 times an
// 8-bit code is exact in f32, and the scale applied after, as on the CPU.
__device__ __forceinline__ float2 grid_range(const GridDesc& grid, size_t cell) {
  if (grid.cstep != nullptr) {
    const size_t i = cell / grid.groups;
    return make_float2(__half2float(grid.cstep[i]) * (float)grid.ccode[cell],
                       __half2float(grid.hstep[i]) * (float)grid.hcode[cell] * grid.prefix_scale);
  }
  return make_float2(__half2float(grid.center[cell]),
                     __half2float(grid.half[cell]) * grid.prefix_scale);
}

// The weight of outlier `slot`, exact in f32 as on the CPU.
__device__ __forceinline__ float grid_outlier(const GridDesc& grid, size_t slot) {
  if (grid.ostep != nullptr) {
    const size_t i = slot / ((size_t)grid.groups * grid.outliers);
    return __half2float(grid.ostep[i]) * (float)grid.ocode[slot];
  }
  return __half2float(grid.ovalue[slot]);
}

// Row (within a 16-row tile) and column (within a 64-column chunk) of bit
// `bit` of lane `lane`'s sign word: the inverse of `cuda::pack::position`.
__device__ __forceinline__ void bit_position(int lane, int bit, int* row, int* col) {
  const int s = (bit % 16) / 4;
  const int reg = bit % 4;
  const int h = bit / 16;
  *row = lane / 4 + 8 * (reg & 1);
  *col = 16 * s + 2 * (lane % 4) + 8 * (reg >> 1) + h;
}

// Σ_b ±2^-(b+1) for the sign at `bit` of the lane's word in each plane.
__device__ __forceinline__ float grid_level(const GridDesc& grid, size_t word, int bit) {
  float level = 0.f;
  float w = 0.5f;
  for (int b = 0; b < grid.nplanes; ++b) {
    const uint32_t v = grid.planes[b][word];
    level += ((v >> bit) & 1u) ? -w : w;
    w *= 0.5f;
  }
  return level;
}

// Word (within a plane) and bit of the sign of (i, c) in the mma-tile
// layout (`chunks` 64-column chunks per row): the inverse of `bit_position`.
__device__ __forceinline__ void sign_at(int i, int c, int chunks, size_t* word, int* bit) {
  const int rr = i % 16;
  const int cc = c % 64;
  const int c16 = cc % 16;
  const int lane = (rr % 8) * 4 + (c16 % 8) / 2;
  *word = ((size_t)(i / 16) * chunks + c / 64) * 32 + lane;
  *bit = (cc / 16) * 4 + rr / 8 + 2 * (c16 / 8) + 16 * (c16 % 2);
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// The operand type of the mma: f16 for f32 and f16 activations, bf16 for
// bf16 ones (whose range f16 does not cover).
template <bool BF16> struct Mma;

template <> struct Mma<false> {
  typedef __half T;
  static constexpr uint32_t ONES = 0x3C003C00u;  // two f16 1.0
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <> struct Mma<true> {
  typedef __nv_bfloat16 T;
  static constexpr uint32_t ONES = 0x3F803F80u;  // two bf16 1.0
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// A register `reg` of step `s` from a lane's sign word: bit q goes to the
// sign of the low half, bit q + 16 to that of the high half.
template <int Q>
__device__ __forceinline__ uint32_t sign_pair(uint32_t word, uint32_t ones) {
  return ((word << (15 - Q)) & 0x80008000u) | ones;
}

// Decode: partial[split][r][i] = Σ_b Σ_j u_b[i,j] · Σ_{c in split} S_b[i,c]·vt_b[j,c]·x[r,c].
//
// Grid: (⌈m/128⌉, splits). Each warp owns one 16-row tile of W; the block
// stages Z[(r,j), c] = vt_b[j,c]·x[r,c] for 256 columns in shared memory,
// and the warps multiply their sign tiles by it on the tensor cores. The
// u-weighted sum over j runs once per block and pass, from shared memory.
template <typename T, bool BF16>
__device__ void decode(const BlockPtrs* __restrict__ blocks, int nblocks, const T* __restrict__ x,
                       float* __restrict__ partial, int m, int n, int k, int rows,
                       int stages_per_split) {
  typedef typename Mma<BF16>::T Z;
  __shared__ __align__(16) unsigned char smem[PASS_COLS * Z_STRIDE * 2];
  Z* zs = reinterpret_cast<Z*>(smem);
  float* cs = reinterpret_cast<float*>(smem);  // reused for the epilogue: DECODE_ROWS × PASS_COLS

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int mtiles = (m + 15) / 16;
  const int chunks = (n + 63) / 64;
  const int tile = blockIdx.x * DECODE_WARPS + warp;
  const int row0 = blockIdx.x * DECODE_ROWS;
  const int stages = (n + STAGE_COLS - 1) / STAGE_COLS;
  const int stage_begin = blockIdx.y * stages_per_split;
  const int stage_end = min(stages, stage_begin + stages_per_split);
  const int rank_cols = rows * k;

  float ys[OUTS_PER_THREAD];
#pragma unroll
  for (int e = 0; e < OUTS_PER_THREAD; ++e) ys[e] = 0.f;

  for (int n0 = 0; n0 < rank_cols; n0 += PASS_COLS) {
    const int pass_cols = min(PASS_COLS, rank_cols - n0);
    const int ntiles = (pass_cols + 7) / 8;
    for (int b = 0; b < nblocks; ++b) {
      const BlockPtrs blk = blocks[b];
      float acc[8][4];
#pragma unroll
      for (int q = 0; q < 8; ++q) acc[q][0] = acc[q][1] = acc[q][2] = acc[q][3] = 0.f;

      for (int stage = stage_begin; stage < stage_end; ++stage) {
        const int c0 = stage * STAGE_COLS;
        // This warp's sign words for the stage's four chunks.
        uint32_t words[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int chunk = stage * 4 + q;
          words[q] = (tile < mtiles && chunk < chunks)
                         ? blk.signs[((size_t)tile * chunks + chunk) * 32 + lane]
                         : 0u;
        }
        // Stage Z for this pass's rank columns; zero past n and past rows·k.
        for (int idx = tid; idx < ntiles * 8 * STAGE_COLS; idx += DECODE_WARPS * 32) {
          const int nn = idx / STAGE_COLS;
          const int c = idx % STAGE_COLS;
          const int gnn = n0 + nn;
          const int gc = c0 + c;
          float z = 0.f;
          if (gnn < rank_cols && gc < n) {
            const int r = gnn / k;
            const int j = gnn - r * k;
            z = __half2float(blk.vt[(size_t)j * n + gc]) * to_f32(x[(size_t)r * n + gc]);
          }
          zs[nn * Z_STRIDE + c] = from_f32<Z>(z);
        }
        __syncthreads();
        if (tile < mtiles) {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const uint32_t w = words[q];
#pragma unroll
            for (int s = 0; s < 4; ++s) {
              uint32_t a[4];
              const uint32_t ones = Mma<BF16>::ONES;
              switch (s) {
                case 0: a[0] = sign_pair<0>(w, ones); a[1] = sign_pair<1>(w, ones);
                        a[2] = sign_pair<2>(w, ones); a[3] = sign_pair<3>(w, ones); break;
                case 1: a[0] = sign_pair<4>(w, ones); a[1] = sign_pair<5>(w, ones);
                        a[2] = sign_pair<6>(w, ones); a[3] = sign_pair<7>(w, ones); break;
                case 2: a[0] = sign_pair<8>(w, ones); a[1] = sign_pair<9>(w, ones);
                        a[2] = sign_pair<10>(w, ones); a[3] = sign_pair<11>(w, ones); break;
                default: a[0] = sign_pair<12>(w, ones); a[1] = sign_pair<13>(w, ones);
                         a[2] = sign_pair<14>(w, ones); a[3] = sign_pair<15>(w, ones); break;
              }
              const int kc = q * 64 + s * 16 + 2 * t;
#pragma unroll
              for (int nt = 0; nt < 8; ++nt) {
                if (nt < ntiles) {
                  const Z* zrow = zs + (nt * 8 + g) * Z_STRIDE + kc;
                  const uint32_t b0 = *reinterpret_cast<const uint32_t*>(zrow);
                  const uint32_t b1 = *reinterpret_cast<const uint32_t*>(zrow + 8);
                  Mma<BF16>::run(acc[nt], a, b0, b1);
                }
              }
            }
          }
        }
        __syncthreads();
      }

      // Epilogue: y[r, i] += Σ_j u_b[i, j] · P[i, (r, j)] over this pass.
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        if (nt < ntiles) {
          const int rl = warp * 16 + g;
          const int col = nt * 8 + 2 * t;
          cs[rl * PASS_COLS + col] = acc[nt][0];
          cs[rl * PASS_COLS + col + 1] = acc[nt][1];
          cs[(rl + 8) * PASS_COLS + col] = acc[nt][2];
          cs[(rl + 8) * PASS_COLS + col + 1] = acc[nt][3];
        }
      }
      __syncthreads();
#pragma unroll
      for (int e = 0; e < OUTS_PER_THREAD; ++e) {
        const int idx = tid + e * DECODE_WARPS * 32;
        const int il = idx % DECODE_ROWS;
        const int r = idx / DECODE_ROWS;
        const int i = row0 + il;
        if (r < rows && i < m) {
          const int lo = max(r * k, n0);
          const int hi = min(r * k + k, n0 + pass_cols);
          float sum = 0.f;
          for (int nn = lo; nn < hi; ++nn) {
            sum += __half2float(blk.u[(size_t)i * k + (nn - r * k)]) * cs[il * PASS_COLS + nn - n0];
          }
          ys[e] += sum;
        }
      }
      __syncthreads();
    }
  }

#pragma unroll
  for (int e = 0; e < OUTS_PER_THREAD; ++e) {
    const int idx = tid + e * DECODE_WARPS * 32;
    const int il = idx % DECODE_ROWS;
    const int r = idx / DECODE_ROWS;
    const int i = row0 + il;
    if (r < rows && i < m) partial[((size_t)blockIdx.y * rows + r) * m + i] = ys[e];
  }
}

// out[r, i] = Σ_split partial[split][r][i], in the activations' dtype.
template <typename T>
__device__ void reduce_splits(const float* __restrict__ partial, T* __restrict__ out, int splits,
                              int len) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= len) return;
  float s = 0.f;
  for (int p = 0; p < splits; ++p) s += partial[(size_t)p * len + idx];
  out[idx] = from_f32<T>(s);
}

// Grid decode: out[r][i] = Σ_c W_grid[i,c]·x[r,c], one 16-row tile per
// thread block. Each warp takes 64-column chunks in turn; each lane reads
// its sign word of every plane (coalesced), rebuilds its 32 weights (two
// rows, 16 columns each) and multiplies them with x. The four lanes of a row
// pair add up by shuffles, the warps in shared memory; outliers come last.
template <typename T>
__device__ void grid_decode(const GridDesc* __restrict__ gd, const T* __restrict__ x,
                            float* __restrict__ out, int m, int n, int rows) {
  __shared__ float ys[DECODE_MAX_ROWS * 16];
  const GridDesc grid = *gd;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int tile = blockIdx.x;
  const int chunks = (n + 63) / 64;
  for (int e = tid; e < DECODE_MAX_ROWS * 16; e += blockDim.x) ys[e] = 0.f;
  __syncthreads();

  for (int chunk = warp; chunk < chunks; chunk += DECODE_WARPS) {
    const size_t word = ((size_t)tile * chunks + chunk) * 32 + lane;
    // Bit `bit` of the lane's words is weight (row, col) of the piece.
    float wv[32];
#pragma unroll
    for (int bit = 0; bit < 32; ++bit) {
      int row, col;
      bit_position(lane, bit, &row, &col);
      const int i = tile * 16 + row;
      const int c = chunk * 64 + col;
      float v = 0.f;
      if (i < m && c < n) {
        const size_t cell = (size_t)i * grid.groups + c / grid.group;
        const float2 range = grid_range(grid, cell);
        v = range.x + range.y * grid_level(grid, word, bit);
      }
      wv[bit] = v;
    }
    for (int r = 0; r < rows; ++r) {
      // Bits with reg even are row lane/4, odd ones row lane/4 + 8.
      float lo = 0.f, hi = 0.f;
#pragma unroll
      for (int bit = 0; bit < 32; ++bit) {
        int row, col;
        bit_position(lane, bit, &row, &col);
        const int c = chunk * 64 + col;
        const float xv = c < n ? to_f32(x[(size_t)r * n + c]) : 0.f;
        if (bit & 1) {
          hi += wv[bit] * xv;
        } else {
          lo += wv[bit] * xv;
        }
      }
      lo += __shfl_xor_sync(0xffffffffu, lo, 1);
      lo += __shfl_xor_sync(0xffffffffu, lo, 2);
      hi += __shfl_xor_sync(0xffffffffu, hi, 1);
      hi += __shfl_xor_sync(0xffffffffu, hi, 2);
      if (lane % 4 == 0) {
        atomicAdd(&ys[r * 16 + lane / 4], lo);
        atomicAdd(&ys[r * 16 + lane / 4 + 8], hi);
      }
    }
  }
  // Outliers: W[i, g·group + col] += v − q_p, q_p read from the planes.
  const int slots = 16 * grid.groups * grid.outliers;
  for (int e = tid; e < slots; e += blockDim.x) {
    const int row = e / (grid.groups * grid.outliers);
    const int i = tile * 16 + row;
    if (i >= m) continue;
    const size_t slot = (size_t)i * grid.groups * grid.outliers + e % (grid.groups * grid.outliers);
    const int g = (int)((slot / grid.outliers) % grid.groups);
    const int c = g * grid.group + grid.ocol[slot];
    const size_t cell = slot / grid.outliers;
    size_t word;
    int bit;
    sign_at(i, c, chunks, &word, &bit);
    const float2 range = grid_range(grid, cell);
    const float q = range.x + range.y * grid_level(grid, word, bit);
    const float d = grid_outlier(grid, slot) - q;
    for (int r = 0; r < rows; ++r) atomicAdd(&ys[r * 16 + row], d * to_f32(x[(size_t)r * n + c]));
  }
  __syncthreads();
  for (int e = tid; e < rows * 16; e += blockDim.x) {
    const int r = e / 16;
    const int i = tile * 16 + e % 16;
    if (i < m) out[(size_t)r * m + i] = ys[e];
  }
}

// Prefill: W[i, c] = Σ_b ±(Σ_j u_b[i,j]·vt_b[j,c]) for one 16×64 piece per
// thread block (256 threads, four consecutive columns each), written in the
// activations' dtype for the GEMM that follows.
//
// With grid planes (`gd` not null) their weights are added: per plane the
// piece's 32 sign words, then center + half·level and the outliers.
template <typename T>
__device__ void reconstruct(const BlockPtrs* __restrict__ blocks, int nblocks, T* __restrict__ w,
                            int m, int n, int k, const GridDesc* __restrict__ gd) {
  __shared__ uint32_t words[32];
  const int chunks = (n + 63) / 64;
  const int chunk = blockIdx.x;
  const int tile = blockIdx.y;
  const int rr = threadIdx.x / 16;
  const int cc0 = (threadIdx.x % 16) * 4;
  const int i = tile * 16 + rr;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int b = 0; b < nblocks; ++b) {
    const BlockPtrs blk = blocks[b];
    __syncthreads();
    if (threadIdx.x < 32) words[threadIdx.x] = blk.signs[((size_t)tile * chunks + chunk) * 32 + threadIdx.x];
    __syncthreads();
    if (i >= m) continue;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int cc = cc0 + e;
      const int c = chunk * 64 + cc;
      if (c >= n) continue;
      float v = 0.f;
      for (int j = 0; j < k; ++j) {
        v += __half2float(blk.u[(size_t)i * k + j]) * __half2float(blk.vt[(size_t)j * n + c]);
      }
      const int s = cc / 16;
      const int c16 = cc % 16;
      const int lane = (rr % 8) * 4 + (c16 % 8) / 2;
      const int bit = s * 4 + rr / 8 + 2 * (c16 / 8) + 16 * (c16 % 2);
      acc[e] += ((words[lane] >> bit) & 1u) ? -v : v;
    }
  }
  if (gd != nullptr) {
    const GridDesc grid = *gd;
    float level[4] = {0.f, 0.f, 0.f, 0.f};
    float wb = 0.5f;
    for (int b = 0; b < grid.nplanes; ++b) {
      __syncthreads();
      if (threadIdx.x < 32) {
        words[threadIdx.x] =
            grid.planes[b][((size_t)tile * chunks + chunk) * 32 + threadIdx.x];
      }
      __syncthreads();
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int cc = cc0 + e;
        const int c16 = cc % 16;
        const int lane = (rr % 8) * 4 + (c16 % 8) / 2;
        const int bit = (cc / 16) * 4 + rr / 8 + 2 * (c16 / 8) + 16 * (c16 % 2);
        level[e] += ((words[lane] >> bit) & 1u) ? -wb : wb;
      }
      wb *= 0.5f;
    }
    if (i < m) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = chunk * 64 + cc0 + e;
        if (c >= n) continue;
        const int g = c / grid.group;
        const size_t cell = (size_t)i * grid.groups + g;
        const float2 range = grid_range(grid, cell);
        float wg = range.x + range.y * level[e];
        for (int t = 0; t < grid.outliers; ++t) {
          const size_t slot = cell * grid.outliers + t;
          if (g * grid.group + grid.ocol[slot] == c) wg = grid_outlier(grid, slot);
        }
        acc[e] += wg;
      }
    }
  }
  if (i >= m) return;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int c = chunk * 64 + cc0 + e;
    if (c < n) w[(size_t)i * n + c] = from_f32<T>(acc[e]);
  }
}

}  // namespace

#define BITSTACK_KERNELS(NAME, T, BF16)                                                          \
  extern "C" __global__ void __launch_bounds__(DECODE_WARPS * 32)                                \
      bitstack_decode_##NAME(const BlockPtrs* blocks, int nblocks, const T* x, float* partial,   \
                             int m, int n, int k, int rows, int stages_per_split) {              \
    decode<T, BF16>(blocks, nblocks, x, partial, m, n, k, rows, stages_per_split);               \
  }                                                                                              \
  extern "C" __global__ void bitstack_reduce_##NAME(const float* partial, T* out, int splits,    \
                                                    int len) {                                   \
    reduce_splits<T>(partial, out, splits, len);                                                 \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(256)                                              \
      bitstack_reconstruct_##NAME(const BlockPtrs* blocks, int nblocks, T* w, int m, int n,      \
                                  int k, const GridDesc* grid) {                                 \
    reconstruct<T>(blocks, nblocks, w, m, n, k, grid);                                           \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(DECODE_WARPS * 32)                                \
      bitstack_grid_decode_##NAME(const GridDesc* grid, const T* x, float* out, int m, int n,    \
                                  int rows) {                                                    \
    grid_decode<T>(grid, x, out, m, n, rows);                                                    \
  }

BITSTACK_KERNELS(f32, float, false)
BITSTACK_KERNELS(f16, __half, false)
BITSTACK_KERNELS(bf16, __nv_bfloat16, true)
