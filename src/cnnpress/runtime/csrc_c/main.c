/* Reads N float32 inputs (N x C x H x W, normalised, little-endian) from stdin until it
 * ends, writes N x K float32 logits to stdout. Exit status 1 on a short read or write. */
#include <stdio.h>

#include "model.h"

static float input[CNNP_INPUT_SIZE];
static float logits[CNNP_OUTPUT_SIZE];

int main(void)
{
    size_t got;
    for (;;) {
        got = fread(input, sizeof(float), CNNP_INPUT_SIZE, stdin);
        if (got == 0 && feof(stdin)) break;
        if (got != CNNP_INPUT_SIZE) {
            fprintf(stderr, "short input: %lu of %d floats\n", (unsigned long)got,
                    CNNP_INPUT_SIZE);
            return 1;
        }
        if (cnnp_predict(input, logits) != 0) return 1;
        if (fwrite(logits, sizeof(float), CNNP_OUTPUT_SIZE, stdout) != CNNP_OUTPUT_SIZE) return 1;
    }
    return fflush(stdout) == 0 ? 0 : 1;
}
