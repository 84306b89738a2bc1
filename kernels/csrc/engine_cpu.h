/* llama.cpp CPU-backend emulation (engine_cpu.c): activation quantizers and the integer-dot matmul. */
#ifndef MOETRACE_ENGINE_CPU_H
#define MOETRACE_ENGINE_CPU_H

#include <stdint.h>

#include "layouts.h" /* generated from kernels/layouts.py by setup.py */

/* Weight types the matmul takes; the 32-element ones first (MXFP4 among them: Q8_0 activations as
 * the legacy types), K-quants from MT_ENG_Q2_K on. */
enum mt_eng_type { MT_ENG_Q4_0, MT_ENG_Q4_1, MT_ENG_Q5_0, MT_ENG_Q5_1, MT_ENG_Q8_0, MT_ENG_MXFP4,
                   MT_ENG_Q2_K, MT_ENG_Q3_K, MT_ENG_Q4_K, MT_ENG_Q5_K, MT_ENG_Q6_K, MT_ENG_N };

/* n float32 values (a multiple of the block size) -> blocks, bit-exact with quantize_row_*_ref. */
void mt_quantize_q8_0(const float *x, uint8_t *y, int64_t n);
void mt_quantize_q8_1(const float *x, uint8_t *y, int64_t n);
void mt_quantize_q8_k(const float *x, uint8_t *y, int64_t n);

/* out[tok * n_rows + row] = ggml's generic vec_dot of weight row `row` (block bytes at
 * w + row * row_bytes) with token `tok`'s quantized activations (act + tok * act_row_bytes), for
 * rows r0 <= row < r1 and every token. Returns 0, or 1 when memory ran out. */
int mt_engine_matmul(int t, const uint8_t *w, int64_t row_bytes, int64_t r0, int64_t r1, const uint8_t *act,
                     int64_t act_row_bytes, int64_t n_tokens, int64_t n, float *out, int64_t n_rows);

#endif
