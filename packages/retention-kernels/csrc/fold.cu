// The fold of a window into the state, on the tensor cores:
//
//     S' = e^{G_w} S + Phi^T (decay * V)        z' = e^{G_w} z + Phi^T decay        decay_j = e^{G_w - G_j}
//
// per (batch, head) a [D, w] x [w, e] product (Phi [w, D] = phi(k_j), from the sympow table). One block owns
// 128 features x up to 128 value columns (grid: feature tiles, b * h, column tiles) and walks the window in
// steps of 32 keys: the keys and values of the next step are copied into shared memory (cp.async, double
// buffered) while each thread builds decay_j phi(k_j)_a for its feature `a` (index and weight in registers)
// into the A tile, and the warps multiply it with the values (the B tile)
// (tiles.cuh: bf16 operands for bf16/fp16, 3xTF32 for fp32, fp32 accumulators). z' is summed from the fp32
// phi values on the way. Same contract as retention_kernels.triton.decode.fold_window.
#include <cuda_pipeline.h>

#include "tiles.cuh"

namespace retention {
namespace {

constexpr int kFoldKeys = 32;       // keys per step
constexpr int kFoldMaxHeadDim = 256;

struct FoldShared {
    size_t keys, values, converted, decay, phi, scratch, key_sums, bytes;
    int key_stride, ldv, lda, ldb;
};

// keys: raw K rows [2 buffers][32][round_up(d, VEC)] in the input dtype; values: raw V rows [2][32][ldv] (the
// B operand itself when the input dtype is the operand type: bf16, fp32); converted: B for fp16 inputs.
template <typename T>
__host__ __device__ inline FoldShared fold_shared(int64_t d, int64_t e) {
    using O = typename Operand<T>::type;
    constexpr int vec = 16 / sizeof(T);
    FoldShared s;
    const int padded_columns = static_cast<int>(round_up(e < kTileColumns ? e : kTileColumns, 16));
    s.key_stride = static_cast<int>(round_up(d, vec));
    s.ldv = padded_columns + kOperandPad<T>;
    s.lda = kTileRows + kOperandPad<O>;
    s.ldb = padded_columns + kOperandPad<O>;
    SharedLayout layout;
    s.keys = layout.take<T>(2 * kFoldKeys * s.key_stride);
    s.values = layout.take<T>(2 * kFoldKeys * s.ldv);
    s.converted = std::is_same_v<T, O> ? s.values : layout.take<O>(kFoldKeys * s.ldb);
    s.decay = layout.take<float>(kFoldKeys);
    s.phi = layout.take<O>(kFoldKeys * s.lda);          // A, column-major: [keys, features]
    s.scratch = layout.take<float>(8 * kScratchFloats);
    s.key_sums = layout.take<float>(2 * kTileRows);
    s.bytes = layout.offset;
    return s;
}

// COLUMNS: 16-column fragments per warp (1, 2, 4 for up to 32, 64, 128 value columns per block).
template <typename T, int COLUMNS>
__global__ void __launch_bounds__(kTileThreads) fold_kernel(RetentionFoldArgs a) {
    using O = typename Operand<T>::type;
    constexpr int VEC = 16 / sizeof(T);
    extern __shared__ __align__(128) unsigned char shared[];
    const FoldShared layout = fold_shared<T>(a.d, a.e);
    T* keys_raw = reinterpret_cast<T*>(shared + layout.keys);
    T* values_raw = reinterpret_cast<T*>(shared + layout.values);
    O* values_converted = reinterpret_cast<O*>(shared + layout.converted);
    float* decay = reinterpret_cast<float*>(shared + layout.decay);
    O* phi_tile = reinterpret_cast<O*>(shared + layout.phi);
    float* key_sums = reinterpret_cast<float*>(shared + layout.key_sums);

    const int d = static_cast<int>(a.d), e = static_cast<int>(a.e), deg = static_cast<int>(a.deg);
    const int64_t w = a.w;
    const int64_t batch = blockIdx.y / a.h, head = blockIdx.y % a.h;
    const int column0 = blockIdx.z * kTileColumns;
    const int columns = min(e - column0, kTileColumns);   // value columns of this block
    const int padded_columns = static_cast<int>(round_up(columns, 16));
    const int column_tiles = padded_columns / 16;
    const int tid = threadIdx.x, warp = tid / 32;

    const T* k = static_cast<const T*>(a.k) + batch * a.sk[0] + head * a.sk[2];
    const T* v = static_cast<const T*>(a.v) + batch * a.sv[0] + head * a.sv[2] + column0 * a.sv[3];
    const float* g = static_cast<const float*>(a.g) + batch * a.sg[0] + head * a.sg[2];
    // Whole 16-byte chunks (cp.async) when rows are contiguous and aligned, else element by element.
    const bool vector = vector_rows<T>(a.k, a.sk) && vector_rows<T>(a.v, a.sv) && d % VEC == 0 && e % VEC == 0;
    const float G_w = w > 0 ? g[(w - 1) * a.sg[1]] : 0.f;

    // This thread's feature (fixed for the whole window) and its half of each step's keys.
    const int local_feature = tid % kTileRows, key_half = tid / kTileRows;
    const int64_t feature = static_cast<int64_t>(blockIdx.x) * kTileRows + local_feature;
    const bool inside = feature < a.D;
    const float feature_weight = inside ? static_cast<const float*>(a.weight)[feature] : 0.f;
    int coordinate[4] = {0, 0, 0, 0};
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        if (p < deg && inside) coordinate[p] = static_cast<const int*>(a.index)[feature * deg + p];
    }
    float key_sum = 0.f;

    WarpTile<O, wmma::col_major, COLUMNS> tile;
    tile.init(warp);

    // Step `step`'s keys and values into buffer `buffer`: rows past the window (and padding columns) zero.
    const int k_chunks = layout.key_stride / VEC, v_chunks = padded_columns / VEC;
    auto issue_loads = [&](int64_t step, int buffer) {
        const int64_t start = step * kFoldKeys;
        T* keys_buffer = keys_raw + buffer * kFoldKeys * layout.key_stride;
        T* values_buffer = values_raw + buffer * kFoldKeys * layout.ldv;
        for (int i = tid; i < kFoldKeys * (k_chunks + v_chunks); i += kTileThreads) {
            const bool is_key = i < kFoldKeys * k_chunks;
            const int item = is_key ? i : i - kFoldKeys * k_chunks, chunks = is_key ? k_chunks : v_chunks;
            const int jj = item / chunks, c = (item % chunks) * VEC, valid_columns = is_key ? d : columns;
            const int64_t j = start + jj;
            T* destination = is_key ? keys_buffer + jj * layout.key_stride + c : values_buffer + jj * layout.ldv + c;
            const T* source = is_key ? k + j * a.sk[1] + c * a.sk[3] : v + j * a.sv[1] + c * a.sv[3];
            const int64_t stride = is_key ? a.sk[3] : a.sv[3];
            if (j < w && c < valid_columns && vector) {
                __pipeline_memcpy_async(destination, source, 16);
            } else {
#pragma unroll
                for (int u = 0; u < VEC; ++u) {
                    destination[u] = j < w && c + u < valid_columns ? source[u * stride] : from_float<T>(0.f);
                }
            }
        }
        __pipeline_commit();
    };

    const int64_t steps = (w + kFoldKeys - 1) / kFoldKeys;
    float g_next = 0.f;  // the gate of key tid of the next step (tid < 32), loaded a step ahead
    if (steps > 0) {
        issue_loads(0, 0);
        if (tid < kFoldKeys && tid < w) g_next = g[tid * a.sg[1]];
    }
    for (int64_t step = 0; step < steps; ++step) {
        const int buffer = static_cast<int>(step & 1);
        if (tid < kFoldKeys) decay[tid] = step * kFoldKeys + tid < w ? __expf(G_w - g_next) : 0.f;
        if (step + 1 < steps) {
            issue_loads(step + 1, buffer ^ 1);
            const int64_t j = (step + 1) * kFoldKeys + tid;
            if (tid < kFoldKeys && j < w) g_next = g[j * a.sg[1]];
        } else {
            __pipeline_commit();  // an empty group: the wait below always leaves the newest one
        }
        __pipeline_wait_prior(1);  // this step's copies have landed (for this thread)
        __syncthreads();           // ... and for every thread

        const T* keys_buffer = keys_raw + buffer * kFoldKeys * layout.key_stride;
        const O* values_tile = values_converted;
        if constexpr (std::is_same_v<T, O>) {
            values_tile = values_raw + buffer * kFoldKeys * layout.ldv;
        } else {
            const T* values_buffer = values_raw + buffer * kFoldKeys * layout.ldv;
            for (int i = tid; i < kFoldKeys * padded_columns; i += kTileThreads) {
                const int jj = i / padded_columns, c = i % padded_columns;
                values_converted[jj * layout.ldb + c] = to_operand<O>(to_float<T>(values_buffer[jj * layout.ldv + c]));
            }
        }
        // A[feature, key] = decay_key * w_a * prod_p k_key[coordinate_p]; keys past the window have decay 0.
#pragma unroll 4
        for (int jj = key_half; jj < kFoldKeys; jj += 2) {
            float x = feature_weight * decay[jj];
            const T* key = keys_buffer + jj * layout.key_stride;
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                if (p < deg) x *= to_float<T>(key[coordinate[p]]);
            }
            key_sum += x;
            phi_tile[jj * layout.lda + local_feature] = to_operand<O>(x);
        }
        __syncthreads();

#pragma unroll
        for (int kk = 0; kk < kFoldKeys; kk += decltype(tile)::K) {
            tile.step(phi_tile, layout.lda, values_tile, layout.ldb, kk, column_tiles);
        }
        __syncthreads();  // before the next step rewrites decay, phi and (two steps on) this buffer
    }

    // S' = C + e^{G_w} S (each element read, then written, by one thread: out_state may alias state).
    const float total = __expf(G_w);
    const T* old_state = static_cast<const T*>(a.state);
    T* out_state = static_cast<T*>(a.out_state);
    const int64_t feature0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
    float* scratch = reinterpret_cast<float*>(shared + layout.scratch) + warp * kScratchFloats;
    tile.store(scratch, column_tiles, [&](int row, int column, float value) {
        const int64_t f = feature0 + row, c = column0 + column;
        if (f >= a.D || column >= columns) return;
        if (old_state != nullptr) {
            value += total * to_float<T>(old_state[batch * a.ss[0] + head * a.ss[1] + f * a.ss[2] + c * a.ss[3]]);
        }
        out_state[batch * a.sos[0] + head * a.sos[1] + f * a.sos[2] + c * a.sos[3]] = from_float<T>(value);
    });

    key_sums[key_half * kTileRows + local_feature] = key_sum;
    __syncthreads();
    if (blockIdx.z == 0 && tid < kTileRows && inside) {
        float value = key_sums[tid] + key_sums[kTileRows + tid];
        const float* old_keys = static_cast<const float*>(a.keys);
        if (old_keys != nullptr) value += total * old_keys[batch * a.sz[0] + head * a.sz[1] + feature * a.sz[2]];
        static_cast<float*>(a.out_keys)[batch * a.soz[0] + head * a.soz[1] + feature * a.soz[2]] = value;
    }
}

template <typename T, int COLUMNS>
int launch_fold_kernel(const RetentionFoldArgs& a, cudaStream_t stream) {
    const size_t bytes = fold_shared<T>(a.d, a.e).bytes;
    RETENTION_CHECK(cudaFuncSetAttribute(fold_kernel<T, COLUMNS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes)));
    const dim3 grid(static_cast<unsigned>((a.D + kTileRows - 1) / kTileRows), static_cast<unsigned>(a.b * a.h),
                    static_cast<unsigned>((a.e + kTileColumns - 1) / kTileColumns));
    fold_kernel<T, COLUMNS><<<grid, kTileThreads, bytes, stream>>>(a);
    RETENTION_CHECK(cudaGetLastError());
    return 0;
}

template <typename T>
int launch_fold_kernel(const RetentionFoldArgs& a, cudaStream_t stream) {
    if (a.e <= 32) return launch_fold_kernel<T, 1>(a, stream);
    if (a.e <= 64) return launch_fold_kernel<T, 2>(a, stream);
    return launch_fold_kernel<T, 4>(a, stream);
}

}  // namespace

// Shared with decode.cu (the fused decode step folds through it).
int check_fold(const RetentionFoldArgs& a) {
    if (!require_problem("fold", a.d, kFoldMaxHeadDim, a.deg, a.h, a.h) || !require_range("fold", "e", a.e, 1, 256)) return -1;
    RETENTION_REQUIRE(a.w >= 0 && a.b >= 0 && a.D >= 0, "fold: negative size");
    RETENTION_REQUIRE(a.k && a.v && a.g && a.out_state && a.out_keys && a.index && a.weight,
                      "fold: a required pointer is null");
    RETENTION_REQUIRE((a.state == nullptr) == (a.keys == nullptr), "fold: state and keys must be given together");
    RETENTION_REQUIRE(a.b * a.h < 65536, "fold: b * h must be below 65536, got %lld", (long long)(a.b * a.h));
    return 0;
}

int launch_fold(const RetentionFoldArgs& a, cudaStream_t stream) {
    if (a.b * a.h == 0 || a.D == 0) return 0;
    RETENTION_DISPATCH(a.dtype, return launch_fold_kernel<scalar_t>(a, stream));
    return 0;
}

}  // namespace retention

RETENTION_API int retention_fold_window(const RetentionFoldArgs* args, cudaStream_t stream) {
    using namespace retention;
    clear_error();
    RETENTION_REQUIRE(args != nullptr, "fold_window: null argument struct");
    if (int status = check_fold(*args)) return status;
    return launch_fold(*args, stream);
}
