/* llama.cpp CUDA-backend emulation on the CPU (engine_cuda.c): q8_1 activations and the MMQ/MMVQ dots. */
#ifndef MOETRACE_ENGINE_CUDA_H
#define MOETRACE_ENGINE_CUDA_H

#include <stdint.h>

#include "engine_cpu.h" /* enum mt_eng_type: the weight types */

enum mt_cuda_kernel { MT_CUDA_MMVQ, MT_CUDA_MMQ };

/* Whether MMQ keeps half2(d, sum) per 32 activations for weights of type t (DS4), else a float d (D4). */
int mt_cuda_ds4(int t);

/* Block sums kept per 32 activations: 2 (per 16 values) for Q2_K's MMQ layout D2S6, else 1. */
int mt_cuda_sums_per_block(int t, int kernel);

/* n float32 activations (a multiple of 32) -> per 32-value block: qs[32] int8 codes, d the scale as the
 * dots read it and s the fp16-rounded block sum (0 where the layout keeps none), as quantize_q8_1
 * (MMVQ) or quantize_mmq_q8_1 (MMQ, layout by weight type t) store them; s holds
 * mt_cuda_sums_per_block values per block. */
void mt_cuda_quantize(const float *x, int64_t n, int kernel, int t, int8_t *qs, float *d, float *s);

/* out[tok * n_rows + row] = the kernel's result for weight row `row` (block bytes at w + row * row_bytes)
 * with token tok's q8_1 activations (qs + tok * n, d + tok * n / 32, s + tok * n / 32 * sums per block),
 * rows r0 <= row < r1.
 * Returns 0, 1 when memory ran out, 2 for a type the kernel is not emulated for. */
int mt_cuda_matmul(int t, int kernel, const uint8_t *w, int64_t row_bytes, int64_t r0, int64_t r1, const int8_t *qs,
                   const float *d, const float *s, int64_t n_tokens, int64_t n, float *out, int64_t n_rows);

#endif
