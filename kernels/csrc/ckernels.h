/* moetrace's compiled block kernels: the interface between the Python module (module.c) and the
 * per-family kernel files. Each kernel file defines one mt_register_* function that fills in the
 * table entries of the types it implements; module.c dispatches by type and releases the GIL.
 *
 * Every kernel is bit-exact with ggml (see common.h for the float rules that makes it so). */
#ifndef MOETRACE_CKERNELS_H
#define MOETRACE_CKERNELS_H

#include <stdint.h>

#include "layouts.h" /* generated from kernels/layouts.py by setup.py */

enum mt_type {
    MT_Q4_0, MT_Q4_1, MT_Q5_0, MT_Q5_1, MT_Q8_0,
    MT_Q2_K, MT_Q3_K, MT_Q4_K, MT_Q5_K, MT_Q6_K,
    MT_MXFP4,
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

/* The compiled searches, each with a portable build and (on x86-64 with gcc) an AVX2 build that
 * performs the same float operations, so the bytes never depend on which one runs. */
enum mt_search {
    MT_SEARCH_QKX,        /* make_qkx2/qkx3_quants + make_qp_quants: Q2_K, Q4_K, Q5_K */
    MT_SEARCH_QX,         /* make_qx_quants sums: Q3_K, Q6_K, legacy imatrix paths */
    MT_SEARCH_QKX3,       /* make_qkx3_quants with ggml's signed zero min: Q4_1, Q5_1 imatrix paths */
    MT_SEARCH_LEGACY_REF, /* quantize_row_q{4,5}_{0,1}_ref, quantize_row_q8_0_ref */
    MT_N_SEARCHES
};

/* The name a search reports when its portable build runs (SSE2 is part of x86-64). */
#if defined(__SSE2__)
#define MT_PORTABLE_IMPL "sse2"
#else
#define MT_PORTABLE_IMPL "generic"
#endif

typedef struct {
    mt_quantize_fn quantize[MT_N_TYPES];
    mt_dequantize_fn dequantize[MT_N_TYPES];
    const char *search_impl[MT_N_SEARCHES]; /* "avx2" or MT_PORTABLE_IMPL: which build each search runs */
} mt_kernel_table;

/* One per kernel file. use_avx2 is decided once, in module init (the CPU has AVX2 and
 * MOETRACE_NO_AVX2 is not set); a file without an AVX2 build ignores it. */
void mt_register_kquant_qkx(mt_kernel_table *t, int use_avx2); /* quant_kquant_qkx.c: Q2_K, Q4_K, Q5_K quantize */
void mt_register_qx(mt_kernel_table *t, int use_avx2);         /* quant_qx.c: Q3_K, Q6_K and Q4_0..Q8_0 quantize */
void mt_register_dequant(mt_kernel_table *t);                  /* dequant.c: dequantize, the GGUF integer types */
void mt_register_mxfp4(mt_kernel_table *t);                    /* quant_mxfp4.c: MXFP4 quantize and dequantize */

#endif
