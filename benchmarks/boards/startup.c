/* Start-up of the boards of benchmarks/boards.py: a vector table (faults exit with status 90,
 * SysTick at index 15), and a reset handler that copies .data to RAM, zeroes .bss, paints the
 * stack reservation below its own frame, enables the FPU of a hard-float build and runs main. */
#include "harness.h"

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss;
extern int main(void);

void reset_handler(void);
void fault_handler(void);
void systick_handler(void);

void reset_handler(void)
{
    uint32_t *src = &_sidata, *dst = &_sdata, *sp;
    while (dst < &_edata) *dst++ = *src++;
    for (dst = &_sbss; dst < &_ebss;) *dst++ = 0;
    __asm volatile("mov %0, sp" : "=r"(sp));
    for (dst = &_sstack; dst < sp;) *dst++ = STACK_PAINT;
#if defined(__ARM_FP) && !defined(__SOFTFP__)
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20; /* CPACR: CP10 and CP11 full access */
    __asm volatile("dsb\n\tisb");
#endif
    sh_exit(main());
}

void fault_handler(void)
{
    sh_exit(90);
}

__attribute__((section(".vectors"), used)) const uint32_t vectors[16] = {
    (uint32_t)&_estack,      (uint32_t)reset_handler, (uint32_t)fault_handler,
    (uint32_t)fault_handler, (uint32_t)fault_handler, (uint32_t)fault_handler,
    (uint32_t)fault_handler, 0, 0, 0, 0,
    (uint32_t)fault_handler, (uint32_t)fault_handler, 0,
    (uint32_t)fault_handler, (uint32_t)systick_handler,
};
