/* moetrace's compiled block kernels: the interface between the Python module (module.c) and the
 * per-family kernel files. Each kernel file defines one mt_register_* function that fills in the
 * table entries of the types it implements; module.c dispatches by type and releases the GIL.
 *
 * Every kernel is bit-exact with ggml (see common.h for the float rules that makes it so). */
#ifndef MOETRACE_CKERNELS_H
#define MOETRACE_CKERNELS_H

#include <stdint.h>

enum mt_type {
    MT_Q4_0, MT_Q4_1, MT_Q5_0, MT_Q5_1, MT_Q8_0,
    MT_Q2_K, MT_Q3_K, MT_Q4_K, MT_Q5_K, MT_Q6_K,
    MT_N_TYPES
};

/* Quantize n_rows rows of n_per_row float32 values (row-major, contiguous) into GGUF block bytes,
 * the rows' bytes back to back. imatrix is NULL (ggml's quantize_row_*_ref path) or n_per_row
 * importance weights, one per column (ggml's quantize_row_*_impl path). n_per_row is a multiple
 * of the block size (checked by the caller). Returns 0, or nonzero when memory ran out. */
typedef int (*mt_quantize_fn)(const float *x, uint8_t *y, int64_t n_rows, int64_t n_per_row,
                              const float *imatrix);

/* Dequantize n_blocks consecutive blocks into n_blocks * block_size float32 values. */
typedef void (*mt_dequantize_fn)(const uint8_t *q, float *y, int64_t n_blocks);

typedef struct {
    mt_quantize_fn quantize[MT_N_TYPES];
    mt_dequantize_fn dequantize[MT_N_TYPES];
} mt_kernel_table;

/* One per kernel file. */
void mt_register_kquant_qkx(mt_kernel_table *t);  /* quant_kquant_qkx.c: Q2_K, Q4_K, Q5_K quantize */
void mt_register_qx(mt_kernel_table *t);          /* quant_qx.c: Q3_K, Q6_K and Q4_0..Q8_0 quantize */
void mt_register_dequant(mt_kernel_table *t);     /* dequant.c: dequantize, every type */

#endif
