/*
 * A fake libnvidia-ml.so.1 for tests: exactly the NVML entry points nvidia-ml-py (pynvml)
 * calls for jupyter_gpu_sessions.devices.inventory.NvmlInventory, with fixed answers.
 *
 *   gcc -shared -fPIC -o DIR/libnvidia-ml.so.1 fake_nvml.c
 *
 * GPU 0: "NVIDIA A10", 24 GiB, minor 0. Not MIG-capable (nvmlDeviceGetMigMode says
 *        NOT_SUPPORTED), and nvmlDeviceGetUtilizationRates says NOT_SUPPORTED too.
 * GPU 1: "NVIDIA A100-SXM4-80GB", 80 GiB, minor 3. MIG mode currently enabled (pending:
 *        disabled), 7 MIG slots: slot 0 a 1g.10gb instance, slot 2 a 3g.40gb instance,
 *        every other slot empty (NOT_FOUND). Utilization 42 % GPU, 17 % memory.
 * Driver version "550.54.15".
 *
 * FAKE_NVML_INIT_RESULT=<code> makes nvmlInitWithFlags fail with that NVML code (e.g. 9,
 * DRIVER_NOT_LOADED). Every device call before init or after the last shutdown answers
 * UNINITIALIZED, like the real library.
 */
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_UNKNOWN = 999,
};

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

#define MIB (1024ULL * 1024ULL)
#define MIG_SLOTS 7

struct fake_device {
    const char *uuid;
    const char *name;
    unsigned long long total;
    unsigned long long used;
    int minor;             /* -1: not a physical GPU (a MIG device) */
    int utilization_gpu;   /* -1: NOT_SUPPORTED */
    int utilization_memory;
    int mig_mode;          /* -1: NOT_SUPPORTED, else the current mode */
    int mig_pending;
    struct fake_device *mig[MIG_SLOTS];
};
typedef struct fake_device *nvmlDevice_t;

static struct fake_device mig_1g = {
    "MIG-5c1e2a3b-0000-4000-8000-000000000001", "NVIDIA A100-SXM4-80GB MIG 1g.10gb",
    9984 * MIB, 13 * MIB, -1, -1, -1, -1, 0, {0},
};
static struct fake_device mig_3g = {
    "MIG-5c1e2a3b-0000-4000-8000-000000000003", "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
    40192 * MIB, 37 * MIB, -1, -1, -1, -1, 0, {0},
};
static struct fake_device gpus[2] = {
    {"GPU-0a0a0a0a-1111-4222-8333-444444444444", "NVIDIA A10", 24576 * MIB, 1024 * MIB,
     0, -1, -1, -1, 0, {0}},
    {"GPU-1b1b1b1b-5555-4666-8777-888888888888", "NVIDIA A100-SXM4-80GB", 81920 * MIB,
     512 * MIB, 3, 42, 17, 1, 0, {&mig_1g, 0, &mig_3g, 0, 0, 0, 0}},
};

static int init_count = 0;

static int known(nvmlDevice_t device)
{
    return device == &gpus[0] || device == &gpus[1] || device == &mig_1g || device == &mig_3g;
}

static nvmlReturn_t check(nvmlDevice_t device)
{
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    return known(device) ? NVML_SUCCESS : NVML_ERROR_INVALID_ARGUMENT;
}

static nvmlReturn_t copy_string(const char *value, char *buffer, unsigned int length)
{
    if (buffer == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(value) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(buffer, value);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    const char *forced = getenv("FAKE_NVML_INIT_RESULT");
    if (forced != NULL && atoi(forced) != NVML_SUCCESS)
        return atoi(forced);
    init_count++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void)
{
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    init_count--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    return copy_string("550.54.15", version, length);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (count == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = 2;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (device == NULL || index >= 2)
        return NVML_ERROR_INVALID_ARGUMENT;
    *device = &gpus[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    nvmlReturn_t ret = check(device);
    return ret != NVML_SUCCESS ? ret : copy_string(device->uuid, uuid, length);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    nvmlReturn_t ret = check(device);
    return ret != NVML_SUCCESS ? ret : copy_string(device->name, name, length);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    nvmlReturn_t ret = check(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (memory == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    memory->total = device->total;
    memory->used = device->used;
    memory->free = device->total - device->used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor)
{
    nvmlReturn_t ret = check(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (minor == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->minor < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    *minor = (unsigned int)device->minor;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization)
{
    nvmlReturn_t ret = check(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (utilization == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->utilization_gpu < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    utilization->gpu = (unsigned int)device->utilization_gpu;
    utilization->memory = (unsigned int)device->utilization_memory;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending)
{
    nvmlReturn_t ret = check(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (current == NULL || pending == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->mig_mode < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    *current = (unsigned int)device->mig_mode;
    *pending = (unsigned int)device->mig_pending;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count)
{
    nvmlReturn_t ret = check(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (count == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->mig_mode < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    *count = MIG_SLOTS;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index,
                                                 nvmlDevice_t *mig)
{
    nvmlReturn_t ret = check(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (mig == NULL || index >= MIG_SLOTS)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->mig_mode != 1)
        return NVML_ERROR_NOT_SUPPORTED;
    if (device->mig[index] == NULL)
        return NVML_ERROR_NOT_FOUND;
    *mig = device->mig[index];
    return NVML_SUCCESS;
}
