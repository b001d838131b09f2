/* Force-included (-include profile.h) when benchmarks/boards.py builds a program with the
 * per-operation counter: model.c calls cnnp_after(i) after operation i of cnnp_predict. */
#ifndef BOARDS_PROFILE_H
#define BOARDS_PROFILE_H

#define CNNP_AFTER_OP(i) cnnp_after(i)
void cnnp_after(int op);

#endif
