/* The null model of benchmarks/boards.py: no weights, one value in and out. Built with the
 * harness alone, it measures each board's counter (instructions per tick, the cost of a
 * reading and of the per-operation hook) and the harness's own flash, RAM and stack. */
#ifndef CNNP_MODEL_H
#define CNNP_MODEL_H

#define CNNP_INPUT_SIZE 1
#define CNNP_OUTPUT_SIZE 1

int cnnp_predict(const float *input, float *logits);

#endif
