/* The Python module moetrace.kernels._ckernels: type-dispatched quantize and dequantize on
 * caller-owned buffers, with the GIL released so several Python threads can each run a range of
 * rows or blocks on their own core (moetrace.kernels.native does that split). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>

#include "ckernels.h"

static mt_kernel_table table;

/* name, block size (elements), block bytes: from layouts.h, generated from kernels/layouts.py. */
#define MT_TYPE_ENTRY(T) [MT_##T] = {#T, MT_##T##_ELEMS, MT_##T##_BYTES}
static const struct { const char *name; int block; int bytes; } types[MT_N_TYPES] = {
    MT_TYPE_ENTRY(Q4_0), MT_TYPE_ENTRY(Q4_1), MT_TYPE_ENTRY(Q5_0), MT_TYPE_ENTRY(Q5_1), MT_TYPE_ENTRY(Q8_0),
    MT_TYPE_ENTRY(Q2_K), MT_TYPE_ENTRY(Q3_K), MT_TYPE_ENTRY(Q4_K), MT_TYPE_ENTRY(Q5_K), MT_TYPE_ENTRY(Q6_K),
    MT_TYPE_ENTRY(MXFP4),
};

static const char *const search_names[MT_N_SEARCHES] = {
    [MT_SEARCH_QKX] = "qkx", [MT_SEARCH_QX] = "qx", [MT_SEARCH_QKX3] = "qkx3", [MT_SEARCH_LEGACY_REF] = "legacy_ref",
};

/* The one place MOETRACE_NO_AVX2 is read: whether the searches may run their AVX2 builds. Set to
 * anything but "" or "0", it keeps every search on its portable build (to test that build on an
 * AVX2 machine, or to rule it out when bytes differ). */
static int use_avx2(void) {
    const char *off = getenv("MOETRACE_NO_AVX2");
    if (off && off[0] && strcmp(off, "0") != 0) return 0;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    return 0;
#endif
}

static int find_type(const char *name) {
    for (int i = 0; i < MT_N_TYPES; i++)
        if (strcmp(types[i].name, name) == 0) return i;
    PyErr_Format(PyExc_ValueError, "no compiled kernel for GGML type %s", name);
    return -1;
}

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t need, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    if (view->len < need) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, %zd needed", what, view->len, need);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* 1 when no value is NaN or +-Inf (exponent bits all ones), 0 otherwise. */
static int all_finite(const float *x, int64_t n) {
    const uint32_t *u = (const uint32_t *)x;
    uint32_t bad = 0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        for (int j = 0; j < 64; ++j) bad |= ((u[i + j] & 0x7f800000u) == 0x7f800000u);
        if (bad) return 0;
    }
    for (; i < n; ++i) bad |= ((u[i] & 0x7f800000u) == 0x7f800000u);
    return !bad;
}

PyDoc_STRVAR(quantize_doc,
"quantize(type_name, src, dst, n_rows, n_per_row, imatrix=None)\n\n"
"Quantize n_rows rows of n_per_row float32 values from buffer src into GGUF block bytes in\n"
"buffer dst, bit-exact with ggml; imatrix is None or a buffer of n_per_row float32 weights.\n"
"Raises FloatingPointError (and writes nothing) when src holds NaN or Inf.");

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    const char *name;
    PyObject *src_o, *dst_o, *imat_o = Py_None;
    long long n_rows, n_per_row;
    if (!PyArg_ParseTuple(args, "sOOLL|O", &name, &src_o, &dst_o, &n_rows, &n_per_row, &imat_o)) return NULL;
    int t = find_type(name);
    if (t < 0) return NULL;
    if (!table.quantize[t]) return PyErr_Format(PyExc_ValueError, "no compiled quantizer for %s", name);
    if (n_rows < 0 || n_per_row <= 0 || n_per_row % types[t].block)
        return PyErr_Format(PyExc_ValueError, "%s: bad shape (%lld, %lld)", name, n_rows, n_per_row);
    Py_buffer src, dst, imat = {0};
    if (get_buffer(src_o, &src, 0, (Py_ssize_t)(n_rows * n_per_row * 4), "src") < 0) return NULL;
    if (get_buffer(dst_o, &dst, 1, (Py_ssize_t)(n_rows * (n_per_row / types[t].block) * types[t].bytes), "dst") < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    const float *im = NULL;
    if (imat_o != Py_None) {
        if (get_buffer(imat_o, &imat, 0, (Py_ssize_t)(n_per_row * 4), "imatrix") < 0) {
            PyBuffer_Release(&src);
            PyBuffer_Release(&dst);
            return NULL;
        }
        im = (const float *)imat.buf;
    }
    int rc, finite;
    Py_BEGIN_ALLOW_THREADS
    /* ggml would quantize NaN/Inf silently; moetrace refuses them. Checked here, on the rows this
     * call quantizes (in this thread, the bytes then in cache for the kernel). */
    finite = all_finite((const float *)src.buf, n_rows * n_per_row);
    rc = finite ? table.quantize[t]((const float *)src.buf, (uint8_t *)dst.buf, n_rows, n_per_row, im) : 0;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (im) PyBuffer_Release(&imat);
    if (!finite) return PyErr_Format(PyExc_FloatingPointError, "the tensor holds NaN or Inf");
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(dequantize_doc,
"dequantize(type_name, src, dst, n_blocks)\n\n"
"Dequantize n_blocks GGUF blocks from buffer src into float32 buffer dst, bit-exact with ggml.");

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    const char *name;
    PyObject *src_o, *dst_o;
    long long n_blocks;
    if (!PyArg_ParseTuple(args, "sOOL", &name, &src_o, &dst_o, &n_blocks)) return NULL;
    int t = find_type(name);
    if (t < 0) return NULL;
    if (!table.dequantize[t]) return PyErr_Format(PyExc_ValueError, "no compiled dequantizer for %s", name);
    if (n_blocks < 0) return PyErr_Format(PyExc_ValueError, "negative block count %lld", n_blocks);
    Py_buffer src, dst;
    if (get_buffer(src_o, &src, 0, (Py_ssize_t)(n_blocks * types[t].bytes), "src") < 0) return NULL;
    if (get_buffer(dst_o, &dst, 1, (Py_ssize_t)(n_blocks * types[t].block * 4), "dst") < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    table.dequantize[t]((const uint8_t *)src.buf, (float *)dst.buf, n_blocks);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(kernels_doc,
"kernels() -> dict\n\nType name -> (has a compiled quantizer, has a compiled dequantizer).");

static PyObject *py_kernels(PyObject *self, PyObject *unused) {
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (int i = 0; i < MT_N_TYPES; i++) {
        PyObject *v = Py_BuildValue("(OO)", table.quantize[i] ? Py_True : Py_False,
                                    table.dequantize[i] ? Py_True : Py_False);
        if (!v || PyDict_SetItemString(d, types[i].name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    return d;
}

PyDoc_STRVAR(search_impl_doc,
"search_impl() -> dict\n\nSearch family -> the build it runs: 'avx2', or the portable '" MT_PORTABLE_IMPL "'.\n"
"Fixed when the module loads (CPU support, and MOETRACE_NO_AVX2 in the environment).");

static PyObject *py_search_impl(PyObject *self, PyObject *unused) {
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (int i = 0; i < MT_N_SEARCHES; i++) {
        PyObject *v = PyUnicode_FromString(table.search_impl[i] ? table.search_impl[i] : "none");
        if (!v || PyDict_SetItemString(d, search_names[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    return d;
}

PyDoc_STRVAR(block_sizes_doc,
"block_sizes() -> dict\n\nType name -> (elements, bytes) per block, as compiled in (layouts.h).");

static PyObject *py_block_sizes(PyObject *self, PyObject *unused) {
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (int i = 0; i < MT_N_TYPES; i++) {
        PyObject *v = Py_BuildValue("(ii)", types[i].block, types[i].bytes);
        if (!v || PyDict_SetItemString(d, types[i].name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    return d;
}

static PyMethodDef methods[] = {
    {"search_impl", py_search_impl, METH_NOARGS, search_impl_doc},
    {"block_sizes", py_block_sizes, METH_NOARGS, block_sizes_doc},
    {"quantize", py_quantize, METH_VARARGS, quantize_doc},
    {"dequantize", py_dequantize, METH_VARARGS, dequantize_doc},
    {"kernels", py_kernels, METH_NOARGS, kernels_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_ckernels",
    "moetrace's compiled GGUF block kernels, bit-exact with ggml (see moetrace.kernels.native).", -1, methods,
};

PyMODINIT_FUNC PyInit__ckernels(void) {
    const int avx2 = use_avx2();
    mt_register_kquant_qkx(&table, avx2);
    mt_register_qx(&table, avx2);
    mt_register_dequant(&table);
    mt_register_mxfp4(&table);
    return PyModule_Create(&moduledef);
}
