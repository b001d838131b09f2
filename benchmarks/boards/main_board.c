/* Classifies the images of the host file input.bin (N x C x H x W float32) through
 * semihosting, writes the logits to logits.bin and the SysTick counts to counts.bin, both
 * uint32 little-endian words:
 *   header  ops, SPIN_SHORT, SPIN_LONG, ticks of spin(SPIN_SHORT), of spin(SPIN_LONG),
 *           calls timed, ticks of that many cnnp_after calls, of that many ticks_now calls;
 *   then per image  ticks of cnnp_predict, and per operation the ticks from the previous
 *           counter reading to the one after it (CNNP_OPS words; none without the hook);
 *   trailer stack bytes used (high-water mark of the painted reservation), bytes reserved.
 * spin(n) executes 2n instructions, so the two spins give the instructions per tick; the
 * timed calls give the counter's own cost. Exit status 0, or 3/4 on an I/O failure. */
#include <string.h>

#include "harness.h"
#include "model.h"

#ifndef CNNP_OPS
#define CNNP_OPS 0 /* built without the per-operation hook */
#endif
#define SPIN_SHORT 100000u
#define SPIN_LONG 20100000u
#define CALLS 512u

static float input[CNNP_INPUT_SIZE];
static float logits[CNNP_OUTPUT_SIZE];

#if CNNP_OPS > 0
static uint32_t op_ticks[CNNP_OPS], last;

__attribute__((noinline)) void cnnp_after(int op)
{
    uint32_t now = ticks_now();
    op_ticks[op] += now - last;
    last = now;
}
#endif

/* 2n instructions (GCC gives inline assembly in divided syntax: this loop is unified). */
static __attribute__((noinline)) void spin(uint32_t n)
{
    __asm volatile(".syntax unified\n1:\n\tsubs %0, %0, #1\n\tbne 1b\n\t.syntax divided"
                   : "+l"(n)
                   :
                   : "cc");
}

static uint32_t spin_ticks(uint32_t n)
{
    uint32_t t = ticks_now();
    spin(n);
    return ticks_now() - t;
}

#define EIGHT(call) call; call; call; call; call; call; call; call
static uint32_t hook_ticks(void)
{
    uint32_t k, t = ticks_now();
    for (k = 0; k < CALLS / 16u; k++) {
#if CNNP_OPS > 0
        EIGHT(cnnp_after(0));
        EIGHT(cnnp_after(0));
#endif
    }
    t = ticks_now() - t;
#if CNNP_OPS > 0
    memset(op_ticks, 0, sizeof op_ticks);
#endif
    return t;
}

static uint32_t read_ticks(void)
{
    volatile uint32_t sink = 0;
    uint32_t k, t = ticks_now();
    for (k = 0; k < CALLS / 16u; k++) {
        EIGHT(sink += ticks_now());
        EIGHT(sink += ticks_now());
    }
    return ticks_now() - t;
}

static uint32_t stack_used(void)
{
    const uint32_t *p = &_sstack;
    while (p < &_estack && *p == STACK_PAINT) p++;
    return (uint32_t)((const char *)&_estack - (const char *)p);
}

static int put(int fd, const uint32_t *words, uint32_t n)
{
    return n == 0 || sh_write(fd, words, 4u * n) == 0;
}

int main(void)
{
    int in = sh_open("input.bin", 1), out = sh_open("logits.bin", 5);
    int counts = sh_open("counts.bin", 5);
    uint32_t head[8], tail[2], t;
    if (in < 0 || out < 0 || counts < 0) return 3;
    ticks_start();
    head[0] = CNNP_OPS;
    head[1] = SPIN_SHORT;
    head[2] = SPIN_LONG;
    head[3] = spin_ticks(SPIN_SHORT);
    head[4] = spin_ticks(SPIN_LONG);
    head[5] = CALLS;
    head[6] = hook_ticks();
    head[7] = read_ticks();
    if (!put(counts, head, 8)) return 4;
    while (sh_read(in, input, sizeof input) == 0) {
        t = ticks_now();
#if CNNP_OPS > 0
        last = t;
#endif
        cnnp_predict(input, logits);
        t = ticks_now() - t;
        if (sh_write(out, logits, sizeof logits) != 0 || !put(counts, &t, 1)) return 4;
#if CNNP_OPS > 0
        if (!put(counts, op_ticks, CNNP_OPS)) return 4;
        memset(op_ticks, 0, sizeof op_ticks);
#endif
    }
    tail[0] = stack_used();
    tail[1] = (uint32_t)((const char *)&_estack - (const char *)&_sstack);
    if (!put(counts, tail, 2)) return 4;
    sh_close(counts);
    sh_close(out);
    sh_close(in);
    return 0;
}
