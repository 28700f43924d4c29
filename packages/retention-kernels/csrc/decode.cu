// Inference kernels: queries at the end of a window attend to the window and to the state before it (the fused
// single-token decode step of the static cache included), and the fold of a full window into the state.
//
// A query at window position m (G the window's cumulative log gate, S, z the state before the window) reads
//
//     num = s^p e^{G_m} phi(q)^T S + sum_{j <= m} (s <q, k_j>)^p e^{G_m - G_j} v_j
//     den = s^p e^{G_m} phi(q)^T z + sum_{j <= m} (s <q, k_j>)^p e^{G_m - G_j}
//     y   = num / den        (0 where den == 0)
//
// phi(q) is built on the fly from the sympow table (index int32 [D, deg], weight fp32 [D]), so the state is
// streamed from memory once per query row, in 16-byte loads. Each row's keys and state rows are split over
// `splits` blocks (grid.y) to fill the GPU at decode (b * hq rows only); a second kernel adds the partial sums,
// normalises and (append mode) bumps the device-side window length. Same contract as
// retention_kernels.triton.decode (attend_window / decode_step / fold_window).
#include "common.cuh"

namespace retention {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxHeadDim = 256;

// Threads per row group: e / VEC columns of VEC elements each, rounded up to a power of two (<= 32, so that a
// group lives inside one warp and reduces by shuffles).
__host__ __device__ inline int group_width(int64_t e, int vec) {
    int width = 1;
    while (width * vec < e) width *= 2;
    return width;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) attend_kernel(RetentionAttendArgs a) {
    constexpr int VEC = 16 / sizeof(T);
    const int64_t row = blockIdx.x, rows = gridDim.x;  // (batch, query, query head), query head fastest
    const int64_t split = blockIdx.y, splits = gridDim.y;
    const int64_t head = row % a.hq, query = (row / a.hq) % a.tq, batch = row / (a.hq * a.tq);
    const int64_t kv_head = head / (a.hq / a.h);
    const int tid = threadIdx.x;
    const int width = group_width(a.e, VEC), slots = kThreads / width;
    const int lane_in_group = tid % width, slot = tid / width;
    const int64_t column = static_cast<int64_t>(lane_in_group) * VEC;
    const bool has_columns = column < a.e;

    __shared__ float q_shared[kMaxHeadDim];
    __shared__ float reduce_numerator[kThreads * VEC];
    __shared__ float reduce_denominator[kThreads];
    const T* q = static_cast<const T*>(a.q) + batch * a.sq[0] + query * a.sq[1] + head * a.sq[2];
    for (int c = tid; c < a.d; c += kThreads) q_shared[c] = to_float<T>(q[c * a.sq[3]]);
    __syncthreads();

    T* k_base = static_cast<T*>(a.k) + batch * a.sk[0] + kv_head * a.sk[2];
    T* v_base = static_cast<T*>(a.v) + batch * a.sv[0] + kv_head * a.sv[2];
    float* g_base = static_cast<float*>(a.g) + batch * a.sg[0] + kv_head * a.sg[2];
    int64_t n_keys;
    float G_m, g_new = 0.f;
    if (a.append) {
        // One query per row; the new key goes to row L (device-side length), after the L buffered keys.
        n_keys = *static_cast<const int64_t*>(a.length);
        const float G_before = n_keys > 0 ? g_base[(n_keys - 1) * a.sg[1]] : 0.f;
        if (a.new_log_g != nullptr) g_new = static_cast<const float*>(a.new_log_g)[batch * a.sng[0] + kv_head * a.sng[1]];
        G_m = G_before + g_new;
    } else {
        const int64_t position = a.w - a.tq + query;  // -1 (or less) when there is no window
        n_keys = position >= 0 ? position + 1 : 0;
        G_m = position >= 0 ? g_base[position * a.sg[1]] : 0.f;
    }

    float numerator[VEC] = {}, denominator = 0.f;

    // The window: this split's contiguous range of keys; each group of `width` threads takes one key per pass.
    // The loop bound is uniform over the block so that every lane reaches the shuffles.
    const int64_t per_split = (n_keys + splits - 1) / splits;
    const int64_t key_begin = split * per_split, key_end = min(n_keys, key_begin + per_split);
    for (int64_t base = key_begin; base < key_end; base += slots) {
        const int64_t j = base + slot;
        const bool visible = j < key_end;
        float dot = 0.f;
        if (visible) {
            for (int c = lane_in_group; c < a.d; c += width) dot += q_shared[c] * to_float<T>(k_base[j * a.sk[1] + c * a.sk[3]]);
        }
        for (int offset = width / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        if (visible) {
            const float weight = integer_power(dot * static_cast<float>(a.scale), a.deg) * __expf(G_m - g_base[j * a.sg[1]]);
            if (has_columns) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) numerator[i] += weight * to_float<T>(v_base[j * a.sv[1] + (column + i) * a.sv[3]]);
            }
            if (lane_in_group == 0) denominator += weight;
        }
    }

    if (a.append) {
        // The new key: weight (s <q, k>)^p, no decay; every group computes it, group 0 of split 0 counts it.
        const T* new_k = static_cast<const T*>(a.new_k) + batch * a.snk[0] + kv_head * a.snk[1];
        const T* new_v = static_cast<const T*>(a.new_v) + batch * a.snv[0] + kv_head * a.snv[1];
        float dot = 0.f;
        for (int c = lane_in_group; c < a.d; c += width) dot += q_shared[c] * to_float<T>(new_k[c * a.snk[2]]);
        for (int offset = width / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        if (split == 0 && slot == 0) {
            const float weight = integer_power(dot * static_cast<float>(a.scale), a.deg);
            if (has_columns) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) numerator[i] += weight * to_float<T>(new_v[(column + i) * a.snv[2]]);
            }
            if (lane_in_group == 0) denominator += weight;
        }
        // One block per key/value head writes the token at row L. Every other read is of rows below L: no race.
        if (split == 0 && head % (a.hq / a.h) == 0) {
            for (int c = tid; c < a.d; c += kThreads) k_base[n_keys * a.sk[1] + c * a.sk[3]] = new_k[c * a.snk[2]];
            for (int c = tid; c < a.e; c += kThreads) v_base[n_keys * a.sv[1] + c * a.sv[3]] = new_v[c * a.snv[2]];
            if (tid == 0) {
                g_base[n_keys * a.sg[1]] = G_m;
                if (a.raw_log_g != nullptr) {
                    static_cast<float*>(a.raw_log_g)[batch * a.srg[0] + n_keys * a.srg[1] + kv_head * a.srg[2]] = g_new;
                }
            }
        }
    }

    // The state: this split's contiguous range of features; phi(q)_a from the table, S rows in 16-byte loads,
    // four rows in flight per thread. Scaled by s^p e^{G_m} once at the end.
    if (a.state != nullptr) {
        const T* s_base = static_cast<const T*>(a.state) + batch * a.ss[0] + kv_head * a.ss[1];
        const float* z_base = static_cast<const float*>(a.keys) + batch * a.sz[0] + kv_head * a.sz[1];
        const int* index = static_cast<const int*>(a.index);
        const float* feature_weight = static_cast<const float*>(a.weight);
        const int64_t per_split_features = (a.D + splits - 1) / splits;
        const int64_t feature_begin = split * per_split_features;
        const int64_t feature_end = min(a.D, feature_begin + per_split_features);
        float state_numerator[VEC] = {}, state_denominator = 0.f;
        constexpr int kInFlight = 4;
        for (int64_t base = feature_begin + slot; base < feature_end; base += kInFlight * slots) {
            float rows_loaded[kInFlight][VEC];
            float phi[kInFlight];
#pragma unroll
            for (int u = 0; u < kInFlight; ++u) {
                const int64_t feature = base + u * slots;
                const bool inside = feature < feature_end;
                if (inside && has_columns) {
                    load_vector<T, VEC>(s_base + feature * a.ss[2] + column, rows_loaded[u]);
                } else {
#pragma unroll
                    for (int i = 0; i < VEC; ++i) rows_loaded[u][i] = 0.f;
                }
                float value = inside ? feature_weight[feature] : 0.f;
#pragma unroll
                for (int p = 0; p < 4; ++p) {
                    if (p < a.deg && inside) value *= q_shared[index[feature * a.deg + p]];
                }
                phi[u] = value;
            }
#pragma unroll
            for (int u = 0; u < kInFlight; ++u) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) state_numerator[i] += phi[u] * rows_loaded[u][i];
                const int64_t feature = base + u * slots;
                if (lane_in_group == 0 && feature < feature_end) state_denominator += phi[u] * z_base[feature * a.sz[2]];
            }
        }
        const float coefficient = integer_power(static_cast<float>(a.scale), a.deg) * __expf(G_m);
#pragma unroll
        for (int i = 0; i < VEC; ++i) numerator[i] += coefficient * state_numerator[i];
        denominator += coefficient * state_denominator;
    }

    // Block reduction over the slots: column c sums the numerators of the threads holding it.
#pragma unroll
    for (int i = 0; i < VEC; ++i) reduce_numerator[tid * VEC + i] = numerator[i];
    reduce_denominator[tid] = denominator;
    __syncthreads();
    if (tid < a.e) {
        const int group_lane = tid / VEC, element = tid % VEC;
        float total = 0.f, total_denominator = 0.f;
        for (int s = 0; s < slots; ++s) {
            total += reduce_numerator[(s * width + group_lane) * VEC + element];
            total_denominator += reduce_denominator[s * width];
        }
        if (splits == 1 && !a.append) {
            const float y = total_denominator == 0.f ? 0.f : total / total_denominator;
            static_cast<T*>(a.out)[batch * a.so[0] + query * a.so[1] + head * a.so[2] + tid * a.so[3]] = from_float<T>(y);
        } else {
            float* partial = static_cast<float*>(a.partial) + (split * rows + row) * (a.e + 1);
            partial[tid] = total;
            if (tid == 0) partial[a.e] = total_denominator;
        }
    }
}

// Adds the splits' partial sums [splits, rows, e + 1], normalises, writes Y; in append mode bumps the length
// (after the attend kernel in stream order: every block there has read the old length).
template <typename T>
__global__ void combine_kernel(RetentionAttendArgs a, int64_t splits) {
    const int64_t row = blockIdx.x, rows = gridDim.x;
    const int64_t head = row % a.hq, query = (row / a.hq) % a.tq, batch = row / (a.hq * a.tq);
    if (a.append && row == 0 && threadIdx.x == 0) *static_cast<int64_t*>(a.length) += 1;
    for (int64_t c = threadIdx.x; c < a.e; c += blockDim.x) {
        float numerator = 0.f, denominator = 0.f;
        for (int64_t s = 0; s < splits; ++s) {
            const float* partial = static_cast<const float*>(a.partial) + (s * rows + row) * (a.e + 1);
            numerator += partial[c];
            denominator += partial[a.e];
        }
        const float y = denominator == 0.f ? 0.f : numerator / denominator;
        static_cast<T*>(a.out)[batch * a.so[0] + query * a.so[1] + head * a.so[2] + c * a.so[3]] = from_float<T>(y);
    }
}

// The fold: one block per (64 features, batch * head). Keys come in chunks of 16: phi(k_j) decayed to the end
// of the window is built in shared memory for the block's features, then each thread accumulates a 4 x 16
// register tile of S'. fp32 throughout (FFMA); the fold runs once per window, so this is not the hot path.
constexpr int kFoldRows = 64, kFoldKeys = 16, kFoldMaxE = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) fold_kernel(RetentionFoldArgs a) {
    const int64_t tile = blockIdx.x, batch = blockIdx.y / a.h, head = blockIdx.y % a.h;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    __shared__ float k_shared[kFoldKeys][kMaxHeadDim + 1];
    __shared__ float v_shared[kFoldKeys][kFoldMaxE];
    __shared__ float phi_shared[kFoldRows][kFoldKeys + 1];
    __shared__ float decay_shared[kFoldKeys];
    const T* k = static_cast<const T*>(a.k) + batch * a.sk[0] + head * a.sk[2];
    const T* v = static_cast<const T*>(a.v) + batch * a.sv[0] + head * a.sv[2];
    const float* g = static_cast<const float*>(a.g) + batch * a.sg[0] + head * a.sg[2];
    const int* index = static_cast<const int*>(a.index);
    const float* feature_weight = static_cast<const float*>(a.weight);
    const float G_w = a.w > 0 ? g[(a.w - 1) * a.sg[1]] : 0.f;
    const int column_tiles = static_cast<int>((a.e + 15) / 16);

    float state[4][16] = {}, keys[4] = {};
    for (int64_t start = 0; start < a.w; start += kFoldKeys) {
        for (int64_t i = tid; i < kFoldKeys * a.d; i += kThreads) {
            const int64_t jj = i / a.d, c = i % a.d, j = start + jj;
            k_shared[jj][c] = j < a.w ? to_float<T>(k[j * a.sk[1] + c * a.sk[3]]) : 0.f;
        }
        for (int64_t i = tid; i < kFoldKeys * a.e; i += kThreads) {
            const int64_t jj = i / a.e, c = i % a.e, j = start + jj;
            v_shared[jj][c] = j < a.w ? to_float<T>(v[j * a.sv[1] + c * a.sv[3]]) : 0.f;
        }
        if (tid < kFoldKeys) {
            const int64_t j = start + tid;
            decay_shared[tid] = j < a.w ? __expf(G_w - g[j * a.sg[1]]) : 0.f;
        }
        __syncthreads();
        for (int i = tid; i < kFoldRows * kFoldKeys; i += kThreads) {
            const int r = i / kFoldKeys, jj = i % kFoldKeys;
            const int64_t feature = tile * kFoldRows + r;
            float phi = 0.f;
            if (feature < a.D) {
                phi = feature_weight[feature] * decay_shared[jj];
                for (int p = 0; p < a.deg; ++p) phi *= k_shared[jj][index[feature * a.deg + p]];
            }
            phi_shared[r][jj] = phi;
        }
        __syncthreads();
        for (int jj = 0; jj < kFoldKeys; ++jj) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const float phi = phi_shared[ty + 16 * r][jj];
                if (tx == 0) keys[r] += phi;
#pragma unroll
                for (int c = 0; c < 16; ++c) {
                    if (c < column_tiles) state[r][c] += phi * v_shared[jj][tx + 16 * c];
                }
            }
        }
        __syncthreads();
    }

    const float total = __expf(G_w);
    const T* old_state = static_cast<const T*>(a.state);
    const float* old_keys = static_cast<const float*>(a.keys);
    T* out_state = static_cast<T*>(a.out_state);
    float* out_keys = static_cast<float*>(a.out_keys);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int64_t feature = tile * kFoldRows + ty + 16 * r;
        if (feature >= a.D) continue;
#pragma unroll
        for (int c = 0; c < 16; ++c) {
            const int64_t column = tx + 16 * c;
            if (c >= column_tiles || column >= a.e) continue;
            float value = state[r][c];
            if (old_state != nullptr) {
                value += total * to_float<T>(old_state[batch * a.ss[0] + head * a.ss[1] + feature * a.ss[2] + column * a.ss[3]]);
            }
            out_state[batch * a.sos[0] + head * a.sos[1] + feature * a.sos[2] + column * a.sos[3]] = from_float<T>(value);
        }
        if (tx == 0) {
            float value = keys[r];
            if (old_keys != nullptr) value += total * old_keys[batch * a.sz[0] + head * a.sz[1] + feature * a.sz[2]];
            out_keys[batch * a.soz[0] + head * a.soz[1] + feature * a.soz[2]] = value;
        }
    }
}

template <typename T>
int launch_fold(const RetentionFoldArgs& a, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>((a.D + kFoldRows - 1) / kFoldRows), static_cast<unsigned>(a.b * a.h));
    fold_kernel<T><<<grid, kThreads, 0, stream>>>(a);
    RETENTION_CHECK(cudaGetLastError());
    return 0;
}

int check_fold(const RetentionFoldArgs& a) {
    RETENTION_REQUIRE(a.d >= 1 && a.d <= kMaxHeadDim, "fold: d must be in 1..%d, got %lld", kMaxHeadDim, (long long)a.d);
    RETENTION_REQUIRE(a.e >= 1 && a.e <= kFoldMaxE, "fold: e must be in 1..%d, got %lld", kFoldMaxE, (long long)a.e);
    RETENTION_REQUIRE(a.deg >= 1 && a.deg <= 4, "fold: deg must be in 1..4, got %lld", (long long)a.deg);
    RETENTION_REQUIRE(a.k && a.v && a.g && a.out_state && a.out_keys && a.index && a.weight,
                      "fold: a required pointer is null");
    RETENTION_REQUIRE((a.state == nullptr) == (a.keys == nullptr), "fold: state and keys must be given together");
    return 0;
}

template <typename T>
int launch_attend(const RetentionAttendArgs& a, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>(a.b * a.tq * a.hq), static_cast<unsigned>(a.splits));
    attend_kernel<T><<<grid, kThreads, 0, stream>>>(a);
    RETENTION_CHECK(cudaGetLastError());
    if (a.splits > 1 || a.append) {
        combine_kernel<T><<<static_cast<unsigned>(a.b * a.tq * a.hq), 64, 0, stream>>>(a, a.splits);
        RETENTION_CHECK(cudaGetLastError());
    }
    if (a.append && a.fold) {  // the window (now W rows) into the state, in place, after the append
        RetentionFoldArgs f = {};
        f.k = a.k; f.v = a.v; f.g = a.g; f.state = a.state; f.keys = a.keys; f.out_state = a.state;
        f.out_keys = a.keys; f.index = a.index; f.weight = a.weight; f.dtype = a.dtype;
        f.b = a.b; f.w = a.w; f.h = a.h; f.d = a.d; f.e = a.e; f.D = a.D; f.deg = a.deg;
        for (int i = 0; i < 4; ++i) { f.sk[i] = a.sk[i]; f.sv[i] = a.sv[i]; f.ss[i] = a.ss[i]; f.sos[i] = a.ss[i]; }
        for (int i = 0; i < 3; ++i) { f.sg[i] = a.sg[i]; f.sz[i] = a.sz[i]; f.soz[i] = a.sz[i]; }
        if (int status = check_fold(f)) return status;
        return launch_fold<T>(f, stream);
    }
    return 0;
}

}  // namespace
}  // namespace retention

RETENTION_API int retention_attend_window(const RetentionAttendArgs* args, cudaStream_t stream) {
    using namespace retention;
    clear_error();
    RETENTION_REQUIRE(args != nullptr, "attend_window: null argument struct");
    const RetentionAttendArgs& a = *args;
    const int vec = a.dtype == kFloat32 ? 4 : 8;
    RETENTION_REQUIRE(a.d >= 1 && a.d <= kMaxHeadDim, "attend_window: d must be in 1..%d, got %lld", kMaxHeadDim, (long long)a.d);
    RETENTION_REQUIRE(a.e >= 1 && a.e % vec == 0 && group_width(a.e, vec) <= 32,
                      "attend_window: e must be a multiple of %d and at most %d, got %lld", vec, 32 * vec, (long long)a.e);
    RETENTION_REQUIRE(a.deg >= 1 && a.deg <= 4, "attend_window: deg must be in 1..4, got %lld", (long long)a.deg);
    RETENTION_REQUIRE(a.h >= 1 && a.hq % a.h == 0, "attend_window: hq=%lld must be a multiple of h=%lld", (long long)a.hq, (long long)a.h);
    RETENTION_REQUIRE(a.splits >= 1 && a.splits <= 65535, "attend_window: splits must be in 1..65535, got %lld", (long long)a.splits);
    RETENTION_REQUIRE(a.b * a.tq * a.hq >= 1 && a.b * a.tq * a.hq < (1LL << 31), "attend_window: b * tq * hq out of range");
    RETENTION_REQUIRE(a.q && a.k && a.v && a.g && a.out && a.index && a.weight, "attend_window: a required pointer is null");
    RETENTION_REQUIRE((a.splits == 1 && !a.append) || a.partial, "attend_window: splits > 1 or append needs the workspace");
    RETENTION_REQUIRE(!a.append || (a.tq == 1 && a.new_k && a.new_v && a.length),
                      "attend_window: append mode needs tq == 1 and the new key, value and length");
    RETENTION_REQUIRE(!a.fold || a.append, "attend_window: fold is only fused with append (use retention_fold_window)");
    if (a.state != nullptr) {
        // 16-byte rows of the state: contiguous along e, rows and base aligned.
        RETENTION_REQUIRE(a.keys != nullptr, "attend_window: state without keys");
        RETENTION_REQUIRE(a.ss[3] == 1 && a.ss[2] % vec == 0 && a.ss[1] % vec == 0 && a.ss[0] % vec == 0 &&
                              reinterpret_cast<uintptr_t>(a.state) % 16 == 0,
                          "attend_window: the state must be contiguous along e with 16-byte aligned rows");
    }
    RETENTION_DISPATCH(a.dtype, return launch_attend<scalar_t>(a, stream));
    return 0;
}

RETENTION_API int retention_fold_window(const RetentionFoldArgs* args, cudaStream_t stream) {
    using namespace retention;
    clear_error();
    RETENTION_REQUIRE(args != nullptr, "fold_window: null argument struct");
    if (int status = check_fold(*args)) return status;
    if (args->b * args->h == 0 || args->D == 0) return 0;
    RETENTION_DISPATCH(args->dtype, return launch_fold<scalar_t>(*args, stream));
    return 0;
}
