/* The Python module moetrace.kernels._cengine: llama.cpp CPU-backend emulation (engine_cpu.c) on
 * caller-owned buffers, the GIL released so moetrace.kernels.matmul can run row ranges on several
 * threads. Shapes and dtypes are checked by the caller; here only buffer sizes are. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "engine_cpu.h"
#include "engine_cuda.h"

static const char *const eng_names[MT_ENG_N] = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4",
                                                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"};

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t need, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    if (view->len < need) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, %zd needed", what, view->len, need);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(quantize_act_doc,
"quantize_act(type_name, src, dst, n)\n\n"
"Quantize n float32 values from buffer src to Q8_0, Q8_1 or Q8_K blocks in dst (quantize_row_*_ref).");

static PyObject *py_quantize_act(PyObject *self, PyObject *args) {
    const char *name;
    PyObject *src_o, *dst_o;
    long long n;
    if (!PyArg_ParseTuple(args, "sOOL", &name, &src_o, &dst_o, &n)) return NULL;
    void (*fn)(const float *, uint8_t *, int64_t) = NULL;
    int block = 0, bytes = 0;
    if (!strcmp(name, "Q8_0")) fn = mt_quantize_q8_0, block = MT_Q8_0_ELEMS, bytes = MT_Q8_0_BYTES;
    else if (!strcmp(name, "Q8_1")) fn = mt_quantize_q8_1, block = MT_Q8_1_ELEMS, bytes = MT_Q8_1_BYTES;
    else if (!strcmp(name, "Q8_K")) fn = mt_quantize_q8_k, block = MT_Q8_K_ELEMS, bytes = MT_Q8_K_BYTES;
    else return PyErr_Format(PyExc_ValueError, "no activation quantizer for %s", name);
    if (n < 0 || n % block) return PyErr_Format(PyExc_ValueError, "%s: %lld values are not whole blocks", name, n);
    Py_buffer src, dst;
    if (get_buffer(src_o, &src, 0, (Py_ssize_t)(n * 4), "src") < 0) return NULL;
    if (get_buffer(dst_o, &dst, 1, (Py_ssize_t)(n / block * bytes), "dst") < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    fn((const float *)src.buf, (uint8_t *)dst.buf, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(matmul_doc,
"matmul(type_name, w, row_bytes, r0, r1, act, act_row_bytes, n_tokens, n, out, n_rows)\n\n"
"out[t, r] (float32, (n_tokens, n_rows)) = ggml's generic vec_dot of weight row r with token t's\n"
"quantized activations, for rows r0 <= r < r1.");

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    const char *name;
    PyObject *w_o, *act_o, *out_o;
    long long row_bytes, r0, r1, act_row_bytes, n_tokens, n, n_rows;
    if (!PyArg_ParseTuple(args, "sOLLLOLLLOL", &name, &w_o, &row_bytes, &r0, &r1, &act_o, &act_row_bytes, &n_tokens,
                          &n, &out_o, &n_rows))
        return NULL;
    int t = -1;
    for (int i = 0; i < MT_ENG_N; i++)
        if (!strcmp(eng_names[i], name)) t = i;
    if (t < 0) return PyErr_Format(PyExc_ValueError, "no compiled integer-dot matmul for %s", name);
    if (r0 < 0 || r1 < r0 || r1 > n_rows || n_tokens < 0 || n <= 0 || n % (t >= MT_ENG_Q2_K ? MT_QK_K : MT_QK))
        return PyErr_Format(PyExc_ValueError, "%s: bad matmul shape", name);
    Py_buffer w, act, out;
    if (get_buffer(w_o, &w, 0, (Py_ssize_t)(n_rows * row_bytes), "w") < 0) return NULL;
    if (get_buffer(act_o, &act, 0, (Py_ssize_t)(n_tokens * act_row_bytes), "act") < 0) {
        PyBuffer_Release(&w);
        return NULL;
    }
    if (get_buffer(out_o, &out, 1, (Py_ssize_t)(n_tokens * n_rows * 4), "out") < 0) {
        PyBuffer_Release(&w);
        PyBuffer_Release(&act);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mt_engine_matmul(t, (const uint8_t *)w.buf, row_bytes, r0, r1, (const uint8_t *)act.buf, act_row_bytes,
                          n_tokens, n, (float *)out.buf, n_rows);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&w);
    PyBuffer_Release(&act);
    PyBuffer_Release(&out);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static int eng_type(const char *name) {
    for (int i = 0; i < MT_ENG_N; i++)
        if (!strcmp(eng_names[i], name)) return i;
    return -1;
}

static int cuda_kernel(const char *name) {
    return !strcmp(name, "mmvq") ? MT_CUDA_MMVQ : !strcmp(name, "mmq") ? MT_CUDA_MMQ : -1;
}

PyDoc_STRVAR(cuda_quantize_doc,
"cuda_quantize(type_name, kernel, src, qs, d, s, n)\n\n"
"n float32 values from src -> q8_1 blocks as llama.cpp's CUDA kernel ('mmq' or 'mmvq') keeps them for\n"
"weights of type_name: qs (n) int8 codes, d (n/32) float32 scales and s the fp16-rounded sums (n/32; n/16\n"
"for Q2_K's MMQ layout, one per 16 values).");

static PyObject *py_cuda_quantize(PyObject *self, PyObject *args) {
    const char *name, *kname;
    PyObject *src_o, *qs_o, *d_o, *s_o;
    long long n;
    if (!PyArg_ParseTuple(args, "ssOOOOL", &name, &kname, &src_o, &qs_o, &d_o, &s_o, &n)) return NULL;
    const int t = eng_type(name), k = cuda_kernel(kname);
    if (t < 0 || k < 0) return PyErr_Format(PyExc_ValueError, "no CUDA q8_1 quantizer for %s, %s", name, kname);
    if (n < 0 || n % (t == MT_ENG_Q2_K ? 128 : MT_QK))
        return PyErr_Format(PyExc_ValueError, "%lld values are not whole activation blocks for %s", n, name);
    Py_buffer src, qs, d, s;
    if (get_buffer(src_o, &src, 0, (Py_ssize_t)(n * 4), "src") < 0) return NULL;
    if (get_buffer(qs_o, &qs, 1, (Py_ssize_t)n, "qs") < 0) goto fail_src;
    if (get_buffer(d_o, &d, 1, (Py_ssize_t)(n / MT_QK * 4), "d") < 0) goto fail_qs;
    if (get_buffer(s_o, &s, 1, (Py_ssize_t)(n / MT_QK * 4 * mt_cuda_sums_per_block(t, k)), "s") < 0) goto fail_d;
    Py_BEGIN_ALLOW_THREADS
    mt_cuda_quantize((const float *)src.buf, n, k, t, (int8_t *)qs.buf, (float *)d.buf, (float *)s.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&s);
    PyBuffer_Release(&d);
    PyBuffer_Release(&qs);
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
fail_d:
    PyBuffer_Release(&d);
fail_qs:
    PyBuffer_Release(&qs);
fail_src:
    PyBuffer_Release(&src);
    return NULL;
}

PyDoc_STRVAR(cuda_matmul_doc,
"cuda_matmul(type_name, kernel, w, row_bytes, r0, r1, qs, d, s, n_tokens, n, out, n_rows)\n\n"
"out[t, r] (float32, (n_tokens, n_rows)) = llama.cpp's CUDA kernel's ('mmq' or 'mmvq') result for weight\n"
"row r and token t's q8_1 activations (cuda_quantize), for rows r0 <= r < r1.");

static PyObject *py_cuda_matmul(PyObject *self, PyObject *args) {
    const char *name, *kname;
    PyObject *w_o, *qs_o, *d_o, *s_o, *out_o;
    long long row_bytes, r0, r1, n_tokens, n, n_rows;
    if (!PyArg_ParseTuple(args, "ssOLLLOOOLLOL", &name, &kname, &w_o, &row_bytes, &r0, &r1, &qs_o, &d_o, &s_o,
                          &n_tokens, &n, &out_o, &n_rows))
        return NULL;
    const int t = eng_type(name), k = cuda_kernel(kname);
    if (t < 0 || k < 0) return PyErr_Format(PyExc_ValueError, "no CUDA integer-dot matmul for %s, %s", name, kname);
    if (r0 < 0 || r1 < r0 || r1 > n_rows || n_tokens < 0 || n <= 0 || n % (t >= MT_ENG_Q2_K ? MT_QK_K : MT_QK))
        return PyErr_Format(PyExc_ValueError, "%s: bad matmul shape", name);
    Py_buffer w, qs, d, s, out;
    PyObject *res = NULL;
    if (get_buffer(w_o, &w, 0, (Py_ssize_t)(n_rows * row_bytes), "w") < 0) return NULL;
    if (get_buffer(qs_o, &qs, 0, (Py_ssize_t)(n_tokens * n), "qs") < 0) goto fail_w;
    if (get_buffer(d_o, &d, 0, (Py_ssize_t)(n_tokens * (n / MT_QK) * 4), "d") < 0) goto fail_qs;
    if (get_buffer(s_o, &s, 0, (Py_ssize_t)(n_tokens * (n / MT_QK) * 4 * mt_cuda_sums_per_block(t, k)), "s") < 0)
        goto fail_d;
    if (get_buffer(out_o, &out, 1, (Py_ssize_t)(n_tokens * n_rows * 4), "out") < 0) goto fail_s;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mt_cuda_matmul(t, k, (const uint8_t *)w.buf, row_bytes, r0, r1, (const int8_t *)qs.buf, (const float *)d.buf,
                        (const float *)s.buf, n_tokens, n, (float *)out.buf, n_rows);
    Py_END_ALLOW_THREADS
    if (rc == 1) PyErr_NoMemory();
    else if (rc) PyErr_Format(PyExc_ValueError, "no CUDA %s emulation for %s", kname, name);
    else res = Py_None, Py_INCREF(res);
    PyBuffer_Release(&out);
fail_s:
    PyBuffer_Release(&s);
fail_d:
    PyBuffer_Release(&d);
fail_qs:
    PyBuffer_Release(&qs);
fail_w:
    PyBuffer_Release(&w);
    return res;
}

static PyMethodDef methods[] = {
    {"quantize_act", py_quantize_act, METH_VARARGS, quantize_act_doc},
    {"matmul", py_matmul, METH_VARARGS, matmul_doc},
    {"cuda_quantize", py_cuda_quantize, METH_VARARGS, cuda_quantize_doc},
    {"cuda_matmul", py_cuda_matmul, METH_VARARGS, cuda_matmul_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_cengine",
    "llama.cpp CPU-backend emulation: activation quantizers and integer-dot matmul (see moetrace.kernels.matmul).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__cengine(void) { return PyModule_Create(&moduledef); }
