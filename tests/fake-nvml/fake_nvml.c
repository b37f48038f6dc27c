/*
 * A fake libnvidia-ml.so for tests on machines without an NVIDIA GPU.
 *
 * Loaded through nvml-wrapper's `Nvml::builder().lib_path(..)`, it exercises the real wrapper
 * code path end to end. It exports the NVML entry points the agent calls (plus a few close
 * neighbours), with NVML's C signatures and struct layouts (nvml-wrapper-sys 0.10 bindings).
 *
 * Invariants:
 * - The GPU count is fixed at compile time with -DFAKE_GPU_COUNT=N, never read from the
 *   environment: tests load several variants in one process, and the environment is shared.
 * - Build without a SONAME: glibc could otherwise treat two variants loaded from different
 *   paths as the same library.
 * - GPU i is named "Fake GPU i", has UUID "GPU-fake-<N>-<i>" and 16 GiB of memory.
 * - Readings change on every call so tests can tell a fresh sample from a cached one: GPU i
 *   uses (i + 1) GiB plus 1 MiB per earlier nvmlDeviceGetMemoryInfo* call on it (mod 1024),
 *   and its utilisation is (10 i + earlier nvmlDeviceGetUtilizationRates calls) mod 101.
 * - Like NVML, calls fail with NVML_ERROR_UNINITIALIZED unless init was called more times than
 *   shutdown, check their arguments, and reject a nvmlMemory_v2_t with the wrong version.
 */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#ifndef FAKE_GPU_COUNT
#error "build with -DFAKE_GPU_COUNT=N"
#endif

#define EXPORT __attribute__((visibility("default")))

typedef int nvmlReturn_t;
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25

#define GIB (1024ULL * 1024ULL * 1024ULL)
#define MIB (1024ULL * 1024ULL)
#define MEMORY_TOTAL (16ULL * GIB)
#define MEMORY_RESERVED (256ULL * MIB)

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

/* NVML_STRUCT_VERSION(Memory, 2) */
#define NVML_MEMORY_V2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

struct fake_device {
    unsigned long memory_calls;
    unsigned long utilization_calls;
};

/* One spare slot so the array is never empty when FAKE_GPU_COUNT is 0. */
static struct fake_device devices[FAKE_GPU_COUNT + 1];
static const unsigned int gpu_count = FAKE_GPU_COUNT;
static int init_count;

typedef struct fake_device *nvmlDevice_t;

static int initialized(void) {
    return __atomic_load_n(&init_count, __ATOMIC_SEQ_CST) > 0;
}

static struct fake_device *check_device(nvmlDevice_t device) {
    for (unsigned int i = 0; i < gpu_count; i++) {
        if (device == &devices[i]) {
            return device;
        }
    }
    return NULL;
}

/* Copies `text` into `out` of `length` bytes, or reports that it does not fit. */
static nvmlReturn_t copy_string(const char *text, char *out, unsigned int length) {
    if (out == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (strlen(text) + 1 > length) {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    memcpy(out, text, strlen(text) + 1);
    return NVML_SUCCESS;
}

static unsigned int index_of(struct fake_device *device) {
    return (unsigned int)(device - devices);
}

static unsigned long long memory_used(struct fake_device *device) {
    unsigned long calls = __atomic_fetch_add(&device->memory_calls, 1, __ATOMIC_SEQ_CST);
    return (unsigned long long)(index_of(device) + 1) * GIB + (unsigned long long)(calls % 1024) * MIB;
}

EXPORT nvmlReturn_t nvmlInit_v2(void) {
    __atomic_fetch_add(&init_count, 1, __ATOMIC_SEQ_CST);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    return nvmlInit_v2();
}

EXPORT nvmlReturn_t nvmlShutdown(void) {
    int current = __atomic_load_n(&init_count, __ATOMIC_SEQ_CST);
    while (current > 0) {
        if (__atomic_compare_exchange_n(&init_count, &current, current - 1, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_UNINITIALIZED;
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS:
        return "Success";
    case NVML_ERROR_UNINITIALIZED:
        return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT:
        return "Invalid Argument";
    case NVML_ERROR_NOT_FOUND:
        return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE:
        return "Insufficient Size";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH:
        return "Argument Version Mismatch";
    default:
        return "Unknown Error";
    }
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (!initialized()) {
        return NVML_ERROR_UNINITIALIZED;
    }
    return copy_string("550.0.fake", version, length);
}

EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    if (!initialized()) {
        return NVML_ERROR_UNINITIALIZED;
    }
    return copy_string("12.550.0.fake", version, length);
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialized()) {
        return NVML_ERROR_UNINITIALIZED;
    }
    if (count == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *count = gpu_count;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!initialized()) {
        return NVML_ERROR_UNINITIALIZED;
    }
    if (device == NULL || index >= gpu_count) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *device = &devices[index];
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    if (!initialized()) {
        return NVML_ERROR_UNINITIALIZED;
    }
    if (uuid == NULL || device == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    for (unsigned int i = 0; i < gpu_count; i++) {
        char expected[96];
        snprintf(expected, sizeof expected, "GPU-fake-%u-%u", gpu_count, i);
        if (strcmp(uuid, expected) == 0) {
            *device = &devices[i];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    if (!initialized()) {
        return NVML_ERROR_UNINITIALIZED;
    }
    if (check_device(device) == NULL || index == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *index = index_of(device);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    char text[96];
    if (!initialized()) {
        return NVML_ERROR_UNINITIALIZED;
    }
    if (check_device(device) == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    snprintf(text, sizeof text, "Fake GPU %u", index_of(device));
    return copy_string(text, name, length);
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    char text[96];
    if (!initialized()) {
        return NVML_ERROR_UNINITIALIZED;
    }
    if (check_device(device) == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    snprintf(text, sizeof text, "GPU-fake-%u-%u", gpu_count, index_of(device));
    return copy_string(text, uuid, length);
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    if (!initialized()) {
        return NVML_ERROR_UNINITIALIZED;
    }
    if (check_device(device) == NULL || memory == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (memory->version != NVML_MEMORY_V2) {
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    }
    memory->total = MEMORY_TOTAL;
    memory->reserved = MEMORY_RESERVED;
    memory->used = memory_used(device);
    memory->free = MEMORY_TOTAL - MEMORY_RESERVED - memory->used;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    if (!initialized()) {
        return NVML_ERROR_UNINITIALIZED;
    }
    if (check_device(device) == NULL || memory == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    memory->total = MEMORY_TOTAL;
    memory->used = memory_used(device);
    memory->free = MEMORY_TOTAL - memory->used;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device,
                                                  nvmlUtilization_t *utilization) {
    unsigned long calls;
    if (!initialized()) {
        return NVML_ERROR_UNINITIALIZED;
    }
    if (check_device(device) == NULL || utilization == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    calls = __atomic_fetch_add(&device->utilization_calls, 1, __ATOMIC_SEQ_CST);
    utilization->gpu = (unsigned int)((index_of(device) * 10 + calls) % 101);
    utilization->memory = (unsigned int)((index_of(device) * 5 + calls) % 101);
    return NVML_SUCCESS;
}

/* No process ever runs on a fake GPU: report a count of zero. */
EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device,
                                                            unsigned int *count, void *infos) {
    (void)infos;
    if (!initialized()) {
        return NVML_ERROR_UNINITIALIZED;
    }
    if (check_device(device) == NULL || count == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *count = 0;
    return NVML_SUCCESS;
}
