/*
 * stethoscope._sketch: per-feature exponential histograms and consistent
 * probability sampling for the in-process SDK.
 *
 * C twin of two Python modules, which are the reference and state the rules
 * in their docstrings:
 *   native/sketch.py    exphist_update, exphist_update_row
 *   native/sampling.py  randomness_from_ids, sample_mask, threshold_for,
 *                       threshold_hex, parse_threshold_hex, adjusted_count
 * Both give identical results (the test suite compares every state array).
 *
 * Design of the histogram kernel:
 *  - No NumPy C API. The state (ExpHistogramState) keeps all of its arrays in
 *    one 8-byte aligned block exported through the buffer protocol; the block
 *    starts with a header (magic, d, max_size, zero_threshold) and the layout
 *    after it is fixed (see hist_load and sketch.py _layout). One attribute
 *    lookup and one buffer request per call keep the single-row path cheap.
 *  - Buckets of a range (positive or negative) live in a row of max_size
 *    counters: bucket index i sits in slot floor_mod(i, max_size), and the
 *    range's offset is the smallest index holding a count (EMPTY_OFFSET when
 *    it has none). Every index with a count lies in [offset, offset+max_size),
 *    so the layout is a pure function of the recorded indices: no history.
 *  - Values are handled one by one, in row order per column, exactly as the
 *    OpenTelemetry Python SDK's aggregation does: map at the current scale; if
 *    the range would span more than max_size buckets, reduce the scale by the
 *    smallest amount that fits (both ranges merge buckets pairwise per step)
 *    and map the value again at the new scale.
 *  - Mapping: scale <= 0 from the IEEE exponent (exact, powers of two one
 *    bucket down); scale > 0 floor(log(v) * 2**scale/ln 2) with the exact
 *    power-of-two case; subnormals are rounded up to 2**-1022 (the spec allows
 *    it, and the SDK does it).
 *  - The GIL is held throughout: concurrent calls on one state are serialized.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#define MIN_SCALE (-10)
#define MAX_SCALE 20
#define MAX_MAX_SIZE 16384
#define EMPTY_OFFSET INT32_MAX
#define STATE_MAGIC UINT64_C(0x5354484558504831) /* "STHEXPH1" */
#define HEADER_BYTES 32
#define MANT_MASK ((UINT64_C(1) << 52) - 1)

#if defined(__GNUC__) || defined(__clang__)
#define NOINLINE __attribute__((noinline))
#define ALWAYS_INLINE __attribute__((always_inline))
#else
#define NOINLINE
#define ALWAYS_INLINE
#endif

static double scale_factor[MAX_SCALE + 1]; /* 2**s / ln 2, as Python computes it */
static PyObject *str_block;                /* interned "_block" */
static PyObject *np_empty;                 /* numpy.empty, imported on first use */

/* ------------------------------------------------------------------------ */
/* Integer helpers (no shifts of negative numbers: those are not portable C) */

static inline int64_t floor_shift(int64_t x, int k)
{
    return x >= 0 ? x >> k : -((-(x + 1)) >> k) - 1;
}

static inline int64_t floor_mod(int64_t x, int64_t m)
{
    int64_t r = x % m;
    return r < 0 ? r + m : r;
}

/* ------------------------------------------------------------------------ */
/* Mapping a positive finite magnitude to its bucket index at a scale        */

static inline int64_t map_index(double a, int s, double sf)
{
    uint64_t bits;
    memcpy(&bits, &a, sizeof bits);
    int64_t raw = (int64_t)(bits >> 52);
    int pow2 = (bits & MANT_MASK) == 0;
    /* exponent of the bucket at scale 0: powers of two one down, subnormals as 2**-1022 */
    int64_t e = raw == 0 ? -1023 : raw - 1023 - pow2;
    if (s <= 0)
        return floor_shift(e, -s);
    int64_t mult = (int64_t)1 << s;
    if (raw == 0 || pow2)
        return (e + 1) * mult - 1;
    double x = log(a) * sf; /* |x| < 2**31: truncate, then step down for negative fractions */
    int64_t i = (int64_t)x;
    if ((double)i > x)
        i--;
    int64_t top = 1024 * mult - 1;
    return i < top ? i : top;
}

/* ------------------------------------------------------------------------ */
/* The state block                                                          */

typedef struct {
    int64_t d, m;
    double zt;
    double *sum, *mn, *mx;
    uint64_t *count, *zero, *counts[2]; /* [0] positive, [1] negative: d rows of m */
    int32_t *scale, *offset[2];
} Hist;

typedef struct {
    int64_t lo;   /* smallest index with a count, or EMPTY_OFFSET */
    int64_t base; /* lo - floor_mod(lo, m): slot of i in [lo, lo+m) is i - base, less m once */
} Win;

typedef struct {
    int s;
    double sf;
    Win w[2];
} Col;

static int64_t block_bytes(int64_t d, int64_t m)
{
    int64_t total = HEADER_BYTES + 8 * (5 * d + 2 * d * m) + 12 * d;
    return (total + 7) / 8 * 8;
}

/* Borrow the state's block; d is the number of columns of the values. */
static int hist_load(PyObject *state, int64_t d, Py_buffer *view, Hist *h)
{
    PyObject *blk = PyObject_GetAttr(state, str_block);
    if (blk == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "state must be an ExpHistogramState, not %.100s",
                         Py_TYPE(state)->tp_name);
        }
        return -1;
    }
    int rc = PyObject_GetBuffer(blk, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS);
    Py_DECREF(blk);
    if (rc < 0)
        return -1;
    char *p = (char *)view->buf;
    uint64_t hdr[4];
    if (view->len < HEADER_BYTES || ((uintptr_t)p & 7) != 0)
        goto corrupt;
    memcpy(hdr, p, sizeof hdr);
    if (hdr[0] != STATE_MAGIC || hdr[2] < 2 || hdr[2] > MAX_MAX_SIZE || hdr[1] > (UINT64_C(1) << 32))
        goto corrupt;
    h->m = (int64_t)hdr[2];
    memcpy(&h->zt, &hdr[3], sizeof h->zt);
    if (!(h->zt >= 0.0) || !isfinite(h->zt))
        goto corrupt;
    if (d < 0) /* any number of columns: the state's */
        d = (int64_t)hdr[1];
    if ((int64_t)hdr[1] != d) {
        PyErr_Format(PyExc_ValueError, "values have %lld columns but the state has %lld",
                     (long long)d, (long long)hdr[1]);
        PyBuffer_Release(view);
        return -1;
    }
    if (view->len != block_bytes(d, h->m))
        goto corrupt;
    h->d = d;
    p += HEADER_BYTES;
    h->sum = (double *)p;
    h->mn = h->sum + d;
    h->mx = h->mn + d;
    h->count = (uint64_t *)(h->mx + d);
    h->zero = h->count + d;
    h->counts[0] = h->zero + d;
    h->counts[1] = h->counts[0] + d * h->m;
    h->scale = (int32_t *)(h->counts[1] + d * h->m);
    h->offset[0] = h->scale + d;
    h->offset[1] = h->offset[0] + d;
    return 0;
corrupt:
    PyErr_SetString(PyExc_ValueError, "the state's block is corrupt (not made by ExpHistogramState)");
    PyBuffer_Release(view);
    return -1;
}

static inline void win_set(Hist *h, Col *col, int64_t c, int r, int64_t lo)
{
    Win *w = &col->w[r];
    w->lo = lo;
    w->base = lo == EMPTY_OFFSET ? 0 : lo - floor_mod(lo, h->m);
    h->offset[r][c] = (int32_t)lo;
}

static inline int64_t win_slot(const Win *w, int64_t i, int64_t m)
{
    int64_t slot = i - w->base;
    return slot >= m ? slot - m : slot;
}

/* Working copy of column c's scale and windows (checked: a hand-edited state must not crash us). */
static int col_init(Hist *h, int64_t c, Col *col)
{
    int s = h->scale[c];
    if (s < MIN_SCALE || s > MAX_SCALE) {
        PyErr_Format(PyExc_ValueError, "the state's scale for column %lld is %d, outside [%d, %d]",
                     (long long)c, s, MIN_SCALE, MAX_SCALE);
        return -1;
    }
    col->s = s;
    col->sf = s > 0 ? scale_factor[s] : 0.0;
    /* an offset is EMPTY or a bucket some double maps to at this scale */
    int64_t first = s > 0 ? -1022 * ((int64_t)1 << s) - 1 : floor_shift(-1023, -s);
    int64_t last = s > 0 ? 1024 * ((int64_t)1 << s) - 1 : floor_shift(1023, -s);
    for (int r = 0; r < 2; r++) {
        int64_t lo = h->offset[r][c];
        if (lo != EMPTY_OFFSET && (lo < first || lo > last)) {
            PyErr_Format(PyExc_ValueError,
                         "the state is corrupt: offset %lld of column %lld is no bucket at scale %d",
                         (long long)lo, (long long)c, s);
            return -1;
        }
        col->w[r].lo = lo;
        col->w[r].base = lo == EMPTY_OFFSET ? 0 : lo - floor_mod(lo, h->m);
    }
    return 0;
}

/* Per-call working copy of each column's scale and windows. */
static int cols_init(Hist *h, Col *cols)
{
    for (int64_t c = 0; c < h->d; c++)
        if (col_init(h, c, &cols[c]) < 0)
            return -1;
    return 0;
}

/* Largest index with a count in a range (lo when none: a hand-edited state). */
static int64_t win_hi(const Win *w, const uint64_t *cnt, int64_t m)
{
    for (int64_t k = m - 1; k >= 0; k--)
        if (cnt[win_slot(w, w->lo + k, m)] != 0)
            return w->lo + k;
    return w->lo;
}

/* Lower column c's scale by `change`: bucket i of either range goes to i >> change. */
static void downscale(Hist *h, Col *col, int64_t c, int change, uint64_t *tmp)
{
    const int64_t m = h->m;
    for (int r = 0; r < 2; r++) {
        Win *w = &col->w[r];
        if (w->lo == EMPTY_OFFSET)
            continue;
        uint64_t *cnt = h->counts[r] + c * m;
        memset(tmp, 0, (size_t)m * sizeof *tmp);
        for (int64_t k = 0; k < m; k++) {
            int64_t i = w->lo + k;
            uint64_t n = cnt[win_slot(w, i, m)];
            if (n != 0)
                tmp[floor_mod(floor_shift(i, change), m)] += n;
        }
        memcpy(cnt, tmp, (size_t)m * sizeof *tmp);
        win_set(h, col, c, r, floor_shift(w->lo, change));
    }
    col->s -= change;
    col->sf = col->s > 0 ? scale_factor[col->s] : 0.0;
    h->scale[c] = col->s;
}

/* The value's index idx (at the column's scale) is outside its range's window. */
static NOINLINE int record_slow(Hist *h, Col *col, int64_t c, int r, double a, int64_t idx,
                                uint64_t *tmp)
{
    const int64_t m = h->m;
    uint64_t *cnt = h->counts[r] + c * m;
    for (;;) {
        Win *w = &col->w[r];
        int64_t low, high;
        if (w->lo == EMPTY_OFFSET) {
            win_set(h, col, c, r, idx);
            cnt[win_slot(w, idx, m)]++;
            return 0;
        }
        if (idx >= w->lo && idx - w->lo < m) {
            cnt[win_slot(w, idx, m)]++;
            return 0;
        }
        if (idx < w->lo) {
            int64_t hi = win_hi(w, cnt, m);
            if (hi - idx < m) {
                win_set(h, col, c, r, idx);
                cnt[win_slot(w, idx, m)]++;
                return 0;
            }
            low = idx;
            high = hi;
        } else {
            low = w->lo;
            high = idx;
        }
        int change = 0;
        while (high - low >= m) {
            high = floor_shift(high, 1);
            low = floor_shift(low, 1);
            change++;
        }
        if (col->s - change < MIN_SCALE) {
            /* at scale -10 every double maps to bucket -1 or 0 and m >= 2: only hand-edited counts get here */
            PyErr_SetString(PyExc_ValueError, "the state is corrupt: its buckets need a scale below -10");
            return -1;
        }
        downscale(h, col, c, change, tmp);
        idx = map_index(a, col->s, col->sf);
    }
}

/* One finite value into column c. */
static inline ALWAYS_INLINE int record(Hist *h, Col *col, int64_t c, double v, uint64_t *tmp)
{
    h->count[c]++;
    h->sum[c] += v;
    if (v < h->mn[c])
        h->mn[c] = v;
    if (v > h->mx[c])
        h->mx[c] = v;
    double a = fabs(v);
    if (a <= h->zt) {
        h->zero[c]++;
        return 0;
    }
    int r = v < 0.0;
    int64_t idx = map_index(a, col->s, col->sf);
    const Win *w = &col->w[r];
    if ((uint64_t)(idx - w->lo) < (uint64_t)h->m) {
        h->counts[r][c * h->m + win_slot(w, idx, h->m)]++;
        return 0;
    }
    return record_slow(h, col, c, r, a, idx, tmp);
}

/* ------------------------------------------------------------------------ */
/* Values                                                                   */

/* 'd' -> 8, 'f' -> 4, anything else 0 (native byte order only). */
static int float_kind(const char *fmt)
{
    if (fmt == NULL)
        return 0;
    if (*fmt == '@' || *fmt == '=')
        fmt++;
#if PY_LITTLE_ENDIAN
    else if (*fmt == '<')
        fmt++;
#else
    else if (*fmt == '>' || *fmt == '!')
        fmt++;
#endif
    if (fmt[0] != '\0' && fmt[1] == '\0') {
        if (fmt[0] == 'd')
            return 8;
        if (fmt[0] == 'f')
            return 4;
    }
    return 0;
}

static int get_floats(PyObject *values, Py_buffer *vb, int ndim)
{
    if (PyObject_GetBuffer(values, vb, PyBUF_STRIDES | PyBUF_FORMAT) < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "values must be a float64 or float32 array (buffer protocol), not %.100s",
                         Py_TYPE(values)->tp_name);
        }
        return -1;
    }
    if (float_kind(vb->format) != vb->itemsize) {
        PyErr_Format(PyExc_TypeError, "values must hold float64 or float32 in native byte order, not format %.20s",
                     vb->format ? vb->format : "B");
        PyBuffer_Release(vb);
        return -1;
    }
    if (vb->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "values must be %d-dimensional, not %d-dimensional", ndim, vb->ndim);
        PyBuffer_Release(vb);
        return -1;
    }
    return 0;
}

/* Columns in blocks of 8 (a cache line of float64), rows inside: each column
 * still sees its values in row order, and a block's buckets stay in L1. */
#define COL_BLOCK 8
#define INGEST_LOOP(T)                                                                       \
    for (int64_t c0 = 0; c0 < h->d; c0 += COL_BLOCK) {                                        \
        int64_t c1 = h->d - c0 < COL_BLOCK ? h->d : c0 + COL_BLOCK;                           \
        for (Py_ssize_t i = 0; i < n; i++) {                                                  \
            const char *row = base + i * rs;                                                  \
            for (int64_t c = c0; c < c1; c++) {                                               \
                T t;                                                                          \
                memcpy(&t, row + c * cs, sizeof t);                                           \
                double v = (double)t;                                                         \
                if (!isfinite(v)) {                                                           \
                    dropped++;                                                                \
                    continue;                                                                 \
                }                                                                             \
                if (record(h, &cols[c], c, v, tmp) < 0)                                       \
                    return -1;                                                                \
            }                                                                                 \
        }                                                                                     \
    }

static Py_ssize_t ingest_f64(Hist *h, Col *cols, const char *base, Py_ssize_t n, Py_ssize_t rs,
                             Py_ssize_t cs, uint64_t *tmp)
{
    Py_ssize_t dropped = 0;
    INGEST_LOOP(double)
    return dropped;
}

static Py_ssize_t ingest_f32(Hist *h, Col *cols, const char *base, Py_ssize_t n, Py_ssize_t rs,
                             Py_ssize_t cs, uint64_t *tmp)
{
    Py_ssize_t dropped = 0;
    INGEST_LOOP(float)
    return dropped;
}

#define STACK_COLS 128
#define STACK_TMP 512

/* Rows of d values (item size 8 or 4) into the state; returns dropped or -1. */
static Py_ssize_t ingest(PyObject *state, int64_t d, const char *base, Py_ssize_t n, Py_ssize_t rs,
                         Py_ssize_t cs, int itemsize, PyObject *max_size)
{
    Py_buffer sb;
    Hist h;
    Col stack_cols[STACK_COLS];
    uint64_t stack_tmp[STACK_TMP];
    Col *cols = stack_cols;
    uint64_t *tmp = stack_tmp;
    Py_ssize_t dropped = -1;

    if (hist_load(state, d, &sb, &h) < 0)
        return -1;
    if (max_size != NULL && max_size != Py_None) {
        long long want = PyLong_AsLongLong(max_size);
        if (want == -1 && PyErr_Occurred())
            goto done;
        if (want != h.m) {
            PyErr_Format(PyExc_ValueError, "max_size is %lld but the state was made with max_size=%lld", want,
                         (long long)h.m);
            goto done;
        }
    }
    if (d > STACK_COLS && (cols = PyMem_Malloc((size_t)d * sizeof *cols)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (h.m > STACK_TMP && (tmp = PyMem_Malloc((size_t)h.m * sizeof *tmp)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (cols_init(&h, cols) < 0)
        goto done;
    if (itemsize == 8)
        dropped = ingest_f64(&h, cols, base, n, rs, cs, tmp);
    else
        dropped = ingest_f32(&h, cols, base, n, rs, cs, tmp);
done:
    if (cols != stack_cols)
        PyMem_Free(cols);
    if (tmp != stack_tmp)
        PyMem_Free(tmp);
    PyBuffer_Release(&sb);
    return dropped;
}

PyDoc_STRVAR(exphist_update_doc,
"exphist_update(values, state, max_size=None)\n--\n\n"
"Record a 2-D float64 or float32 array (n rows, one histogram per column) into an\n"
"ExpHistogramState, in row order. Returns how many values were not finite (dropped).\n"
"C twin of stethoscope.native.sketch.exphist_update.");

static PyObject *py_exphist_update(PyObject *mod, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"values", "state", "max_size", NULL};
    PyObject *values, *state, *max_size = Py_None;
    Py_buffer vb;
    (void)mod;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:exphist_update", kwlist, &values, &state, &max_size))
        return NULL;
    if (get_floats(values, &vb, 2) < 0)
        return NULL;
    Py_ssize_t dropped = ingest(state, vb.shape[1], vb.buf, vb.shape[0], vb.strides[0], vb.strides[1],
                                (int)vb.itemsize, max_size);
    PyBuffer_Release(&vb);
    return dropped < 0 ? NULL : PyLong_FromSsize_t(dropped);
}

PyDoc_STRVAR(exphist_update_row_doc,
"exphist_update_row(values, state, /)\n--\n\n"
"Record one row of d values (a 1-D float64/float32 array, or a list or tuple of\n"
"numbers) into an ExpHistogramState. Returns how many values were dropped.\n"
"C twin of stethoscope.native.sketch.exphist_update_row.");

static PyObject *py_exphist_update_row(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "exphist_update_row() takes 2 positional arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *values = args[0], *state = args[1];
    Py_ssize_t dropped;
    if (PyList_Check(values) || PyTuple_Check(values)) {
        Py_ssize_t d = PySequence_Fast_GET_SIZE(values);
        PyObject **items = PySequence_Fast_ITEMS(values);
        double stack_row[STACK_COLS];
        double *row = stack_row;
        stack_row[0] = 0.0; /* d == 0 reads nothing, but keep the compiler sure of it */
        if (d > STACK_COLS && (row = PyMem_Malloc((size_t)d * sizeof *row)) == NULL)
            return PyErr_NoMemory();
        for (Py_ssize_t c = 0; c < d; c++) {
            PyObject *x = items[c];
            if (PyUnicode_Check(x) || PyBytes_Check(x) || PyByteArray_Check(x)) {
                PyErr_Format(PyExc_TypeError, "values must be numbers, not %.100s", Py_TYPE(x)->tp_name);
                goto list_fail;
            }
            row[c] = PyFloat_AsDouble(x);
            if (row[c] == -1.0 && PyErr_Occurred())
                goto list_fail;
        }
        dropped = ingest(state, d, (const char *)row, 1, 0, sizeof *row, 8, NULL);
        if (row != stack_row)
            PyMem_Free(row);
        return dropped < 0 ? NULL : PyLong_FromSsize_t(dropped);
    list_fail:
        if (row != stack_row)
            PyMem_Free(row);
        return NULL;
    }
    Py_buffer vb;
    if (get_floats(values, &vb, 1) < 0)
        return NULL;
    dropped = ingest(state, vb.shape[0], vb.buf, 1, 0, vb.strides[0], (int)vb.itemsize, NULL);
    PyBuffer_Release(&vb);
    return dropped < 0 ? NULL : PyLong_FromSsize_t(dropped);
}

/* ------------------------------------------------------------------------ */
/* Sampling: BLAKE2b (RFC 7693), 8-byte digest, no key                      */

static const uint64_t b2_iv[8] = {
    UINT64_C(0x6a09e667f3bcc908), UINT64_C(0xbb67ae8584caa73b), UINT64_C(0x3c6ef372fe94f82b),
    UINT64_C(0xa54ff53a5f1d36f1), UINT64_C(0x510e527fade682d1), UINT64_C(0x9b05688c2b3e6c1f),
    UINT64_C(0x1f83d9abfb41bd6b), UINT64_C(0x5be0cd19137e2179)};

static const uint8_t b2_sigma[10][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0}};

static inline uint64_t rotr64(uint64_t x, int k)
{
    return (x >> k) | (x << (64 - k));
}

static inline uint64_t load_le64(const uint8_t *p)
{
    uint64_t x = 0;
    for (int i = 7; i >= 0; i--)
        x = (x << 8) | p[i];
    return x;
}

#define B2G(a, b, c, d, x, y)          \
    do {                               \
        v[a] = v[a] + v[b] + (x);      \
        v[d] = rotr64(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d];            \
        v[b] = rotr64(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + (y);      \
        v[d] = rotr64(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d];            \
        v[b] = rotr64(v[b] ^ v[c], 63); \
    } while (0)

static void b2_compress(uint64_t h[8], const uint8_t block[128], uint64_t t, int last)
{
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++)
        m[i] = load_le64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = b2_iv[i];
    }
    v[12] ^= t; /* the high word of the 128-bit counter stays 0: ids are short */
    if (last)
        v[14] = ~v[14];
    for (int round = 0; round < 12; round++) {
        const uint8_t *s = b2_sigma[round % 10];
        B2G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        B2G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        B2G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        B2G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        B2G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        B2G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        B2G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        B2G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++)
        h[i] ^= v[i] ^ v[i + 8];
}

/* First 8 bytes of BLAKE2b-64(data), as the little-endian word h[0]. */
static uint64_t blake2b_64(const uint8_t *data, size_t len)
{
    uint64_t h[8];
    uint8_t block[128];
    memcpy(h, b2_iv, sizeof h);
    h[0] ^= UINT64_C(0x01010000) ^ 8; /* digest length 8, no key, fanout 1, depth 1 */
    size_t done = 0;
    while (len - done > 128) {
        b2_compress(h, data + done, (uint64_t)(done + 128), 0);
        done += 128;
    }
    memset(block, 0, sizeof block);
    if (len > done)
        memcpy(block, data + done, len - done);
    b2_compress(h, block, (uint64_t)len, 1);
    return h[0];
}

static inline int hexval(uint8_t ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* 56-bit randomness of one id's bytes (see sampling.py for the rule). */
static uint64_t id_randomness(const uint8_t *p, size_t n)
{
    if (n == 32) {
        uint64_t r = 0;
        int ok = 1;
        for (size_t i = 0; i < 32 && ok; i++) {
            int x = hexval(p[i]);
            if (x < 0)
                ok = 0;
            else if (i >= 18)
                r = (r << 4) | (uint64_t)x;
        }
        if (ok)
            return r;
    }
    uint64_t h0 = blake2b_64(p, n);
    /* digest bytes 1..7 (little-endian word h0), read big-endian */
    uint64_t r = 0;
    for (int i = 1; i < 8; i++)
        r = (r << 8) | ((h0 >> (8 * i)) & 0xff);
    return r;
}

static PyObject *new_array(Py_ssize_t n, const char *dtype, Py_buffer *view)
{
    if (np_empty == NULL) {
        PyObject *np = PyImport_ImportModule("numpy");
        if (np == NULL)
            return NULL;
        np_empty = PyObject_GetAttrString(np, "empty");
        Py_DECREF(np);
        if (np_empty == NULL)
            return NULL;
    }
    PyObject *arr = PyObject_CallFunction(np_empty, "ns", n, dtype);
    if (arr == NULL)
        return NULL;
    if (PyObject_GetBuffer(arr, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

PyDoc_STRVAR(randomness_from_ids_doc,
"randomness_from_ids(ids)\n--\n\n"
"56-bit sampling randomness (numpy uint64 array) for a sequence of str or bytes ids.\n"
"C twin of stethoscope.native.sampling.randomness_from_ids.");

static PyObject *py_randomness_from_ids(PyObject *mod, PyObject *ids)
{
    (void)mod;
    if (PyUnicode_Check(ids) || PyBytes_Check(ids) || PyByteArray_Check(ids)) {
        PyErr_SetString(PyExc_TypeError, "ids must be a sequence of ids, not a single str or bytes");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(ids, "ids must be a sequence of str or bytes");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Py_buffer out;
    PyObject *arr = new_array(n, "uint64", &out);
    if (arr == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    uint64_t *dst = (uint64_t *)out.buf;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *x = items[k];
        const char *p;
        Py_ssize_t len;
        if (PyUnicode_Check(x)) {
            p = PyUnicode_AsUTF8AndSize(x, &len);
            if (p == NULL) { /* lone surrogates: UTF-8 with surrogatepass, as the twin does */
                PyErr_Clear();
                PyObject *b = PyUnicode_AsEncodedString(x, "utf-8", "surrogatepass");
                if (b == NULL)
                    goto fail;
                dst[k] = id_randomness((const uint8_t *)PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
                Py_DECREF(b);
                continue;
            }
        } else if (PyBytes_Check(x)) {
            p = PyBytes_AS_STRING(x);
            len = PyBytes_GET_SIZE(x);
        } else if (PyByteArray_Check(x)) {
            p = PyByteArray_AS_STRING(x);
            len = PyByteArray_GET_SIZE(x);
        } else {
            PyErr_Format(PyExc_TypeError, "ids must be str or bytes, not %.100s", Py_TYPE(x)->tp_name);
            goto fail;
        }
        dst[k] = id_randomness((const uint8_t *)p, (size_t)len);
    }
    PyBuffer_Release(&out);
    Py_DECREF(seq);
    return arr;
fail:
    PyBuffer_Release(&out);
    Py_DECREF(arr);
    Py_DECREF(seq);
    return NULL;
}

#define MAX_THRESHOLD (UINT64_C(1) << 56)

/* A threshold argument: an int in [0, 2**56). */
static int get_threshold(PyObject *obj, uint64_t *t)
{
    PyObject *i = PyNumber_Index(obj);
    if (i == NULL)
        return -1;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(i, &overflow);
    Py_DECREF(i);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow != 0 || v < 0 || (uint64_t)v >= MAX_THRESHOLD) {
        PyErr_SetString(PyExc_ValueError, "a threshold must be an integer in [0, 2**56)");
        return -1;
    }
    *t = (uint64_t)v;
    return 0;
}

PyDoc_STRVAR(sample_mask_doc,
"sample_mask(randomness, threshold)\n--\n\n"
"Keep mask (numpy bool array): randomness >= threshold, for a 1-D uint64 array.\n"
"C twin of stethoscope.native.sampling.sample_mask.");

static PyObject *py_sample_mask(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "sample_mask() takes 2 positional arguments (%zd given)", nargs);
        return NULL;
    }
    uint64_t t;
    Py_buffer rb, out;
    if (PyObject_GetBuffer(args[0], &rb, PyBUF_STRIDES | PyBUF_FORMAT) < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "randomness must be a uint64 array, not %.100s",
                         Py_TYPE(args[0])->tp_name);
        }
        return NULL;
    }
    const char *f = rb.format ? rb.format : "B";
    if (*f == '@' || *f == '=' || (PY_LITTLE_ENDIAN && *f == '<'))
        f++;
    if (rb.itemsize != 8 || (strcmp(f, "Q") != 0 && strcmp(f, "L") != 0)) {
        PyErr_Format(PyExc_TypeError, "randomness must hold uint64, not format %.20s", rb.format ? rb.format : "B");
        PyBuffer_Release(&rb);
        return NULL;
    }
    if (rb.ndim != 1) {
        PyErr_Format(PyExc_ValueError, "randomness must be 1-dimensional, not %d-dimensional", rb.ndim);
        PyBuffer_Release(&rb);
        return NULL;
    }
    if (get_threshold(args[1], &t) < 0) {
        PyBuffer_Release(&rb);
        return NULL;
    }
    Py_ssize_t n = rb.shape[0];
    PyObject *arr = new_array(n, "bool", &out);
    if (arr == NULL) {
        PyBuffer_Release(&rb);
        return NULL;
    }
    uint8_t *dst = (uint8_t *)out.buf;
    const char *src = (const char *)rb.buf;
    for (Py_ssize_t k = 0; k < n; k++) {
        uint64_t r;
        memcpy(&r, src + k * rb.strides[0], sizeof r);
        dst[k] = r >= t;
    }
    PyBuffer_Release(&out);
    PyBuffer_Release(&rb);
    return arr;
}

PyDoc_STRVAR(threshold_for_doc,
"threshold_for(p, precision=None)\n--\n\n"
"Rejection threshold T for sampling probability p in [2**-56, 1].\n"
"C twin of stethoscope.native.sampling.threshold_for.");

static PyObject *py_threshold_for(PyObject *mod, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"p", "precision", NULL};
    PyObject *pobj, *precobj = Py_None;
    (void)mod;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:threshold_for", kwlist, &pobj, &precobj))
        return NULL;
    if (PyUnicode_Check(pobj) || PyBytes_Check(pobj)) {
        PyErr_SetString(PyExc_TypeError, "p must be a number");
        return NULL;
    }
    double p = PyFloat_AsDouble(pobj);
    if (p == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(p >= 0x1p-56 && p <= 1.0)) {
        PyErr_SetString(PyExc_ValueError, "a sampling probability must be in [2**-56, 1]");
        return NULL;
    }
    if (precobj == Py_None) {
        /* T = 2**56 - round_half_even(p * 2**56), exact: p * 2**56 is a double */
        double q = nearbyint(ldexp(p, 56));
        return PyLong_FromUnsignedLongLong(MAX_THRESHOLD - (uint64_t)q);
    }
    PyObject *pi = PyNumber_Index(precobj);
    if (pi == NULL)
        return NULL;
    long precision = PyLong_AsLong(pi);
    Py_DECREF(pi);
    if (precision == -1 && PyErr_Occurred())
        return NULL;
    if (precision < 1 || precision > 13) {
        PyErr_SetString(PyExc_ValueError, "precision must be in [1, 13] hex digits");
        return NULL;
    }
    if (p == 1.0)
        return PyLong_FromLong(0);
    int e;
    (void)frexp(p, &e);
    /* Python's e // -4 */
    long adj = e >= 0 ? -((e + 3) / 4) : (-e) / 4;
    long prec = precision + adj;
    if (prec > 12)
        prec = 12;
    if (prec < 1)
        prec = 1;
    double rp = 2.0 - p;
    rp += ldexp(0.5, (int)(-4 * prec));
    uint64_t digits;
    if (rp >= 2.0) {
        digits = MANT_MASK; /* thirteen f digits */
    } else {
        uint64_t bits;
        memcpy(&bits, &rp, sizeof bits);
        digits = bits & MANT_MASK;
    }
    uint64_t t = (digits >> (4 * (13 - prec))) << (4 * (14 - prec));
    return PyLong_FromUnsignedLongLong(t);
}

PyDoc_STRVAR(threshold_hex_doc,
"threshold_hex(threshold)\n--\n\n"
"The tracestate th value of a threshold: 14 hex digits, trailing zeros removed.\n"
"C twin of stethoscope.native.sampling.threshold_hex.");

static PyObject *py_threshold_hex(PyObject *mod, PyObject *arg)
{
    uint64_t t;
    char buf[15];
    (void)mod;
    if (get_threshold(arg, &t) < 0)
        return NULL;
    if (t == 0)
        return PyUnicode_FromString("0");
    static const char hexd[] = "0123456789abcdef";
    for (int i = 0; i < 14; i++)
        buf[i] = hexd[(t >> (4 * (13 - i))) & 0xf];
    int n = 14;
    while (buf[n - 1] == '0')
        n--;
    return PyUnicode_FromStringAndSize(buf, n);
}

PyDoc_STRVAR(parse_threshold_hex_doc,
"parse_threshold_hex(th)\n--\n\n"
"The threshold of a tracestate th value (1 to 14 lowercase hex digits).\n"
"C twin of stethoscope.native.sampling.parse_threshold_hex.");

static PyObject *py_parse_threshold_hex(PyObject *mod, PyObject *arg)
{
    (void)mod;
    if (!PyUnicode_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "th must be str, not %.100s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(arg, &n);
    if (s == NULL)
        return NULL;
    if (n < 1 || n > 14)
        goto bad;
    uint64_t t = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        char ch = s[i];
        int x = (ch >= '0' && ch <= '9') ? ch - '0' : (ch >= 'a' && ch <= 'f') ? ch - 'a' + 10 : -1;
        if (x < 0)
            goto bad;
        t = (t << 4) | (uint64_t)x;
    }
    return PyLong_FromUnsignedLongLong(t << (4 * (14 - n)));
bad:
    PyErr_Format(PyExc_ValueError, "a th value is 1 to 14 lowercase hex digits, not %R", arg);
    return NULL;
}

PyDoc_STRVAR(adjusted_count_doc,
"adjusted_count(threshold)\n--\n\n"
"2**56 / (2**56 - threshold): how many items one kept item stands for.\n"
"C twin of stethoscope.native.sampling.adjusted_count.");

static PyObject *py_adjusted_count(PyObject *mod, PyObject *arg)
{
    uint64_t t;
    (void)mod;
    if (get_threshold(arg, &t) < 0)
        return NULL;
    return PyFloat_FromDouble((double)MAX_THRESHOLD / (double)(MAX_THRESHOLD - t));
}

/* ------------------------------------------------------------------------ */
/* One prediction: ModelMonitor.record's hot path in one call               */

/* Words of a row accumulator (a uint64 block made by sketch.py RowStats; the
 * twin documents each field). f = float64 bits. */
#define ROW_MAGIC UINT64_C(0x5354485230574131) /* "STHR0WA1" */
enum {
    RW_MAGIC, RW_NB, RW_MIN_U /* f */, RW_BOOST1 /* f */, RW_RNG, RW_EVENTS, RW_KEPT, RW_EXPECTED /* f */,
    RW_LAT_N, RW_LAT_SUM /* f */, RW_LAT_MIN /* f */, RW_LAT_MAX /* f */, RW_SIG_N, RW_SIG_MEAN /* f */,
    RW_SIG_M2 /* f */, RW_REQUESTS, RW_HEADER /* bounds (f) then counts follow */
};
#define ROW_MAX_BOUNDS 4096

/* Codes of record_row (the twin has the same constants). */
#define ROW_SLOW (-1)          /* features not a list, tuple or float buffer: convert and call again */
#define ROW_WRONG_TYPE (-2)    /* a feature value is no number, or prediction is neither number nor str */
#define ROW_WRONG_SHAPE (-3)   /* features are not d values in one dimension */
#define ROW_KEPT 1
#define ROW_BOOSTED 2
#define ROW_BAD_PREDICTION 4
#define ROW_BAD_CONFIDENCE 8
#define ROW_BAD_LATENCY 16
#define ROW_LABEL 32
#define ROW_NONFINITE_UNIT 64  /* times the number of non-finite feature values */

static inline double acc_f(const uint64_t *a, int k)
{
    double x;
    memcpy(&x, &a[k], sizeof x);
    return x;
}

static inline void acc_set_f(uint64_t *a, int k, double x)
{
    memcpy(&a[k], &x, sizeof x);
}

/* A number as a double: 1 on success, 0 when x is no number (never an error set).
 * Exact int and float first; then anything with __float__/__index__ except text. */
static inline int number_of(PyObject *x, double *out)
{
    if (PyFloat_CheckExact(x)) {
        *out = PyFloat_AS_DOUBLE(x);
        return 1;
    }
    if (PyUnicode_Check(x) || PyBytes_Check(x) || PyByteArray_Check(x))
        return 0;
    PyNumberMethods *nb = Py_TYPE(x)->tp_as_number;
    if (!PyFloat_Check(x) && !PyLong_Check(x) && (nb == NULL || (nb->nb_float == NULL && nb->nb_index == NULL)))
        return 0;
    double v = PyFloat_AsDouble(x);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *out = v;
    return 1;
}

/* splitmix64 (Steele, Lea, Flood 2014), top 56 bits: randomness of rows without a request id. */
static inline uint64_t next_randomness(uint64_t *state)
{
    uint64_t z = (*state += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return (z ^ (z >> 31)) >> 8;
}

static inline uint64_t threshold_of(double p)
{
    if (!(p >= 0x1p-56))
        p = 0x1p-56;
    else if (p > 1.0)
        p = 1.0;
    return MAX_THRESHOLD - (uint64_t)nearbyint(ldexp(p, 56));
}

/* The general path of record_one: zero, an empty range or a window move. */
static NOINLINE int record_general(Hist *h, int64_t c, double v, uint64_t *tmp)
{
    Col col;
    if (col_init(h, c, &col) < 0)
        return -1;
    return record(h, &col, c, v, tmp);
}

/* One finite value into column c: the common case inline, the rest in record_general. */
static inline ALWAYS_INLINE int record_one(Hist *h, int64_t c, double v, uint64_t *tmp)
{
    int s = h->scale[c];
    double a = fabs(v);
    if (a > h->zt && s >= MIN_SCALE && s <= MAX_SCALE) {
        int r = v < 0.0;
        int64_t idx = map_index(a, s, s > 0 ? scale_factor[s] : 0.0);
        int64_t lo = h->offset[r][c];
        if (lo != EMPTY_OFFSET && (uint64_t)(idx - lo) < (uint64_t)h->m) {
            h->count[c]++;
            h->sum[c] += v;
            if (v < h->mn[c])
                h->mn[c] = v;
            if (v > h->mx[c])
                h->mx[c] = v;
            h->counts[r][c * h->m + floor_mod(idx, h->m)]++;
            return 0;
        }
    }
    return record_general(h, c, v, tmp); /* also reports a scale out of range (cols_init) */
}

static NOINLINE int ingest_row_f64(Hist *h, const double *row, Py_ssize_t stride, uint64_t *tmp, int *nonfinite)
{
    int bad = 0; /* a local: a store through *nonfinite could alias the state's int32 arrays */
    for (int64_t c = 0; c < h->d; c++) {
        double v;
        memcpy(&v, (const char *)row + c * stride, sizeof v);
        if (!isfinite(v))
            bad++;
        else if (record_one(h, c, v, tmp) < 0)
            return -1;
    }
    *nonfinite += bad;
    return 0;
}

static NOINLINE int ingest_row_f32(Hist *h, const char *row, Py_ssize_t stride, uint64_t *tmp, int *nonfinite)
{
    int bad = 0;
    for (int64_t c = 0; c < h->d; c++) {
        float f;
        memcpy(&f, row + c * stride, sizeof f);
        double v = (double)f;
        if (!isfinite(v))
            bad++;
        else if (record_one(h, c, v, tmp) < 0)
            return -1;
    }
    *nonfinite += bad;
    return 0;
}

PyDoc_STRVAR(record_row_doc,
"record_row(features, state, prediction, confidence, latency, request_id, outputs, stats, p, t, u=None, /)\n--\n\n"
"One prediction into the monitor's sketches and counters; returns an int code.\n"
"C twin of stethoscope.native.sketch.record_row, whose docstring states the rules.");

static PyObject *py_record_row(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 10 && nargs != 11) {
        PyErr_Format(PyExc_TypeError, "record_row() takes 10 or 11 positional arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *features = args[0], *state = args[1], *prediction = args[2], *confidence = args[3];
    PyObject *latency = args[4], *request_id = args[5], *outputs = args[6], *stats = args[7];
    PyObject *u_arg = nargs == 11 ? args[10] : Py_None;
    double p = PyFloat_AsDouble(args[8]);
    if (p == -1.0 && PyErr_Occurred())
        return NULL;
    uint64_t t = PyLong_AsUnsignedLongLong(args[9]);
    if (t == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    if (t >= MAX_THRESHOLD) {
        PyErr_SetString(PyExc_ValueError, "t must be a threshold in [0, 2**56)");
        return NULL;
    }

    /* 1. features: a list/tuple of numbers or a 1-D float64/float32 buffer */
    double stack_row[STACK_COLS];
    double *row = stack_row;
    Py_buffer fb;
    int have_fb = 0, itemsize = 8, code = 0, nonfinite = 0;
    Py_ssize_t d, stride = sizeof(double);
    const char *base;
    stack_row[0] = 0.0;
    if (PyList_CheckExact(features) || PyTuple_CheckExact(features)) {
        d = PySequence_Fast_GET_SIZE(features);
        PyObject **items = PySequence_Fast_ITEMS(features);
        if (d > STACK_COLS && (row = PyMem_Malloc((size_t)d * sizeof *row)) == NULL)
            return PyErr_NoMemory();
        for (Py_ssize_t c = 0; c < d; c++) {
            if (!number_of(items[c], &row[c])) {
                code = ROW_WRONG_TYPE;
                break;
            }
        }
        base = (const char *)row;
    } else if (PyObject_CheckBuffer(features) &&
               PyObject_GetBuffer(features, &fb, PyBUF_STRIDES | PyBUF_FORMAT) == 0) {
        have_fb = 1;
        itemsize = float_kind(fb.format);
        if (itemsize == 0 || itemsize != fb.itemsize) {
            code = ROW_SLOW;
        } else if (fb.ndim != 1) {
            code = ROW_WRONG_SHAPE;
        }
        d = fb.ndim == 1 ? fb.shape[0] : 0;
        stride = fb.ndim == 1 ? fb.strides[0] : 0;
        base = (const char *)fb.buf;
    } else {
        PyErr_Clear();
        return PyLong_FromLong(ROW_SLOW);
    }

    /* 2. prediction: a number, or a str (a class label) */
    double pnum = NAN, conf = NAN, u = NAN, lat = NAN;
    if (code == 0) {
        if (PyUnicode_Check(prediction))
            code |= ROW_LABEL;
        else if (!number_of(prediction, &pnum))
            code = ROW_WRONG_TYPE;
        else if (!isfinite(pnum)) {
            code |= ROW_BAD_PREDICTION;
            pnum = NAN;
        }
    }

    Py_buffer sb, ob, ab;
    Hist h, ho;
    int loaded = 0;
    PyObject *result = NULL;
    if (code < 0)
        goto done_code;
    if (hist_load(state, -1, &sb, &h) < 0)
        goto done;
    loaded = 1;
    if (h.d != (int64_t)d) { /* a row of another length than the state's columns */
        code = ROW_WRONG_SHAPE;
        goto done_code;
    }
    if (hist_load(outputs, 2, &ob, &ho) < 0)
        goto done;
    loaded = 2;
    if (PyObject_GetBuffer(stats, &ab, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        goto done;
    loaded = 3;
    uint64_t *acc = (uint64_t *)ab.buf;
    uint64_t nb = 0;
    if (ab.len >= RW_HEADER * 8 && ((uintptr_t)acc & 7) == 0) {
        memcpy(&nb, &acc[RW_NB], sizeof nb);
    }
    if (ab.len < RW_HEADER * 8 || ((uintptr_t)acc & 7) != 0 || acc[RW_MAGIC] != ROW_MAGIC || nb > ROW_MAX_BOUNDS ||
        (uint64_t)ab.len != (RW_HEADER + 2 * nb + 1) * 8) {
        PyErr_SetString(PyExc_ValueError, "stats must be a RowStats block");
        goto done;
    }

    /* 3. confidence (None or a number in [0, 1]) and latency (None or a number >= 0) */
    if (confidence != Py_None) {
        if (number_of(confidence, &conf) && conf >= 0.0 && conf <= 1.0) {
            u = 1.0 - conf;
        } else {
            conf = NAN;
            code |= ROW_BAD_CONFIDENCE;
        }
    }
    if (u_arg != Py_None) {
        double uu;
        if (number_of(u_arg, &uu) && uu >= 0.0 && uu <= 1.0)
            u = uu;
    }
    if (latency != Py_None) {
        if (!(number_of(latency, &lat) && lat >= 0.0 && lat < INFINITY)) {
            lat = NAN;
            code |= ROW_BAD_LATENCY;
        }
    }

    /* 4. randomness: the request id's, or the accumulator's generator */
    uint64_t r;
    if (request_id == Py_None) {
        r = next_randomness(&acc[RW_RNG]);
    } else {
        PyObject *text;
        if (PyUnicode_Check(request_id)) {
            text = request_id;
            Py_INCREF(text);
        } else {
            text = PyObject_Str(request_id);
        }
        if (text == NULL)
            goto done;
        Py_ssize_t n;
        const char *utf8 = PyUnicode_AsUTF8AndSize(text, &n);
        if (utf8 == NULL) { /* lone surrogates: encode as Python's surrogatepass does */
            PyErr_Clear();
            PyObject *bytes = PyUnicode_AsEncodedString(text, "utf-8", "surrogatepass");
            if (bytes == NULL) {
                Py_DECREF(text);
                goto done;
            }
            r = id_randomness((const uint8_t *)PyBytes_AS_STRING(bytes), (size_t)PyBytes_GET_SIZE(bytes));
            Py_DECREF(bytes);
        } else {
            r = id_randomness((const uint8_t *)utf8, (size_t)n);
        }
        Py_DECREF(text);
    }

    /* 5. the sketches: features, then prediction and confidence */
    uint64_t tmp[STACK_TMP];
    uint64_t *tmpp = tmp;
    if ((h.m > STACK_TMP || ho.m > STACK_TMP) &&
        (tmpp = PyMem_Malloc((size_t)(h.m > ho.m ? h.m : ho.m) * sizeof *tmpp)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int rc = itemsize == 8 ? ingest_row_f64(&h, (const double *)base, stride, tmpp, &nonfinite)
                           : ingest_row_f32(&h, base, stride, tmpp, &nonfinite);
    if (rc == 0 && isfinite(pnum))
        rc = record_one(&ho, 0, pnum, tmpp);
    if (rc == 0 && isfinite(conf))
        rc = record_one(&ho, 1, conf, tmpp);
    if (tmpp != tmp)
        PyMem_Free(tmpp);
    if (rc < 0)
        goto done;

    /* 6. latency histogram (explicit bounds, upper-inclusive like numpy.searchsorted side=left) */
    if (isfinite(lat)) {
        const uint64_t *bw = acc + RW_HEADER;
        uint64_t k = 0;
        while (k < nb) {
            double b;
            memcpy(&b, &bw[k], sizeof b);
            if (!(b < lat))
                break;
            k++;
        }
        acc[RW_HEADER + nb + k]++;
        acc[RW_LAT_N]++;
        acc_set_f(acc, RW_LAT_SUM, acc_f(acc, RW_LAT_SUM) + lat);
        if (lat < acc_f(acc, RW_LAT_MIN))
            acc_set_f(acc, RW_LAT_MIN, lat);
        if (lat > acc_f(acc, RW_LAT_MAX))
            acc_set_f(acc, RW_LAT_MAX, lat);
    }

    /* 7. the signal the sampler's allocation weighs by variance (Welford) */
    double sig = isfinite(pnum) ? pnum : conf;
    if (isfinite(sig)) {
        uint64_t n = ++acc[RW_SIG_N];
        double mean = acc_f(acc, RW_SIG_MEAN);
        double delta = sig - mean;
        mean += delta / (double)n;
        acc_set_f(acc, RW_SIG_MEAN, mean);
        acc_set_f(acc, RW_SIG_M2, acc_f(acc, RW_SIG_M2) + delta * (sig - mean));
    }

    /* 8. the sampling decision: keep iff r >= T, T from p (boosted when uncertain) */
    double p_eff = p;
    uint64_t t_eff = t;
    if (u >= acc_f(acc, RW_MIN_U)) {
        p_eff = p * (1.0 + acc_f(acc, RW_BOOST1) * u);
        if (p_eff > 1.0)
            p_eff = 1.0;
        t_eff = threshold_of(p_eff);
        code |= ROW_BOOSTED;
    }
    acc[RW_REQUESTS]++;
    acc[RW_EVENTS]++;
    acc_set_f(acc, RW_EXPECTED, acc_f(acc, RW_EXPECTED) + p_eff);
    if (r >= t_eff) {
        acc[RW_KEPT]++;
        code |= ROW_KEPT;
    }
    code += ROW_NONFINITE_UNIT * nonfinite;
done_code:
    result = PyLong_FromLong(code);
done:
    if (loaded >= 3)
        PyBuffer_Release(&ab);
    if (loaded >= 2)
        PyBuffer_Release(&ob);
    if (loaded >= 1)
        PyBuffer_Release(&sb);
    if (have_fb)
        PyBuffer_Release(&fb);
    if (row != stack_row)
        PyMem_Free(row);
    return result;
}

/* ------------------------------------------------------------------------ */
/* Module                                                                   */

static PyMethodDef sketch_methods[] = {
    {"exphist_update", (PyCFunction)(void (*)(void))py_exphist_update, METH_VARARGS | METH_KEYWORDS,
     exphist_update_doc},
    {"exphist_update_row", (PyCFunction)(void (*)(void))py_exphist_update_row, METH_FASTCALL,
     exphist_update_row_doc},
    {"record_row", (PyCFunction)(void (*)(void))py_record_row, METH_FASTCALL, record_row_doc},
    {"randomness_from_ids", py_randomness_from_ids, METH_O, randomness_from_ids_doc},
    {"sample_mask", (PyCFunction)(void (*)(void))py_sample_mask, METH_FASTCALL, sample_mask_doc},
    {"threshold_for", (PyCFunction)(void (*)(void))py_threshold_for, METH_VARARGS | METH_KEYWORDS,
     threshold_for_doc},
    {"threshold_hex", py_threshold_hex, METH_O, threshold_hex_doc},
    {"parse_threshold_hex", py_parse_threshold_hex, METH_O, parse_threshold_hex_doc},
    {"adjusted_count", py_adjusted_count, METH_O, adjusted_count_doc},
    {NULL, NULL, 0, NULL}};

PyDoc_STRVAR(module_doc,
"C kernels for per-feature exponential histograms and consistent probability sampling.\n\n"
"Twins: stethoscope.native.sketch and stethoscope.native.sampling (same names, same\n"
"results). ExpHistogramState and ExpHistogramPoint are the twin module's classes.");

static struct PyModuleDef sketch_module = {
    PyModuleDef_HEAD_INIT, "stethoscope._sketch", module_doc, -1, sketch_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__sketch(void)
{
    /* 1/ln 2 from the C library at run time, exactly as Python computes it */
    volatile double two = 2.0;
    double log2e = 1.0 / log(two);
    for (int s = 0; s <= MAX_SCALE; s++)
        scale_factor[s] = ldexp(log2e, s);

    PyObject *m = PyModule_Create(&sketch_module);
    if (m == NULL)
        return NULL;
    str_block = PyUnicode_InternFromString("_block");
    if (str_block == NULL)
        goto fail;
    if (PyModule_AddIntConstant(m, "MIN_SCALE", MIN_SCALE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SCALE", MAX_SCALE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_MAX_SIZE", MAX_MAX_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "EMPTY_OFFSET", EMPTY_OFFSET) < 0 ||
        PyModule_AddIntConstant(m, "ROW_SLOW", ROW_SLOW) < 0 ||
        PyModule_AddIntConstant(m, "ROW_WRONG_TYPE", ROW_WRONG_TYPE) < 0 ||
        PyModule_AddIntConstant(m, "ROW_WRONG_SHAPE", ROW_WRONG_SHAPE) < 0 ||
        PyModule_AddIntConstant(m, "ROW_KEPT", ROW_KEPT) < 0 ||
        PyModule_AddIntConstant(m, "ROW_BOOSTED", ROW_BOOSTED) < 0 ||
        PyModule_AddIntConstant(m, "ROW_BAD_PREDICTION", ROW_BAD_PREDICTION) < 0 ||
        PyModule_AddIntConstant(m, "ROW_BAD_CONFIDENCE", ROW_BAD_CONFIDENCE) < 0 ||
        PyModule_AddIntConstant(m, "ROW_BAD_LATENCY", ROW_BAD_LATENCY) < 0 ||
        PyModule_AddIntConstant(m, "ROW_LABEL", ROW_LABEL) < 0 ||
        PyModule_AddIntConstant(m, "ROW_NONFINITE_UNIT", ROW_NONFINITE_UNIT) < 0)
        goto fail;
    PyObject *mt = PyLong_FromUnsignedLongLong(MAX_THRESHOLD);
    if (mt == NULL || PyModule_AddObject(m, "MAX_THRESHOLD", mt) < 0) {
        Py_XDECREF(mt);
        goto fail;
    }
    /* the state classes are shared with the twin: re-export them */
    PyObject *twin = PyImport_ImportModule("stethoscope.native.sketch");
    if (twin == NULL)
        goto fail;
    static const char *const shared[] = {"ExpHistogramState", "ExpHistogramPoint", "RowStats", "RowTotals"};
    for (size_t i = 0; i < sizeof shared / sizeof *shared; i++) {
        PyObject *obj = PyObject_GetAttrString(twin, shared[i]);
        if (obj == NULL || PyModule_AddObject(m, shared[i], obj) < 0) {
            Py_XDECREF(obj);
            Py_DECREF(twin);
            goto fail;
        }
    }
    Py_DECREF(twin);
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
