// Shared pieces of the retention CUDA kernels: the C ABI structs, error reporting, dtype loads.
//
// Every entry point is a plain C function taking raw device pointers, element strides and a cudaStream_t, and
// returning 0 on success or a nonzero code with a message readable through retention_cuda_last_error(): no
// libtorch or Python linkage, so one shared library serves every torch release.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cstdio>

#define RETENTION_API extern "C" __attribute__((visibility("default")))

namespace retention {

enum DType : int64_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The message of the last failed call on this host thread (empty when the last call succeeded).
void set_error(const char* format, ...);
void clear_error();

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// VEC consecutive elements (16 bytes) from 16-byte aligned memory, as fp32.
template <typename T, int VEC>
__device__ __forceinline__ void load_vector(const T* source, float (&out)[VEC]) {
    static_assert(sizeof(T) * VEC == 16, "one 16-byte access");
    uint4 raw = *reinterpret_cast<const uint4*>(source);
    const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float<T>(values[i]);
}

// Up to VEC elements source[i * stride] (i < valid; zeros past it) as fp32: one 16-byte load when `vector`
// (stride 1, 16-byte aligned) and the chunk is whole, else element by element.
template <typename T, int VEC>
__device__ __forceinline__ void load_chunk(const T* source, int64_t stride, int valid, bool vector,
                                           float (&out)[VEC]) {
    if (vector && valid == VEC) {
        load_vector<T, VEC>(source, out);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] = i < valid ? to_float<T>(source[i * stride]) : 0.f;
    }
}

// Whether rows of a [.., n] tensor with these strides (elements) can be read in 16-byte chunks: contiguous
// along the last dimension, every other stride a multiple of 16 bytes, aligned base.
template <typename T, int N>
__host__ __device__ inline bool vector_rows(const void* base, const int64_t (&strides)[N]) {
    constexpr int64_t vec = 16 / sizeof(T);
    bool ok = strides[N - 1] == 1 && reinterpret_cast<uintptr_t>(base) % 16 == 0;
    for (int i = 0; i < N - 1; ++i) ok = ok && strides[i] % vec == 0;
    return ok;
}

__host__ __device__ constexpr int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

__device__ __forceinline__ float integer_power(float x, int deg) {
    float result = x;
#pragma unroll
    for (int p = 1; p < 4; ++p) {
        if (p < deg) result *= x;
    }
    return result;
}

}  // namespace retention

// Check a CUDA runtime call; on failure record where and why, and return the error code from the entry point.
#define RETENTION_CHECK(call)                                                                               \
    do {                                                                                                    \
        cudaError_t status_ = (call);                                                                       \
        if (status_ != cudaSuccess) {                                                                       \
            retention::set_error("%s failed at %s:%d: %s (%s)", #call, __FILE__, __LINE__,                 \
                                 cudaGetErrorName(status_), cudaGetErrorString(status_));                  \
            return static_cast<int>(status_);                                                               \
        }                                                                                                   \
    } while (0)

// Refuse bad arguments with a message (code -1): the Python side checks first, this is the last line of defence.
#define RETENTION_REQUIRE(condition, ...)                                                                   \
    do {                                                                                                    \
        if (!(condition)) {                                                                                 \
            retention::set_error(__VA_ARGS__);                                                              \
            return -1;                                                                                      \
        }                                                                                                   \
    } while (0)

namespace retention {

// The launch-argument checks shared by the entry points: true, or false with the message set
// ("<where>: <name> must be in <low>..<high>, got <value>").
inline bool require_range(const char* where, const char* name, int64_t value, int64_t low, int64_t high) {
    if (value >= low && value <= high) return true;
    set_error("%s: %s must be in %lld..%lld, got %lld", where, name, static_cast<long long>(low),
              static_cast<long long>(high), static_cast<long long>(value));
    return false;
}

// Head dim d in 1..max_d, deg in 1..4, hq a multiple of h (pass hq = h where there are no query heads).
inline bool require_problem(const char* where, int64_t d, int64_t max_d, int64_t deg, int64_t h, int64_t hq) {
    if (!require_range(where, "d", d, 1, max_d) || !require_range(where, "deg", deg, 1, 4)) return false;
    if (h < 1 || hq % h != 0) {
        set_error("%s: hq=%lld must be a multiple of h=%lld", where, static_cast<long long>(hq), static_cast<long long>(h));
        return false;
    }
    return true;
}

}  // namespace retention

// Dispatch on the runtime dtype code to a templated launcher body using `scalar_t`.
#define RETENTION_DISPATCH(dtype, ...)                                                                      \
    switch (dtype) {                                                                                        \
        case retention::kFloat32: { using scalar_t = float; __VA_ARGS__; break; }                          \
        case retention::kFloat16: { using scalar_t = __half; __VA_ARGS__; break; }                         \
        case retention::kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; }                 \
        default: retention::set_error("unsupported dtype code %lld", static_cast<long long>(dtype)); return -1; \
    }

// Argument structs: every integer is int64_t, every pointer void*, so that ctypes mirrors them exactly.
extern "C" {

// Queries at the end of a window attend to the window and the state before it (decode.cu). Two modes:
// plain (append == 0): Q [b, tq, hq, d] are the last tq window positions of K [b, w, h, d], V [b, w, h, e],
// G [b, w, h] (cumulative log gate, fp32; may be null when w == 0 and ungated).
// append (== 1, tq == 1): K, V, G are the static cache's buffers of W rows, `length` (int64 [1], device) the
// valid rows; the new token (new_k [b, h, d] strides, new_v, new_log_g [b, h] or null) is attended and then
// written at row `length` (and the raw gate into raw_log_g when given); `length` becomes length + 1.
// fold (append mode only): afterwards the full window (W rows) is folded into state/keys in place.
// splits > 1: each row's keys and features are split over that many blocks, whose partial sums [splits, rows,
// e + 1] go through `partial`; the last block of a row (counted in `counters`) adds them up, so one launch
// does everything (the counters are zeroed by an async memset before it).
typedef struct RetentionAttendArgs {
    void* q; void* k; void* v; void* g; void* state; void* keys; void* out;
    void* index; void* weight;       // sympow table: int32 [D, deg], fp32 [D]
    void* partial;                   // fp32 workspace [splits, rows, e + 1] (splits > 1 or append)
    void* new_k; void* new_v; void* new_log_g; void* raw_log_g; void* length;
    void* counters;                  // int32 [b * tq * hq + 1], any contents (splits > 1 or append)
    int64_t dtype;                   // of q, k, v, new_k, new_v, out and state
    int64_t b, tq, hq, h, w, d, e, D, deg, splits, append, fold;
    double scale;
    int64_t sq[4], sk[4], sv[4], sg[3], ss[4], sz[3], so[4];
    int64_t snk[3], snv[3], sng[2], srg[3];
} RetentionAttendArgs;

// The chunked forward's state query (state_query.cu):
// num[b, i, hq, :] = s^p e^{G_i} phi(q_i)^T S_c[b, h],  den[b, i, hq] = s^p e^{G_i} phi(q_i)^T z_c[b, h],
// c = i / chunk. states fp32 [b, h, n_chunks, D, e] (e contiguous), keys fp32 [b, h, n_chunks, D] (D contiguous),
// G fp32 [b, t, h] strides (the cumulative gate since the chunk start) or null.
typedef struct RetentionStateQueryArgs {
    void* q; void* states; void* keys; void* g; void* index; void* weight; void* num; void* den;
    int64_t dtype;                   // of q
    int64_t b, t, hq, h, d, e, D, deg, chunk, n_chunks;
    double scale;
    int64_t sq[4], ss[4], sz[4], sg[3], sn[4], sd[3];  // ss: b, h, chunk, D (e contiguous); sz: b, h, chunk, D
} RetentionStateQueryArgs;

// Fold a window into the state (decode.cu): S' = e^{G_w} S + sum_j e^{G_w - G_j} phi(k_j) v_j^T, z' alike.
// k [b, w, h, d], v [b, w, h, e], g fp32 [b, w, h]; state [b, h, D, e] (k's dtype) and keys fp32 [b, h, D] or
// null; out_state / out_keys may alias state / keys (each element is read before it is written, by one thread).
typedef struct RetentionFoldArgs {
    void* k; void* v; void* g; void* state; void* keys; void* out_state; void* out_keys; void* index; void* weight;
    int64_t dtype;                   // of k, v, state and out_state
    int64_t b, w, h, d, e, D, deg;
    int64_t sk[4], sv[4], sg[3], ss[4], sz[3], sos[4], soz[3];
} RetentionFoldArgs;

}  // extern "C"
