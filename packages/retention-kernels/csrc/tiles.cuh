// Tensor-core tiles shared by the fold (fold.cu) and the state query (state_query.cu): a block of 8 warps
// computes a [128, <= 128] fp32 tile C += A B, A [128, K] and B [K, n] staged in shared memory; warp w owns the
// 32 rows 32 * (w % 4) .. and the 16-column tiles w / 4, w / 4 + 2, ... (WMMA fragments, fp32 accumulators).
//
// Operands: bf16 for bf16 and fp16 inputs (phi multiplies deg coordinates: bf16 keeps fp32's exponent range where
// fp16 could overflow; the same choice as the Triton kernels), fp32 for fp32 inputs as 3xTF32 (each operand split
// into a TF32 value and a TF32 remainder, three products): about fp32 accuracy on the tensor cores.
#pragma once

#include <mma.h>

#include <type_traits>

#include "common.cuh"

namespace retention {

namespace wmma = nvcuda::wmma;

constexpr int kTileThreads = 256;  // 8 warps
constexpr int kTileRows = 128;     // rows of A and C per block
constexpr int kTileColumns = 128;  // columns of B and C per block at most
constexpr int kWarpRowFragments = 2;
constexpr int kScratchStride = 20;                       // floats per row of a warp's 16 x 16 fragment scratch
constexpr int kScratchFloats = 16 * kScratchStride;      // per warp

// The tensor-core operand type for an input dtype.
template <typename T> struct Operand { using type = __nv_bfloat16; };
template <> struct Operand<float> { using type = float; };

template <typename O> struct MmaShape;
template <> struct MmaShape<__nv_bfloat16> { static constexpr int K = 16; using precision = __nv_bfloat16; };
template <> struct MmaShape<float> { static constexpr int K = 8; using precision = wmma::precision::tf32; };

// Elements added to each shared row: 16 bytes keep WMMA's 16-byte ldm rule and move rows off the bank period.
template <typename O> constexpr int kOperandPad = 16 / static_cast<int>(sizeof(O));

template <typename O> __device__ __forceinline__ O to_operand(float x);
template <> __device__ __forceinline__ __nv_bfloat16 to_operand<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ float to_operand<float>(float x) { return x; }

// x = hi + lo with hi, lo both TF32 (for 3xTF32).
template <typename Fragment>
__device__ __forceinline__ void split_tf32(Fragment& hi, Fragment& lo) {
#pragma unroll
    for (int i = 0; i < hi.num_elements; ++i) {
        const float x = hi.x[i];
        const float big = wmma::__float_to_tf32(x);
        hi.x[i] = big;
        lo.x[i] = wmma::__float_to_tf32(x - big);
    }
}

// One warp's accumulators and the K-step of C += A B for it. LayoutA: wmma::row_major (A[m][k] at m * lda + k)
// or wmma::col_major (A[m][k] at k * lda + m); B is row-major (B[k][n] at k * ldb + n). COLUMNS: 16-column
// fragments per warp at most (1, 2, 4 for block tiles of up to 32, 64, 128 columns; fewer registers).
template <typename O, typename LayoutA, int COLUMNS = 4>
struct WarpTile {
    static constexpr int kWarpColumnFragments = COLUMNS;
    static constexpr int K = MmaShape<O>::K;
    using Precision = typename MmaShape<O>::precision;
    using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, K, float>;
    using FragmentA = wmma::fragment<wmma::matrix_a, 16, 16, K, Precision, LayoutA>;
    using FragmentB = wmma::fragment<wmma::matrix_b, 16, 16, K, Precision, wmma::row_major>;

    Accumulator acc[kWarpRowFragments][kWarpColumnFragments];
    int row0, column_tile0;  // the warp's first row and first 16-column tile (its tiles: column_tile0 + 2 i)

    __device__ __forceinline__ void init(int warp) {
        row0 = 32 * (warp % 4);
        column_tile0 = warp / 4;
#pragma unroll
        for (int r = 0; r < kWarpRowFragments; ++r)
#pragma unroll
            for (int c = 0; c < kWarpColumnFragments; ++c) wmma::fill_fragment(acc[r][c], 0.f);
    }

    __device__ __forceinline__ static const O* a_address(const O* a, unsigned lda, int m, int k) {
        if constexpr (std::is_same_v<LayoutA, wmma::row_major>) {
            return a + static_cast<size_t>(m) * lda + k;
        } else {
            return a + static_cast<size_t>(k) * lda + m;
        }
    }

    // C += A[:, k .. k + K) B[k .. k + K, :] over the block's column tiles (< column_tiles, warp-uniform).
    __device__ __forceinline__ void step(const O* a, unsigned lda, const O* b, unsigned ldb, int k, int column_tiles) {
        FragmentA a_fragment[kWarpRowFragments];
#pragma unroll
        for (int r = 0; r < kWarpRowFragments; ++r) wmma::load_matrix_sync(a_fragment[r], a_address(a, lda, row0 + 16 * r, k), lda);
        if constexpr (std::is_same_v<O, float>) {
            FragmentA a_low[kWarpRowFragments];
#pragma unroll
            for (int r = 0; r < kWarpRowFragments; ++r) {
                a_low[r] = a_fragment[r];
                split_tf32(a_fragment[r], a_low[r]);
            }
#pragma unroll
            for (int c = 0; c < kWarpColumnFragments; ++c) {
                const int tile = column_tile0 + 2 * c;
                if (tile < column_tiles) {
                    FragmentB b_high, b_low;
                    wmma::load_matrix_sync(b_high, b + static_cast<size_t>(k) * ldb + 16 * tile, ldb);
                    b_low = b_high;
                    split_tf32(b_high, b_low);
#pragma unroll
                    for (int r = 0; r < kWarpRowFragments; ++r) {  // small products first
                        wmma::mma_sync(acc[r][c], a_low[r], b_high, acc[r][c]);
                        wmma::mma_sync(acc[r][c], a_fragment[r], b_low, acc[r][c]);
                        wmma::mma_sync(acc[r][c], a_fragment[r], b_high, acc[r][c]);
                    }
                }
            }
        } else {
#pragma unroll
            for (int c = 0; c < kWarpColumnFragments; ++c) {
                const int tile = column_tile0 + 2 * c;
                if (tile < column_tiles) {
                    FragmentB b_fragment;
                    wmma::load_matrix_sync(b_fragment, b + static_cast<size_t>(k) * ldb + 16 * tile, ldb);
#pragma unroll
                    for (int r = 0; r < kWarpRowFragments; ++r) wmma::mma_sync(acc[r][c], a_fragment[r], b_fragment, acc[r][c]);
                }
            }
        }
    }

    // write(row, column, value) for every element of the warp's fragments (rows and columns of the block tile),
    // through the warp's scratch (kScratchFloats floats, 32-byte aligned): 8 elements per lane per fragment.
    template <typename Write>
    __device__ __forceinline__ void store(float* scratch, int column_tiles, Write write) {
        const int lane = threadIdx.x % 32;
#pragma unroll
        for (int r = 0; r < kWarpRowFragments; ++r) {
#pragma unroll
            for (int c = 0; c < kWarpColumnFragments; ++c) {
                const int tile = column_tile0 + 2 * c;
                if (tile >= column_tiles) continue;  // warp-uniform
                wmma::store_matrix_sync(scratch, acc[r][c], kScratchStride, wmma::mem_row_major);
                __syncwarp();
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const int element = lane + 32 * i, row = element / 16, column = element % 16;
                    write(row0 + 16 * r + row, 16 * tile + column, scratch[row * kScratchStride + column]);
                }
                __syncwarp();
            }
        }
    }
};

// Carves 128-byte aligned regions out of dynamic shared memory (the same arithmetic sizes it on the host).
struct SharedLayout {
    size_t offset = 0;
    template <typename U>
    __host__ __device__ size_t take(int64_t count) {
        const size_t start = offset;
        offset = static_cast<size_t>(round_up(static_cast<int64_t>(start + sizeof(U) * count), 128));
        return start;
    }
};

}  // namespace retention
