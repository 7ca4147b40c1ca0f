/*
 * A libnvidia-ml.so.1 that cannot be loaded: it needs a symbol no library defines, and is
 * linked with -z now, so dlopen() fails the way it does for a broken or absent driver.
 * Found first on LD_LIBRARY_PATH, it hides any real NVML the host may have, so a test sees
 * "no NVML" on every machine.
 *
 *   gcc -shared -fPIC -Wl,-z,now -o DIR/libnvidia-ml.so.1 unloadable_nvml.c
 */
int fake_nvml_symbol_defined_nowhere(void);

int nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    return fake_nvml_symbol_defined_nowhere();
}
