// The chunked forward's state query: for query i of chunk c (chunk = C rows),
//
//     num_i = s^p e^{G_i} phi(q_i)^T S_c        den_i = s^p e^{G_i} phi(q_i)^T z_c
//
// with phi(q) built on the fly from the sympow table. One block computes 64 queries of one chunk and one query
// head: phi(Q) tiles [64, 32] are formed in shared memory and multiplied with the state tiles [32, e] on the
// tensor cores (WMMA, TF32 inputs, fp32 accumulation), so the [t, D] features never touch memory.
#include <mma.h>

#include "common.cuh"

namespace retention {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256, kQueries = 64, kFeatures = 32, kMaxDim = 128;
constexpr int kPhiStride = kFeatures + 4;  // a multiple of 4 floats (WMMA), off the bank period

__host__ __device__ inline int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }  // 32-byte aligned regions

__host__ __device__ inline int64_t q_region(int64_t d, int64_t e) {
    const int64_t q_floats = kQueries * (d + 1), out_floats = kQueries * (e + 4);
    return round8(q_floats > out_floats ? q_floats : out_floats);
}

__host__ inline size_t shared_bytes(int64_t d, int64_t e) {
    return sizeof(float) * (q_region(d, e) + round8(kQueries * kPhiStride) + round8(kFeatures * (e + 4)) + kFeatures);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) state_query_kernel(RetentionStateQueryArgs a) {
    extern __shared__ __align__(32) float shared[];
    const int64_t d = a.d, e = a.e;
    float* q_shared = shared;  // [64, d + 1], later the output tile [64, e + 4]
    float* phi_shared = q_shared + q_region(d, e);  // [64, kPhiStride]
    float* state_shared = phi_shared + round8(kQueries * kPhiStride);  // [32, e + 4]
    float* keys_shared = state_shared + round8(kFeatures * (e + 4));  // [32]
    const int64_t q_stride = d + 1, state_stride = e + 4;

    const int64_t blocks_per_chunk = (a.chunk + kQueries - 1) / kQueries;
    const int64_t chunk = blockIdx.x / blocks_per_chunk, first = (blockIdx.x % blocks_per_chunk) * kQueries;
    const int64_t batch = blockIdx.y / a.hq, head = blockIdx.y % a.hq, kv_head = head / (a.hq / a.h);
    const int tid = threadIdx.x, warp = tid / 32;

    const T* q = static_cast<const T*>(a.q) + batch * a.sq[0] + head * a.sq[2];
    for (int64_t i = tid; i < kQueries * d; i += kThreads) {
        const int64_t r = i / d, c = i % d, local = first + r, position = chunk * a.chunk + local;
        const bool valid = local < a.chunk && position < a.t;
        q_shared[r * q_stride + c] = valid ? to_float<T>(q[position * a.sq[1] + c * a.sq[3]]) : 0.f;
    }

    const float* states = static_cast<const float*>(a.states) + batch * a.ss[0] + kv_head * a.ss[1] + chunk * a.ss[2];
    const float* keys = static_cast<const float*>(a.keys) + batch * a.sz[0] + kv_head * a.sz[1] + chunk * a.sz[2];
    const int* index = static_cast<const int*>(a.index);
    const float* feature_weight = static_cast<const float*>(a.weight);

    // Warp w owns the 16 rows (w % 4) and the column tiles w / 4, w / 4 + 2, ... (e <= 128: at most 4 each).
    const int row_tile = warp % 4, column_tiles = static_cast<int>(e / 16);
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> accumulator[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) wmma::fill_fragment(accumulator[k], 0.f);
    // The denominator on the CUDA cores: 4 threads per query, 8 features each per tile.
    const int den_row = tid / 4, den_part = tid % 4;
    float denominator = 0.f;
    __syncthreads();

    for (int64_t base = 0; base < a.D; base += kFeatures) {
        for (int i = tid; i < kQueries * kFeatures; i += kThreads) {
            const int r = i / kFeatures, f = i % kFeatures;
            const int64_t feature = base + f;
            float phi = 0.f;
            if (feature < a.D) {
                phi = feature_weight[feature];
                for (int p = 0; p < a.deg; ++p) phi *= q_shared[r * q_stride + index[feature * a.deg + p]];
            }
            phi_shared[r * kPhiStride + f] = phi;
        }
        for (int64_t i = tid; i < kFeatures * e / 4; i += kThreads) {  // float4 loads of the state rows
            const int64_t f = i / (e / 4), c = (i % (e / 4)) * 4, feature = base + f;
            float4 value = make_float4(0.f, 0.f, 0.f, 0.f);
            if (feature < a.D) value = *reinterpret_cast<const float4*>(states + feature * a.ss[3] + c);
            float* destination = state_shared + f * state_stride + c;
            destination[0] = value.x; destination[1] = value.y; destination[2] = value.z; destination[3] = value.w;
        }
        if (tid < kFeatures) keys_shared[tid] = base + tid < a.D ? keys[(base + tid) * a.sz[3]] : 0.f;
        __syncthreads();

#pragma unroll
        for (int u = 0; u < kFeatures / 4; ++u) {
            const int f = den_part * (kFeatures / 4) + u;
            denominator += phi_shared[den_row * kPhiStride + f] * keys_shared[f];
        }
#pragma unroll
        for (int step = 0; step < kFeatures / 8; ++step) {
            wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> phi_fragment;
            wmma::load_matrix_sync(phi_fragment, phi_shared + row_tile * 16 * kPhiStride + step * 8, kPhiStride);
#pragma unroll
            for (int i = 0; i < phi_fragment.num_elements; ++i) phi_fragment.x[i] = wmma::__float_to_tf32(phi_fragment.x[i]);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int column_tile = warp / 4 + 2 * k;
                if (column_tile < column_tiles) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> state_fragment;
                    wmma::load_matrix_sync(state_fragment, state_shared + step * 8 * state_stride + column_tile * 16,
                                           static_cast<unsigned>(state_stride));
#pragma unroll
                    for (int i = 0; i < state_fragment.num_elements; ++i) {
                        state_fragment.x[i] = wmma::__float_to_tf32(state_fragment.x[i]);
                    }
                    wmma::mma_sync(accumulator[k], phi_fragment, state_fragment, accumulator[k]);
                }
            }
        }
        __syncthreads();
    }

    float* out_shared = q_shared;  // the queries are no longer needed
    const int64_t out_stride = e + 4;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int column_tile = warp / 4 + 2 * k;
        if (column_tile < column_tiles) {
            wmma::store_matrix_sync(out_shared + row_tile * 16 * out_stride + column_tile * 16, accumulator[k],
                                    static_cast<unsigned>(out_stride), wmma::mem_row_major);
        }
    }
    denominator += __shfl_xor_sync(0xffffffffu, denominator, 1);
    denominator += __shfl_xor_sync(0xffffffffu, denominator, 2);
    __syncthreads();

    const float scale_power = integer_power(static_cast<float>(a.scale), a.deg);
    const float* g = static_cast<const float*>(a.g);
    float* num = static_cast<float*>(a.num);
    for (int64_t i = tid; i < kQueries * e; i += kThreads) {
        const int64_t r = i / e, c = i % e, local = first + r, position = chunk * a.chunk + local;
        if (local >= a.chunk || position >= a.t) continue;
        const float gate = g == nullptr ? 1.f : __expf(g[batch * a.sg[0] + position * a.sg[1] + kv_head * a.sg[2]]);
        num[batch * a.sn[0] + position * a.sn[1] + head * a.sn[2] + c * a.sn[3]] = scale_power * gate * out_shared[r * out_stride + c];
    }
    const int64_t local = first + den_row, position = chunk * a.chunk + local;
    if (den_part == 0 && local < a.chunk && position < a.t) {
        const float gate = g == nullptr ? 1.f : __expf(g[batch * a.sg[0] + position * a.sg[1] + kv_head * a.sg[2]]);
        static_cast<float*>(a.den)[batch * a.sd[0] + position * a.sd[1] + head * a.sd[2]] = scale_power * gate * denominator;
    }
}

template <typename T>
int launch_state_query(const RetentionStateQueryArgs& a, cudaStream_t stream) {
    const size_t bytes = shared_bytes(a.d, a.e);
    RETENTION_CHECK(cudaFuncSetAttribute(state_query_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes)));
    const int64_t blocks_per_chunk = (a.chunk + kQueries - 1) / kQueries;
    const dim3 grid(static_cast<unsigned>(a.n_chunks * blocks_per_chunk), static_cast<unsigned>(a.b * a.hq));
    state_query_kernel<T><<<grid, kThreads, bytes, stream>>>(a);
    RETENTION_CHECK(cudaGetLastError());
    return 0;
}

}  // namespace
}  // namespace retention

RETENTION_API int retention_state_query(const RetentionStateQueryArgs* args, cudaStream_t stream) {
    using namespace retention;
    clear_error();
    RETENTION_REQUIRE(args != nullptr, "state_query: null argument struct");
    const RetentionStateQueryArgs& a = *args;
    RETENTION_REQUIRE(a.d >= 1 && a.d <= kMaxDim, "state_query: d must be in 1..%d, got %lld", kMaxDim, (long long)a.d);
    RETENTION_REQUIRE(a.e >= 16 && a.e <= kMaxDim && a.e % 16 == 0,
                      "state_query: e must be a multiple of 16 in 16..%d, got %lld", kMaxDim, (long long)a.e);
    RETENTION_REQUIRE(a.deg >= 1 && a.deg <= 4, "state_query: deg must be in 1..4, got %lld", (long long)a.deg);
    RETENTION_REQUIRE(a.h >= 1 && a.hq % a.h == 0, "state_query: hq=%lld must be a multiple of h=%lld", (long long)a.hq, (long long)a.h);
    RETENTION_REQUIRE(a.chunk >= 1 && a.n_chunks == (a.t + a.chunk - 1) / a.chunk,
                      "state_query: n_chunks=%lld must be ceil(t / chunk) = ceil(%lld / %lld)",
                      (long long)a.n_chunks, (long long)a.t, (long long)a.chunk);
    RETENTION_REQUIRE(a.q && a.states && a.keys && a.index && a.weight && a.num && a.den, "state_query: a required pointer is null");
    RETENTION_REQUIRE(a.ss[3] % 4 == 0 && a.ss[0] % 4 == 0 && a.ss[1] % 4 == 0 && a.ss[2] % 4 == 0 &&
                          reinterpret_cast<uintptr_t>(a.states) % 16 == 0,
                      "state_query: the states must be contiguous [.., D, e] fp32 with 16-byte aligned rows");
    if (a.b * a.hq == 0 || a.t == 0) return 0;
    RETENTION_DISPATCH(a.dtype, return launch_state_query<scalar_t>(a, stream));
    return 0;
}
