// Inference: queries at the end of a window attend to the window and to the state before it, including the fused
// single-token decode step of the static cache (append, attend, then the fold of fold.cu when the window fills).
//
// A query at window position m (G the window's cumulative log gate, S, z the state before the window) reads
//
//     num = s^p e^{G_m} phi(q)^T S + sum_{j <= m} (s <q, k_j>)^p e^{G_m - G_j} v_j
//     den = s^p e^{G_m} phi(q)^T z + sum_{j <= m} (s <q, k_j>)^p e^{G_m - G_j}
//     y   = num / den        (0 where den == 0)
//
// One block serves ROWS query rows of one key/value head (the hq / h query heads of the group, for each of the
// tq queries), so each state row and window key is read once for all of them. The window's keys and the state's
// features are split over `splits` blocks (grid.y) to fill the GPU at decode, where there are only b * h groups.
// The state is streamed in 16-byte loads, eight rows per thread issued before phi(q) of those features is built
// in shared memory from the sympow table (index int32 [D, deg], weight fp32 [D]). With splits > 1 the blocks
// write partial sums and the last block of a row group (an atomic counter) adds them up and normalises; in
// append mode the last block of the grid bumps the device-side window length: one launch per step.
// Same contract as retention_kernels.triton.decode (attend_window / decode_step).
#include "common.cuh"

namespace retention {

int check_fold(const RetentionFoldArgs& a);                     // fold.cu
int launch_fold(const RetentionFoldArgs& a, cudaStream_t stream);

namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kMaxHeadDim = 256;
constexpr int kMaxRows = 8;       // query rows per block
constexpr int kRowsInFlight = 8;  // state rows loaded per thread per tile

// Threads per row group: e / VEC columns of VEC elements each, rounded up to a power of two (<= 32, so that a
// group lives inside one warp and reduces by shuffles).
__host__ __device__ inline int group_width(int64_t e, int vec) {
    int width = 1;
    while (width * vec < e) width *= 2;
    return width;
}

// Query rows per block for r = hq / h query heads and tq queries: a power of two, at most kMaxRows.
__host__ inline int rows_per_block(int64_t group_rows) {
    int rows = 1;
    while (rows < group_rows && rows < kMaxRows) rows *= 2;
    return rows;
}

template <typename T, int ROWS>
__global__ void __launch_bounds__(kThreads, ROWS <= 2 ? 2 : 1) attend_kernel(RetentionAttendArgs a) {
    constexpr int VEC = 16 / sizeof(T);
    const int64_t ratio = a.hq / a.h, group_rows = a.tq * ratio;
    const int64_t row_blocks = (group_rows + ROWS - 1) / ROWS;
    const int64_t program = blockIdx.x, row_block = program % row_blocks, group = program / row_blocks;
    const int64_t batch = group / a.h, kv_head = group % a.h, first_row = row_block * ROWS;
    const int rows_here = static_cast<int>(min(static_cast<int64_t>(ROWS), group_rows - first_row));
    const int64_t split = blockIdx.y, splits = gridDim.y, rows = a.b * a.tq * a.hq;
    const int d = static_cast<int>(a.d), e = static_cast<int>(a.e), deg = static_cast<int>(a.deg);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int width = group_width(e, VEC), slots = kThreads / width;
    const int lane_in_group = tid % width, slot = tid / width, column = lane_in_group * VEC;
    const bool has_columns = column < e;
    const float scale = static_cast<float>(a.scale);

    __shared__ float q_shared[ROWS][kMaxHeadDim];
    __shared__ float phi_shared[ROWS][kThreads];
    __shared__ float reduce_shared[kWarps][kMaxHeadDim + 1];
    __shared__ int is_last;

    // Block row r: query (first_row + r) / ratio, query head kv_head * ratio + (first_row + r) % ratio.
    auto query_of = [&](int r) { return (first_row + r) / ratio; };
    auto head_of = [&](int r) { return kv_head * ratio + (first_row + r) % ratio; };

    const int padded_d = static_cast<int>(round_up(d, VEC));
    for (int i = tid; i < ROWS * padded_d; i += kThreads) {
        const int r = i / padded_d, c = i % padded_d;
        q_shared[r][c] = r < rows_here && c < d
                             ? to_float<T>(static_cast<const T*>(a.q)[batch * a.sq[0] + query_of(r) * a.sq[1] +
                                                                      head_of(r) * a.sq[2] + c * a.sq[3]])
                             : 0.f;
    }

    T* k_base = static_cast<T*>(a.k) + batch * a.sk[0] + kv_head * a.sk[2];
    T* v_base = static_cast<T*>(a.v) + batch * a.sv[0] + kv_head * a.sv[2];
    float* g_base = static_cast<float*>(a.g) + batch * a.sg[0] + kv_head * a.sg[2];
    const bool k_vector = vector_rows<T>(a.k, a.sk), v_vector = vector_rows<T>(a.v, a.sv);

    // Per row: the cumulative gate at the query and how many keys it sees. Append mode (tq == 1): the L buffered
    // keys and the new one, key L, read from new_k / new_v.
    float G_m[ROWS];
    int64_t visible[ROWS];
    int64_t n_keys, buffered;
    float g_new = 0.f;
    if (a.append) {
        buffered = *static_cast<const int64_t*>(a.length);
        const float G_before = buffered > 0 ? g_base[(buffered - 1) * a.sg[1]] : 0.f;
        if (a.new_log_g != nullptr) g_new = static_cast<const float*>(a.new_log_g)[batch * a.sng[0] + kv_head * a.sng[1]];
        n_keys = buffered + 1;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            G_m[r] = G_before + g_new;
            visible[r] = r < rows_here ? n_keys : 0;
        }
    } else {
        buffered = a.w;
        n_keys = 0;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int64_t position = a.w - a.tq + query_of(r);  // negative when there is no window
            visible[r] = r < rows_here && position >= 0 ? position + 1 : 0;
            G_m[r] = r < rows_here && position >= 0 ? g_base[position * a.sg[1]] : 0.f;
            n_keys = max(n_keys, visible[r]);
        }
    }
    __syncthreads();  // q_shared

    float numerator[ROWS][VEC], denominator[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        denominator[r] = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) numerator[r][i] = 0.f;
    }

    // The state rows of this split, in tiles of kRowsInFlight * slots features: the first tile's loads are
    // issued now, so that they are in flight while the block works on the window.
    const T* s_base = static_cast<const T*>(a.state) + batch * a.ss[0] + kv_head * a.ss[1];
    const int64_t features_per_split = a.state != nullptr ? (a.D + splits - 1) / splits : 0;
    const int64_t feature_begin = min(a.D, split * features_per_split);
    const int64_t feature_end = min(a.D, feature_begin + features_per_split);
    const int tile_features = min(kRowsInFlight * slots, kThreads);
    uint4 raw[kRowsInFlight];
    auto load_state_rows = [&](int64_t tile) {
#pragma unroll
        for (int u = 0; u < kRowsInFlight; ++u) {
            const int64_t feature = tile + slot + u * slots;
            raw[u] = slot + u * slots < tile_features && feature < feature_end && has_columns
                         ? *reinterpret_cast<const uint4*>(s_base + feature * a.ss[2] + column)
                         : make_uint4(0u, 0u, 0u, 0u);
        }
    };
    load_state_rows(feature_begin);

    // The window: this split's keys; a group of `width` threads takes one key per pass. The loop bound is
    // uniform over the block so that every lane reaches the shuffles.
    const int64_t keys_per_split = (n_keys + splits - 1) / splits;
    const int64_t key_begin = split * keys_per_split, key_end = min(n_keys, key_begin + keys_per_split);
    const T* new_k = static_cast<const T*>(a.new_k);
    const T* new_v = static_cast<const T*>(a.new_v);
    const bool new_k_vector = a.append && vector_rows<T>(a.new_k, a.snk);
    const bool new_v_vector = a.append && vector_rows<T>(a.new_v, a.snv);
    for (int64_t base = key_begin; base < key_end; base += slots) {
        const int64_t j = base + slot;
        const bool valid = j < key_end, is_new = a.append && j == buffered;
        const T* key = is_new ? new_k + batch * a.snk[0] + kv_head * a.snk[1] : k_base + j * a.sk[1];
        const int64_t key_stride = is_new ? a.snk[2] : a.sk[3];
        float values[VEC];  // loaded first: in flight with the key
        if (valid && has_columns) {
            const T* value = is_new ? new_v + batch * a.snv[0] + kv_head * a.snv[1] : v_base + j * a.sv[1];
            const int64_t value_stride = is_new ? a.snv[2] : a.sv[3];
            load_chunk<T, VEC>(value + column * value_stride, value_stride, VEC, is_new ? new_v_vector : v_vector, values);
        } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) values[i] = 0.f;
        }
        float dot[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) dot[r] = 0.f;
        if (valid) {
            for (int c = column; c < d; c += width * VEC) {
                float chunk[VEC];
                load_chunk<T, VEC>(key + c * key_stride, key_stride, min(VEC, d - c), is_new ? new_k_vector : k_vector, chunk);
#pragma unroll
                for (int r = 0; r < ROWS; ++r)
#pragma unroll
                    for (int i = 0; i < VEC; ++i) dot[r] += q_shared[r][c + i] * chunk[i];
            }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
            for (int offset = width / 2; offset > 0; offset /= 2) dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], offset);
        if (valid) {
            const float G_j = is_new ? G_m[0] : g_base[j * a.sg[1]];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const float weight = j < visible[r] ? integer_power(dot[r] * scale, deg) * __expf(G_m[r] - G_j) : 0.f;
#pragma unroll
                for (int i = 0; i < VEC; ++i) numerator[r][i] += weight * values[i];
                if (lane_in_group == 0) denominator[r] += weight;
            }
        }
    }

    // The state: per tile, phi for one feature per thread (all rows, scaled by s^p e^{G_m}) while the tile's
    // rows are in flight, then the products; the next tile's loads are issued before the next phi.
    if (a.state != nullptr) {
        const float* z_base = static_cast<const float*>(a.keys) + batch * a.sz[0] + kv_head * a.sz[1];
        const int* index = static_cast<const int*>(a.index);
        const float* feature_weight = static_cast<const float*>(a.weight);
        float coefficient[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) coefficient[r] = integer_power(scale, deg) * __expf(G_m[r]);
        for (int64_t tile = feature_begin; tile < feature_end; tile += tile_features) {
            if (tid < tile_features) {
                const int64_t feature = tile + tid;
                const bool inside = feature < feature_end;
                const float w = inside ? feature_weight[feature] : 0.f;
                const float z = inside ? z_base[feature * a.sz[2]] : 0.f;
                int coordinate[4] = {0, 0, 0, 0};
#pragma unroll
                for (int p = 0; p < 4; ++p) {
                    if (p < deg && inside) coordinate[p] = index[feature * deg + p];
                }
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    float phi = w * coefficient[r];
#pragma unroll
                    for (int p = 0; p < 4; ++p) {
                        if (p < deg) phi *= q_shared[r][coordinate[p]];
                    }
                    phi_shared[r][tid] = phi;
                    denominator[r] += phi * z;
                }
            }
            __syncthreads();
#pragma unroll
            for (int u = 0; u < kRowsInFlight; ++u) {
                if (slot + u * slots >= tile_features) break;  // only when e fits in fewer than 8 lanes
                const T* values = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const float phi = phi_shared[r][slot + u * slots];
#pragma unroll
                    for (int i = 0; i < VEC; ++i) numerator[r][i] += phi * to_float<T>(values[i]);
                }
            }
            if (tile + tile_features < feature_end) load_state_rows(tile + tile_features);
            __syncthreads();
        }
    }

    // Block reduction, row by row: numerators over the groups of a warp (shuffles), the denominator over all
    // lanes, then over the warps through shared memory. splits == 1: normalise and write Y; else the partials.
    auto out_index = [&](int r, int64_t c) {
        return batch * a.so[0] + query_of(r) * a.so[1] + head_of(r) * a.so[2] + c * a.so[3];
    };
    auto out_row = [&](int r) { return (batch * a.tq + query_of(r)) * a.hq + head_of(r); };
    float* partial = static_cast<float*>(a.partial);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        if (r >= rows_here) break;  // uniform
        float sums[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            sums[i] = numerator[r][i];
            for (int offset = 16; offset >= width; offset /= 2) sums[i] += __shfl_xor_sync(0xffffffffu, sums[i], offset);
        }
        float den = denominator[r];
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) den += __shfl_xor_sync(0xffffffffu, den, offset);
        if (lane < width && has_columns) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) reduce_shared[warp][column + i] = sums[i];
        }
        if (lane == 0) reduce_shared[warp][e] = den;
        __syncthreads();
        if (tid <= e) {
            float total = 0.f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) total += reduce_shared[w][tid];
            if (splits == 1) {
                if (tid < e) {
                    float total_den = 0.f;
#pragma unroll
                    for (int w = 0; w < kWarps; ++w) total_den += reduce_shared[w][e];
                    static_cast<T*>(a.out)[out_index(r, tid)] = from_float<T>(total_den == 0.f ? 0.f : total / total_den);
                }
            } else {
                partial[(split * rows + out_row(r)) * (e + 1) + tid] = total;
            }
        }
        __syncthreads();
    }

    if (a.append && split == 0 && row_block == 0) {
        // One block per key/value head writes the new token at row L. No block reads row L of the buffers (the
        // new key is read from new_k), and the fold that may follow is a later launch.
        const T* k_new = new_k + batch * a.snk[0] + kv_head * a.snk[1];
        const T* v_new = new_v + batch * a.snv[0] + kv_head * a.snv[1];
        for (int c = tid; c < d; c += kThreads) k_base[buffered * a.sk[1] + c * a.sk[3]] = k_new[c * a.snk[2]];
        for (int c = tid; c < e; c += kThreads) v_base[buffered * a.sv[1] + c * a.sv[3]] = v_new[c * a.snv[2]];
        if (tid == 0) {
            g_base[buffered * a.sg[1]] = G_m[0];
            if (a.raw_log_g != nullptr) {
                static_cast<float*>(a.raw_log_g)[batch * a.srg[0] + buffered * a.srg[1] + kv_head * a.srg[2]] = g_new;
            }
        }
    }

    int* counters = static_cast<int*>(a.counters);
    if (tid == 0) is_last = splits == 1;
    if (splits > 1) {
        // The last of the row group's blocks to finish adds up the partial sums (the standard threadfence
        // reduction: each block's writes are made visible before it takes a ticket).
        __threadfence();
        __syncthreads();
        if (tid == 0) {
            is_last = atomicAdd(counters + program, 1) == splits - 1;
            if (is_last) counters[program] = 0;  // ready for the next launch
        }
        __syncthreads();
        if (is_last) {
            __threadfence();
            for (int i = tid; i < rows_here * e; i += kThreads) {
                const int r = i / e, c = i % e;
                float total = 0.f, total_den = 0.f;
                for (int64_t s = 0; s < splits; ++s) {
                    const float* row_partial = partial + (s * rows + out_row(r)) * (e + 1);
                    total += __ldcg(row_partial + c);
                    total_den += __ldcg(row_partial + e);
                }
                static_cast<T*>(a.out)[out_index(r, c)] = from_float<T>(total_den == 0.f ? 0.f : total / total_den);
            }
        }
    }
    if (a.append) {
        // After every block has read the length (each takes this ticket at its end): L becomes L + 1.
        __syncthreads();
        if (tid == 0 && is_last) {
            __threadfence();
            const int done = atomicAdd(counters + gridDim.x, 1);
            if (done == static_cast<int>(gridDim.x) - 1) {
                counters[gridDim.x] = 0;
                *static_cast<int64_t*>(a.length) += 1;
            }
        }
    }
}

template <typename T>
int launch_attend(const RetentionAttendArgs& a, cudaStream_t stream) {
    const int64_t group_rows = a.tq * (a.hq / a.h);
    const int rows = rows_per_block(group_rows);
    const int64_t programs = a.b * a.h * ((group_rows + rows - 1) / rows);
    RETENTION_REQUIRE(programs < (1LL << 31) - 1, "attend_window: too many query rows");
    if (a.splits > 1 || a.append) {
        RETENTION_CHECK(cudaMemsetAsync(a.counters, 0, sizeof(int) * (programs + 1), stream));
    }
    const dim3 grid(static_cast<unsigned>(programs), static_cast<unsigned>(a.splits));
    switch (rows) {
        case 1: attend_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a); break;
        case 2: attend_kernel<T, 2><<<grid, kThreads, 0, stream>>>(a); break;
        case 4: attend_kernel<T, 4><<<grid, kThreads, 0, stream>>>(a); break;
        default: attend_kernel<T, 8><<<grid, kThreads, 0, stream>>>(a); break;
    }
    RETENTION_CHECK(cudaGetLastError());
    if (a.append && a.fold) {  // the window (now W rows) into the state, in place, after the append
        RetentionFoldArgs f = {};
        f.k = a.k; f.v = a.v; f.g = a.g; f.state = a.state; f.keys = a.keys; f.out_state = a.state;
        f.out_keys = a.keys; f.index = a.index; f.weight = a.weight; f.dtype = a.dtype;
        f.b = a.b; f.w = a.w; f.h = a.h; f.d = a.d; f.e = a.e; f.D = a.D; f.deg = a.deg;
        for (int i = 0; i < 4; ++i) { f.sk[i] = a.sk[i]; f.sv[i] = a.sv[i]; f.ss[i] = a.ss[i]; f.sos[i] = a.ss[i]; }
        for (int i = 0; i < 3; ++i) { f.sg[i] = a.sg[i]; f.sz[i] = a.sz[i]; f.soz[i] = a.sz[i]; }
        if (int status = check_fold(f)) return status;
        return launch_fold(f, stream);
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
    if (!require_problem("attend_window", a.d, kMaxHeadDim, a.deg, a.h, a.hq)) return -1;
    RETENTION_REQUIRE(a.e >= 1 && a.e % vec == 0 && group_width(a.e, vec) <= 32,
                      "attend_window: e must be a multiple of %d and at most %d, got %lld", vec, 32 * vec, (long long)a.e);
    RETENTION_REQUIRE(a.splits >= 1 && a.splits <= 65535, "attend_window: splits must be in 1..65535, got %lld", (long long)a.splits);
    RETENTION_REQUIRE(a.b >= 1 && a.tq >= 1 && a.b * a.tq * a.hq < (1LL << 31), "attend_window: b * tq * hq out of range");
    RETENTION_REQUIRE(a.q && a.k && a.v && a.g && a.out && a.index && a.weight, "attend_window: a required pointer is null");
    RETENTION_REQUIRE((a.splits == 1 && !a.append) || (a.partial && a.counters),
                      "attend_window: splits > 1 or append needs the workspace (partial and counters)");
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
