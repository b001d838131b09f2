/* Classifies the images of the host file input.bin (N x C x H x W float32) and writes the
 * logits to logits.bin, both through semihosting. Exit status 0, or 3/4 on an I/O failure. */
#include <stdio.h>

#include "model.h"

static float input[CNNP_INPUT_SIZE];
static float logits[CNNP_OUTPUT_SIZE];

int main(void)
{
    FILE *in = fopen("input.bin", "rb"), *out = fopen("logits.bin", "wb");
    if (!in || !out) return 3;
    while (fread(input, sizeof(float), CNNP_INPUT_SIZE, in) == CNNP_INPUT_SIZE) {
        cnnp_predict(input, logits);
        if (fwrite(logits, sizeof(float), CNNP_OUTPUT_SIZE, out) != CNNP_OUTPUT_SIZE) return 4;
    }
    fclose(out);
    fclose(in);
    return 0;
}
