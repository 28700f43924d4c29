// The chunked forward's state query: for query i of chunk c (chunk = C rows),
//
//     num_i = s^p e^{G_i} phi(q_i)^T S_c        den_i = s^p e^{G_i} phi(q_i)^T z_c
//
// One block computes 128 queries of one chunk and one query head (grid: chunk tiles, b * hq), walking the
// features in steps of 32: each thread builds phi(q)_a for one feature (index, weight and z_a from the table)
// and 16 queries into the A tile [128, 32] (the denominator is summed on the way, in fp32), the state rows
// [32, e] are converted into the B tile (loaded into registers one step ahead), and the warps multiply on the
// tensor cores (tiles.cuh: bf16 operands for bf16/fp16 queries, 3xTF32 for fp32). The [t, D] features never
// touch memory.
#include "tiles.cuh"

namespace retention {
namespace {

constexpr int kFeatures = 32;  // features per step
constexpr int kMaxDim = 128;
constexpr int kQueriesPerThread = kTileRows / 8;      // a warp's lanes are 32 features of 16 queries

struct QueryShared {
    size_t queries, phi, states, scratch, row_scale, bytes;
    int lda, ldb;
};

template <typename O>
__host__ __device__ inline QueryShared query_shared(int64_t d, int64_t e) {
    QueryShared s;
    s.lda = kFeatures + kOperandPad<O>;
    s.ldb = static_cast<int>(e) + kOperandPad<O>;
    SharedLayout layout;
    s.queries = layout.take<float>(kTileRows * d);   // [128, d] fp32
    s.phi = layout.take<O>(kTileRows * s.lda);       // A, row-major: [queries, features]
    s.states = layout.take<O>(kFeatures * s.ldb);    // B: [features, e]
    s.scratch = layout.take<float>(8 * kScratchFloats);
    s.row_scale = layout.take<float>(kTileRows);     // s^p e^{G_i}, 0 past the chunk
    s.bytes = layout.offset;
    return s;
}

// LOADS: float4 loads of state rows per thread per step, kFeatures * e / 4 / kTileThreads rounded up (1, 2, 4).
template <typename T, int LOADS>
__global__ void __launch_bounds__(kTileThreads, 2) state_query_kernel(RetentionStateQueryArgs a) {
    using O = typename Operand<T>::type;
    extern __shared__ __align__(128) unsigned char shared[];
    const QueryShared layout = query_shared<O>(a.d, a.e);
    float* queries = reinterpret_cast<float*>(shared + layout.queries);
    O* phi_tile = reinterpret_cast<O*>(shared + layout.phi);
    O* state_tile = reinterpret_cast<O*>(shared + layout.states);
    float* row_scale = reinterpret_cast<float*>(shared + layout.row_scale);

    const int d = static_cast<int>(a.d), e = static_cast<int>(a.e), deg = static_cast<int>(a.deg);
    const int64_t blocks_per_chunk = (a.chunk + kTileRows - 1) / kTileRows;
    const int64_t chunk = blockIdx.x / blocks_per_chunk, first = (blockIdx.x % blocks_per_chunk) * kTileRows;
    const int64_t batch = blockIdx.y / a.hq, head = blockIdx.y % a.hq, kv_head = head / (a.hq / a.h);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    auto position_of = [&](int row) -> int64_t {  // -1 past the chunk or the sequence
        const int64_t local = first + row, position = chunk * a.chunk + local;
        return local < a.chunk && position < a.t ? position : -1;
    };
    const T* q = static_cast<const T*>(a.q) + batch * a.sq[0] + head * a.sq[2];
    for (int i = tid; i < kTileRows * d; i += kTileThreads) {
        const int row = i / d, c = i % d;
        const int64_t position = position_of(row);
        queries[i] = position >= 0 ? to_float<T>(q[position * a.sq[1] + c * a.sq[3]]) : 0.f;
    }
    const float scale_power = integer_power(static_cast<float>(a.scale), deg);
    const float* g = static_cast<const float*>(a.g);
    if (tid < kTileRows) {
        const int64_t position = position_of(tid);
        float value = 0.f;
        if (position >= 0) {
            value = scale_power * (g == nullptr ? 1.f : __expf(g[batch * a.sg[0] + position * a.sg[1] + kv_head * a.sg[2]]));
        }
        row_scale[tid] = value;
    }

    const float* states = static_cast<const float*>(a.states) + batch * a.ss[0] + kv_head * a.ss[1] + chunk * a.ss[2];
    const float* keys = static_cast<const float*>(a.keys) + batch * a.sz[0] + kv_head * a.sz[1] + chunk * a.sz[2];
    const int* index = static_cast<const int*>(a.index);
    const float* weight = static_cast<const float*>(a.weight);

    // The state rows of a step, one step ahead in registers: float4 number i = tid + 256 u of [32, e].
    const int row_float4s = e / 4;
    float4 next[LOADS];
    auto load_states = [&](int64_t base) {
#pragma unroll
        for (int u = 0; u < LOADS; ++u) {
            const int i = tid + kTileThreads * u, f = i / row_float4s;
            const int64_t feature = base + f;
            next[u] = f < kFeatures && feature < a.D
                          ? *reinterpret_cast<const float4*>(states + feature * a.ss[3] + (i % row_float4s) * 4)
                          : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    load_states(0);

    WarpTile<O, wmma::row_major, LOADS> tile;  // LOADS is also the column fragments per warp (e / 32)
    tile.init(warp);
    float denominator[kQueriesPerThread];
#pragma unroll
    for (int i = 0; i < kQueriesPerThread; ++i) denominator[i] = 0.f;
    const int column_tiles = e / 16;
    __syncthreads();  // queries, row_scale

    for (int64_t base = 0; base < a.D; base += kFeatures) {
#pragma unroll
        for (int u = 0; u < LOADS; ++u) {
            const int i = tid + kTileThreads * u, f = i / row_float4s, c = (i % row_float4s) * 4;
            if (f < kFeatures) {
                O* destination = state_tile + f * layout.ldb + c;
                destination[0] = to_operand<O>(next[u].x);
                destination[1] = to_operand<O>(next[u].y);
                destination[2] = to_operand<O>(next[u].z);
                destination[3] = to_operand<O>(next[u].w);
            }
        }
        // phi(q_row)_a for the lane's feature a and the warp's rows warp + 8 i.
        const int64_t feature = base + lane;
        const bool inside = feature < a.D;
        const float feature_weight = inside ? weight[feature] : 0.f;
        const float key_sum = inside ? keys[feature * a.sz[3]] : 0.f;
        int coordinate[4] = {0, 0, 0, 0};
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            if (p < deg && inside) coordinate[p] = index[feature * deg + p];
        }
#pragma unroll
        for (int i = 0; i < kQueriesPerThread; ++i) {
            const int row = warp + 8 * i;
            const float* query = queries + row * d;
            float x = feature_weight;
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                if (p < deg) x *= query[coordinate[p]];
            }
            denominator[i] += x * key_sum;
            phi_tile[row * layout.lda + lane] = to_operand<O>(x);
        }
        __syncthreads();
        if (base + kFeatures < a.D) load_states(base + kFeatures);  // in flight during the products
#pragma unroll
        for (int k = 0; k < kFeatures; k += decltype(tile)::K) {
            tile.step(phi_tile, layout.lda, state_tile, layout.ldb, k, column_tiles);
        }
        __syncthreads();
    }

    float* num = static_cast<float*>(a.num);
    float* scratch = reinterpret_cast<float*>(shared + layout.scratch) + warp * kScratchFloats;
    tile.store(scratch, column_tiles, [&](int row, int column, float value) {
        const int64_t position = position_of(row);
        if (position >= 0) num[batch * a.sn[0] + position * a.sn[1] + head * a.sn[2] + column * a.sn[3]] = row_scale[row] * value;
    });
#pragma unroll
    for (int i = 0; i < kQueriesPerThread; ++i) {
        float total = denominator[i];
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
        const int row = warp + 8 * i;
        const int64_t position = position_of(row);
        if (lane == 0 && position >= 0) {
            static_cast<float*>(a.den)[batch * a.sd[0] + position * a.sd[1] + head * a.sd[2]] = row_scale[row] * total;
        }
    }
}

template <typename T, int LOADS>
int launch_state_query_kernel(const RetentionStateQueryArgs& a, cudaStream_t stream) {
    using O = typename Operand<T>::type;
    const size_t bytes = query_shared<O>(a.d, a.e).bytes;
    RETENTION_CHECK(cudaFuncSetAttribute(state_query_kernel<T, LOADS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes)));
    const int64_t blocks_per_chunk = (a.chunk + kTileRows - 1) / kTileRows;
    const dim3 grid(static_cast<unsigned>(a.n_chunks * blocks_per_chunk), static_cast<unsigned>(a.b * a.hq));
    state_query_kernel<T, LOADS><<<grid, kTileThreads, bytes, stream>>>(a);
    RETENTION_CHECK(cudaGetLastError());
    return 0;
}

template <typename T>
int launch_state_query(const RetentionStateQueryArgs& a, cudaStream_t stream) {
    static_assert(kFeatures * kMaxDim / 4 / kTileThreads == 4, "at most 4 float4 loads per thread");
    if (a.e <= 32) return launch_state_query_kernel<T, 1>(a, stream);
    if (a.e <= 64) return launch_state_query_kernel<T, 2>(a, stream);
    return launch_state_query_kernel<T, 4>(a, stream);
}

}  // namespace
}  // namespace retention

RETENTION_API int retention_state_query(const RetentionStateQueryArgs* args, cudaStream_t stream) {
    using namespace retention;
    clear_error();
    RETENTION_REQUIRE(args != nullptr, "state_query: null argument struct");
    const RetentionStateQueryArgs& a = *args;
    if (!require_problem("state_query", a.d, kMaxDim, a.deg, a.h, a.hq)) return -1;
    RETENTION_REQUIRE(a.e >= 16 && a.e <= kMaxDim && a.e % 16 == 0,
                      "state_query: e must be a multiple of 16 in 16..%d, got %lld", kMaxDim, (long long)a.e);
    RETENTION_REQUIRE(a.chunk >= 1 && a.n_chunks == (a.t + a.chunk - 1) / a.chunk,
                      "state_query: n_chunks=%lld must be ceil(t / chunk) = ceil(%lld / %lld)",
                      (long long)a.n_chunks, (long long)a.t, (long long)a.chunk);
    RETENTION_REQUIRE(a.q && a.states && a.keys && a.index && a.weight && a.num && a.den, "state_query: a required pointer is null");
    RETENTION_REQUIRE(a.ss[3] % 4 == 0 && a.ss[0] % 4 == 0 && a.ss[1] % 4 == 0 && a.ss[2] % 4 == 0 &&
                          reinterpret_cast<uintptr_t>(a.states) % 16 == 0,
                      "state_query: the states must be contiguous [.., D, e] fp32 with 16-byte aligned rows");
    RETENTION_REQUIRE(a.b * a.hq < 65536, "state_query: b * hq must be below 65536, got %lld", (long long)(a.b * a.hq));
    if (a.b * a.hq == 0 || a.t == 0) return 0;
    RETENTION_DISPATCH(a.dtype, return launch_state_query<scalar_t>(a, stream));
    return 0;
}
