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
 *
 * Running processes: FAKE_NVML_PROCESSES=<path> names a text file, re-read at every call,
 * one process per line (blank lines and lines starting with # are skipped):
 *
 *     GPU_INDEX PID USED_BYTES SM_UTIL [KINDS]
 *
 * SM_UTIL is a percent, or "-" for no utilization sample of that process; KINDS is C
 * (compute, the default), G (graphics) or CG (both lists). They are answered by
 * nvmlDeviceGet{Compute,Graphics}RunningProcesses_v{2,3} (the count protocol: a NULL
 * array or a too small *count answers INSUFFICIENT_SIZE with the count needed) and
 * nvmlDeviceGetProcessUtilization (one sample per process with an SM_UTIL, stamped 0.1 s
 * ago; no sample newer than lastSeenTimeStamp answers NOT_FOUND). Processes on a MIG
 * device's own handle: none. gpuInstanceId/computeInstanceId are "not available".
 * FAKE_NVML_NO_PROCESS_UTILIZATION=<indexes>, e.g. "0" or "0,1": those GPUs answer
 * NOT_SUPPORTED for per-process utilization.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

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

/* nvmlProcessInfo_v2_t; _v3 has the same layout. */
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil;
    unsigned int memUtil;
    unsigned int encUtil;
    unsigned int decUtil;
} nvmlProcessUtilizationSample_t;

#define NVML_VALUE_NOT_AVAILABLE_UINT 0xFFFFFFFFu

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

/* -- running processes, from $FAKE_NVML_PROCESSES ------------------------------------ */

#define MAX_PROCESSES 256

struct fake_process {
    unsigned int gpu;
    unsigned int pid;
    unsigned long long used;
    int sm_util; /* -1: no sample */
    int compute;
    int graphics;
};

static int gpu_index_of(nvmlDevice_t device)
{
    return device == &gpus[0] ? 0 : device == &gpus[1] ? 1 : -1; /* -1: a MIG device */
}

/* The processes of the file's lines for GPU `gpu`; how many (at most `max`). */
static unsigned int read_processes(int gpu, struct fake_process *out, unsigned int max)
{
    const char *path = getenv("FAKE_NVML_PROCESSES");
    if (path == NULL || *path == '\0' || gpu < 0)
        return 0;
    FILE *file = fopen(path, "r");
    if (file == NULL)
        return 0;
    char line[512];
    unsigned int n = 0;
    while (n < max && fgets(line, sizeof line, file) != NULL) {
        unsigned int index, pid;
        unsigned long long used;
        char util[32], kinds[32] = "C";
        if (line[0] == '#')
            continue;
        int fields = sscanf(line, "%u %u %llu %31s %31s", &index, &pid, &used, util, kinds);
        if (fields < 4 || (int)index != gpu)
            continue;
        out[n].gpu = index;
        out[n].pid = pid;
        out[n].used = used;
        out[n].sm_util = strcmp(util, "-") == 0 ? -1 : atoi(util);
        out[n].compute = strchr(kinds, 'C') != NULL;
        out[n].graphics = strchr(kinds, 'G') != NULL;
        n++;
    }
    fclose(file);
    return n;
}

static nvmlReturn_t running_processes(nvmlDevice_t device, int graphics, unsigned int *count,
                                      nvmlProcessInfo_t *infos)
{
    nvmlReturn_t ret = check(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (count == NULL || (infos == NULL && *count != 0))
        return NVML_ERROR_INVALID_ARGUMENT;
    struct fake_process all[MAX_PROCESSES]; /* on the stack: callers may be threads */
    unsigned int read = read_processes(gpu_index_of(device), all, MAX_PROCESSES);
    unsigned int needed = 0;
    for (unsigned int i = 0; i < read; i++)
        if (graphics ? all[i].graphics : all[i].compute)
            needed++;
    if (needed == 0) {
        *count = 0;
        return NVML_SUCCESS;
    }
    if (infos == NULL || *count < needed) {
        *count = needed;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    unsigned int n = 0;
    for (unsigned int i = 0; i < read; i++) {
        if (!(graphics ? all[i].graphics : all[i].compute))
            continue;
        infos[n].pid = all[i].pid;
        infos[n].usedGpuMemory = all[i].used;
        infos[n].gpuInstanceId = NVML_VALUE_NOT_AVAILABLE_UINT;
        infos[n].computeInstanceId = NVML_VALUE_NOT_AVAILABLE_UINT;
        n++;
    }
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                     nvmlProcessInfo_t *infos)
{
    return running_processes(device, 0, count, infos);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *count,
                                                     nvmlProcessInfo_t *infos)
{
    return running_processes(device, 0, count, infos);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                      nvmlProcessInfo_t *infos)
{
    return running_processes(device, 1, count, infos);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(nvmlDevice_t device, unsigned int *count,
                                                      nvmlProcessInfo_t *infos)
{
    return running_processes(device, 1, count, infos);
}

static int process_utilization_unsupported(int gpu)
{
    const char *list = getenv("FAKE_NVML_NO_PROCESS_UTILIZATION");
    if (gpu < 0)
        return 1; /* MIG devices: not per-process */
    if (list == NULL)
        return 0;
    for (const char *p = list; *p != '\0';) {
        char *end;
        long index = strtol(p, &end, 10);
        if (end == p) {
            p++;
            continue;
        }
        if (index == gpu)
            return 1;
        p = end;
    }
    return 0;
}

nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device,
                                             nvmlProcessUtilizationSample_t *utilization,
                                             unsigned int *processSamplesCount,
                                             unsigned long long lastSeenTimeStamp)
{
    nvmlReturn_t ret = check(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (processSamplesCount == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    int gpu = gpu_index_of(device);
    if (process_utilization_unsupported(gpu))
        return NVML_ERROR_NOT_SUPPORTED;
    struct timeval now;
    gettimeofday(&now, NULL);
    unsigned long long stamp = (unsigned long long)now.tv_sec * 1000000ULL + now.tv_usec - 100000ULL;
    struct fake_process all[MAX_PROCESSES]; /* on the stack: callers may be threads */
    unsigned int read = read_processes(gpu, all, MAX_PROCESSES);
    unsigned int needed = 0;
    for (unsigned int i = 0; i < read; i++)
        if (all[i].sm_util >= 0 && stamp > lastSeenTimeStamp)
            needed++;
    if (needed == 0)
        return NVML_ERROR_NOT_FOUND;
    if (utilization == NULL || *processSamplesCount < needed) {
        *processSamplesCount = needed;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    unsigned int n = 0;
    for (unsigned int i = 0; i < read; i++) {
        if (all[i].sm_util < 0 || stamp <= lastSeenTimeStamp)
            continue;
        utilization[n].pid = all[i].pid;
        utilization[n].timeStamp = stamp;
        utilization[n].smUtil = (unsigned int)all[i].sm_util;
        utilization[n].memUtil = 0;
        utilization[n].encUtil = 0;
        utilization[n].decUtil = 0;
        n++;
    }
    *processSamplesCount = n;
    return NVML_SUCCESS;
}
