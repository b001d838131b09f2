/* What the start-up, the counter and the main of benchmarks/boards.py share. */
#ifndef BOARDS_HARNESS_H
#define BOARDS_HARNESS_H

#include <stdint.h>

/* Every word of the stack reservation holds this before main runs; the deepest word that no
 * longer does is the stack's high-water mark. */
#define STACK_PAINT 0xC5AC5AC5u

extern uint32_t _sstack, _estack;

/* Semihosting (QEMU -semihosting-config enable=on): a file of the host's working folder. */
int sh_open(const char *name, int mode); /* mode 1: "rb", 5: "wb"; -1 on failure */
int sh_read(int fd, void *buf, uint32_t len); /* bytes not read */
int sh_write(int fd, const void *buf, uint32_t len); /* bytes not written */
void sh_close(int fd);
void sh_exit(int status) __attribute__((noreturn));

/* SysTick on the processor clock, its 24-bit wraps counted by its interrupt: ticks since
 * ticks_start, modulo 2^32 (a difference of two readings is exact below 2^32 ticks). */
void ticks_start(void);
uint32_t ticks_now(void);

#endif
