/* Cortex-M3 start-up for QEMU's mps2-an385 (benchmarks/cortex_m3.py): a vector table whose
 * faults exit through semihosting, and a reset handler that copies .data to RAM, zeroes
 * .bss, opens the semihosting streams and runs main. */
#include <stdint.h>
#include <stdlib.h>

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
extern int main(void);
extern void initialise_monitor_handles(void);

void reset_handler(void);
void fault_handler(void);

void reset_handler(void)
{
    uint32_t *src = &_sidata, *dst = &_sdata;
    while (dst < &_edata) *dst++ = *src++;
    for (dst = &_sbss; dst < &_ebss;) *dst++ = 0;
    initialise_monitor_handles();
    exit(main());
}

void fault_handler(void)
{
    exit(90); /* a fault: QEMU ends with a status that says so */
}

__attribute__((section(".vectors"), used)) const uint32_t vectors[16] = {
    (uint32_t)&_estack,        (uint32_t)reset_handler, (uint32_t)fault_handler,
    (uint32_t)fault_handler,   (uint32_t)fault_handler, (uint32_t)fault_handler,
    (uint32_t)fault_handler,   0, 0, 0, 0,
    (uint32_t)fault_handler,   (uint32_t)fault_handler, 0,
    (uint32_t)fault_handler,   (uint32_t)fault_handler,
};
