/* Semihosting calls (ARM "bkpt 0xab"): open, read, write, close and exit with a status, with
 * no stdio and no heap. */
#include "harness.h"

#include <string.h>

static int semihost(int op, void *arg)
{
    register int r0 __asm("r0") = op;
    register void *r1 __asm("r1") = arg;
    __asm volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

int sh_open(const char *name, int mode)
{
    uint32_t arg[3] = {(uint32_t)name, (uint32_t)mode, (uint32_t)strlen(name)};
    return semihost(0x01, arg);
}

void sh_close(int fd)
{
    uint32_t arg[1] = {(uint32_t)fd};
    semihost(0x02, arg);
}

int sh_write(int fd, const void *buf, uint32_t len)
{
    uint32_t arg[3] = {(uint32_t)fd, (uint32_t)buf, len};
    return semihost(0x05, arg);
}

int sh_read(int fd, void *buf, uint32_t len)
{
    uint32_t arg[3] = {(uint32_t)fd, (uint32_t)buf, len};
    return semihost(0x06, arg);
}

void sh_exit(int status)
{
    /* SYS_EXIT_EXTENDED: ADP_Stopped_ApplicationExit with the status QEMU exits with */
    uint32_t arg[2] = {0x20026u, (uint32_t)status};
    for (;;) semihost(0x20, arg);
}
