/* The instruction counter: QEMU -icount shift=0 advances virtual time 1 ns per instruction,
 * and SysTick counts the processor clock in virtual time, so ticks x (instructions per tick,
 * calibrated by the main) = instructions. SYST_CSR = 7: enable, processor clock, interrupt on
 * each wrap of the 24-bit counter (the handler counts the wraps).
 *
 * As on the hardware (and in QEMU), the counter runs RELOAD, ..., 1, 0 (2^24 ticks a period);
 * the interrupt comes as it reaches 0, so while it reads 0 the handler has already counted the
 * period that is still ending. After ticks_start the counter reads 0 for one tick (-1). */
#include "harness.h"

#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
#define RELOAD 0xFFFFFFu

static volatile uint32_t reloads;

void systick_handler(void)
{
    reloads++;
}

void ticks_start(void)
{
    SYST_RVR = RELOAD;
    SYST_CVR = 0;
    SYST_CSR = 7u;
}

uint32_t ticks_now(void)
{
    uint32_t hi, now;
    do { /* a wrap between the two reads: read again */
        hi = reloads;
        now = SYST_CVR;
    } while (hi != reloads);
    if (now == 0) hi--; /* the last tick of period hi - 1 */
    return (hi << 24) + (RELOAD - now);
}
