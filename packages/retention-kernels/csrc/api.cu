// Library-level entry points: error messages, ABI version, the architectures compiled in.
#include <cstdarg>

#include "common.cuh"

#ifndef RETENTION_CUDA_ARCHS
#define RETENTION_CUDA_ARCHS "unknown"
#endif

namespace retention {

static thread_local char last_error[1024] = "";

void set_error(const char* format, ...) {
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(last_error, sizeof(last_error), format, arguments);
    va_end(arguments);
}

void clear_error() { last_error[0] = '\0'; }

}  // namespace retention

// Bumped whenever an argument struct or an entry point changes (the Python loader refuses a mismatch).
RETENTION_API int retention_cuda_abi_version(void) { return 2; }

RETENTION_API const char* retention_cuda_last_error(void) { return retention::last_error; }

// The CMAKE_CUDA_ARCHITECTURES of this build, comma-separated, e.g. "80-real,90-real,90-virtual".
RETENTION_API const char* retention_cuda_archs(void) { return RETENTION_CUDA_ARCHS; }

// The CUDA runtime version linked in (e.g. 13000), or a negative error code.
RETENTION_API int retention_cuda_runtime_version(void) {
    int version = 0;
    cudaError_t status = cudaRuntimeGetVersion(&version);
    return status == cudaSuccess ? version : -static_cast<int>(status);
}

// sizeof of the argument structs, in the order attend, state query, fold: the Python loader compares them
// with its ctypes mirrors before any call.
RETENTION_API void retention_cuda_struct_sizes(int64_t* sizes) {
    sizes[0] = sizeof(RetentionAttendArgs);
    sizes[1] = sizeof(RetentionStateQueryArgs);
    sizes[2] = sizeof(RetentionFoldArgs);
}
