/*
 * stethoscope._native: OTLP metrics protobuf to ClickHouse RowBinary.
 *
 * C twin of native/otlp_rowbinary.py (the reference; its docstring lists the
 * encoding rules). encode_metrics(data) parses an ExportMetricsServiceRequest
 * (opentelemetry-proto metrics v1) straight from the wire bytes and returns
 * {kind: (rows, rowbinary_bytes)} for every metric kind with at least one row,
 * with byte-identical output to the Python twin for every valid request.
 * encode_metrics(data, state) also applies a per-metric cardinality limit
 * (CardinalityState; rules in exporters/cardinality.py): each point's map is
 * hashed as written, the metric's points are decided on under the state's
 * lock once the metric ends, and the maps of those past the limit are
 * replaced by {otel.metric.overflow: true} in the output.
 *
 * Design:
 *  - No protobuf library: a small bounds-checked wire reader (Rd). Every read
 *    checks the remaining length; every failure sets a message and returns -1.
 *  - Fields may come in any order (schema_url and aggregation_temporality come
 *    after the repeated children they apply to), so each message is walked
 *    twice where needed: a cheap pass that reads scalars and skips children,
 *    then a pass over the children.
 *  - Protobuf merge semantics: a singular sub-message seen several times is
 *    parsed as the concatenation of its occurrences (exactly what protobuf
 *    defines), a oneof keeps its last member (and merges the run of that
 *    member after the last other member), scalars keep the last value.
 *  - Attribute values are rendered into an arena; attribute lists live on a
 *    stack of entries, sorted (stable) and de-duplicated (first wins) when
 *    emitted.
 *  - All parsing happens without the GIL on C buffers; Python objects are only
 *    built at the end.
 *  - Message nesting is limited to 100 levels below the request, like upb.
 *  - Deliberate difference from protobuf: a known field with the wrong wire
 *    type is an error here (protobuf would keep it as an unknown field).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>

#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__APPLE__)
#include <xlocale.h>
#endif

#if defined(LC_NUMERIC_MASK) && !defined(_WIN32)
#define HAVE_USELOCALE 1
static locale_t c_numeric_locale = (locale_t)0;
#endif

#define MAX_DEPTH 100
#define NKINDS 5

enum { K_GAUGE = 0, K_SUM, K_HIST, K_EXPH, K_SUMMARY };
static const char *const kind_names[NKINDS] = {
    "gauge", "sum", "histogram", "exponential_histogram", "summary"};

/* ------------------------------------------------------------------------ */
/* Context, buffers                                                          */

typedef struct {
    uint8_t *p;
    size_t n, cap;
} Buf;

typedef struct {
    const uint8_t *p;
    size_t n;
} Span;

/* One attribute: key points into the input (or a merge block); the value is
 * either a pointer (v != NULL) or an offset into the arena. */
typedef struct {
    const uint8_t *k;
    size_t kn;
    const uint8_t *v;
    size_t voff, vn;
} Attr;

typedef struct {
    uint64_t time;
    uint64_t value; /* bits of the double */
    Span span_id, trace_id;
} Exemplar;

typedef struct {
    const uint8_t *data;
    size_t size;
    char err[320];
    int failed;
    int oom;

    Buf out[NKINDS];
    size_t rows[NKINDS];
    int order[NKINDS];
    int norder;
    int seen[NKINDS];

    Buf discard;    /* output of overwritten oneof members (validated only) */
    Buf arena;      /* rendered attribute values */
    Buf res_head;   /* ResourceAttributes + ResourceSchemaUrl */
    Buf scope_head; /* ScopeName .. ServiceName */
    Buf mhead;      /* res_head + scope_head + metric name/description/unit */
    Buf service;    /* rendered service.name */
    Buf exmaps;     /* exemplar FilteredAttributes maps of one point */

    Attr *attrs;
    size_t nattrs, capattrs;
    Attr *sorttmp;
    size_t capsort;

    Exemplar *ex;
    size_t capex;

    uint8_t **blocks; /* merged sub-message copies */
    size_t nblocks, capblocks;

    /* Cardinality limiting (only with a CardinalityState): the attribute maps
     * of the current metric's points, decided on when the metric ends. */
    struct LimState *lim;
    int lim_on;
    struct Pend *pend;
    size_t npend, cappend;
    Buf scratch;
} Ctx;

static const uint8_t empty_bytes[1] = {0};

static int fail_at(Ctx *c, const uint8_t *at, const char *fmt, ...)
{
    if (c->failed)
        return -1;
    c->failed = 1;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n < sizeof c->err) {
        if (at && at >= c->data && at <= c->data + c->size)
            snprintf(c->err + n, sizeof c->err - (size_t)n, " at offset %zu",
                     (size_t)(at - c->data));
        else if (at)
            snprintf(c->err + n, sizeof c->err - (size_t)n,
                     " (inside a repeated singular sub-message)");
    }
    return -1;
}

static int oom(Ctx *c)
{
    if (!c->failed) {
        c->failed = 1;
        c->oom = 1;
        snprintf(c->err, sizeof c->err, "out of memory");
    }
    return -1;
}

#define TRY(x)                                                                 \
    do {                                                                       \
        if ((x) < 0)                                                           \
            return -1;                                                         \
    } while (0)

static int buf_grow(Ctx *c, Buf *b, size_t extra)
{
    size_t need = b->n + extra;
    if (need < b->n)
        return oom(c);
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need) {
        if (cap > SIZE_MAX / 2)
            return oom(c);
        cap *= 2;
    }
    uint8_t *p = (uint8_t *)PyMem_RawRealloc(b->p, cap);
    if (!p)
        return oom(c);
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int reserve(Ctx *c, Buf *b, size_t extra)
{
    if (b->cap - b->n >= extra)
        return 0;
    return buf_grow(c, b, extra);
}

static inline uint8_t *put_varint(uint8_t *d, uint64_t v)
{
    while (v >= 0x80) {
        *d++ = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    *d++ = (uint8_t)v;
    return d;
}

static inline void put_le64(uint8_t *d, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        d[i] = (uint8_t)(v >> (8 * i));
}

static inline void put_le32(uint8_t *d, uint32_t v)
{
    d[0] = (uint8_t)v;
    d[1] = (uint8_t)(v >> 8);
    d[2] = (uint8_t)(v >> 16);
    d[3] = (uint8_t)(v >> 24);
}

static inline uint64_t get_le64(const uint8_t *s)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | s[i];
    return v;
}

static inline int b_varint(Ctx *c, Buf *b, uint64_t v)
{
    TRY(reserve(c, b, 10));
    b->n = (size_t)(put_varint(b->p + b->n, v) - b->p);
    return 0;
}

static inline int b_u64(Ctx *c, Buf *b, uint64_t v)
{
    TRY(reserve(c, b, 8));
    put_le64(b->p + b->n, v);
    b->n += 8;
    return 0;
}

static inline int b_u32(Ctx *c, Buf *b, uint32_t v)
{
    TRY(reserve(c, b, 4));
    put_le32(b->p + b->n, v);
    b->n += 4;
    return 0;
}

static inline int b_u8(Ctx *c, Buf *b, uint8_t v)
{
    TRY(reserve(c, b, 1));
    b->p[b->n++] = v;
    return 0;
}

static inline int b_raw(Ctx *c, Buf *b, const void *src, size_t n)
{
    if (!n)
        return 0;
    TRY(reserve(c, b, n));
    memcpy(b->p + b->n, src, n);
    b->n += n;
    return 0;
}

/* RowBinary String: varint length + bytes. */
static inline int b_str(Ctx *c, Buf *b, const uint8_t *s, size_t n)
{
    if (n > SIZE_MAX - 10)
        return oom(c);
    TRY(reserve(c, b, n + 10));
    uint8_t *d = put_varint(b->p + b->n, n);
    if (n)
        memcpy(d, s, n);
    b->n = (size_t)(d - b->p) + n;
    return 0;
}

static void buf_free(Buf *b)
{
    PyMem_RawFree(b->p);
    b->p = NULL;
    b->n = b->cap = 0;
}

static int attrs_push(Ctx *c, const Attr *a)
{
    if (c->nattrs == c->capattrs) {
        size_t cap = c->capattrs ? c->capattrs * 2 : 64;
        if (cap > SIZE_MAX / sizeof(Attr))
            return oom(c);
        Attr *p = (Attr *)PyMem_RawRealloc(c->attrs, cap * sizeof(Attr));
        if (!p)
            return oom(c);
        c->attrs = p;
        c->capattrs = cap;
    }
    c->attrs[c->nattrs++] = *a;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Wire reader                                                               */

typedef struct {
    const uint8_t *p, *e;
} Rd;

static inline Rd rd_of(Span s)
{
    Rd r = {s.p, s.p + s.n};
    return r;
}

static int rd_varint_slow(Ctx *c, Rd *r, uint64_t *v)
{
    const uint8_t *p = r->p;
    uint64_t x = 0;
    *v = 0;
    for (int i = 0; i < 10; i++) {
        if (p + i >= r->e)
            return fail_at(c, p, "truncated varint");
        uint8_t b = p[i];
        x |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            *v = x;
            r->p = p + i + 1;
            return 0;
        }
    }
    return fail_at(c, p, "varint longer than 10 bytes");
}

static inline int rd_varint(Ctx *c, Rd *r, uint64_t *v)
{
    if (r->p < r->e && *r->p < 0x80) {
        *v = *r->p++;
        return 0;
    }
    return rd_varint_slow(c, r, v);
}

static inline int rd_tag(Ctx *c, Rd *r, uint32_t *field, uint32_t *wt)
{
    uint64_t t;
    const uint8_t *at = r->p;
    *field = 0;
    *wt = 0;
    TRY(rd_varint(c, r, &t));
    if (t > 0xffffffffu)
        return fail_at(c, at, "field tag out of range");
    *field = (uint32_t)(t >> 3);
    *wt = (uint32_t)(t & 7);
    if (*field == 0)
        return fail_at(c, at, "invalid field number 0");
    return 0;
}

static inline int rd_fixed64(Ctx *c, Rd *r, uint64_t *v)
{
    *v = 0;
    if (r->e - r->p < 8)
        return fail_at(c, r->p, "truncated fixed64");
    *v = get_le64(r->p);
    r->p += 8;
    return 0;
}

static inline int rd_bytes(Ctx *c, Rd *r, Span *s)
{
    const uint8_t *at = r->p;
    uint64_t n;
    s->p = empty_bytes;
    s->n = 0;
    TRY(rd_varint(c, r, &n));
    if (n > (uint64_t)(r->e - r->p))
        return fail_at(c, at, "length %llu exceeds the %zu bytes left",
                       (unsigned long long)n, (size_t)(r->e - r->p));
    s->p = r->p;
    s->n = (size_t)n;
    r->p += n;
    return 0;
}

static int skip_field(Ctx *c, Rd *r, uint32_t field, uint32_t wt, int depth);

static int skip_group(Ctx *c, Rd *r, uint32_t field, int depth)
{
    const uint8_t *start = r->p;
    if (depth > MAX_DEPTH)
        return fail_at(c, start, "message nesting deeper than %d levels", MAX_DEPTH);
    while (r->p < r->e) {
        uint32_t f, wt;
        const uint8_t *tp = r->p;
        TRY(rd_tag(c, r, &f, &wt));
        if (wt == 4) {
            if (f != field)
                return fail_at(c, tp, "end-group tag for field %u does not match field %u",
                               f, field);
            return 0;
        }
        TRY(skip_field(c, r, f, wt, depth + 1));
    }
    return fail_at(c, start, "unterminated group for field %u", field);
}

static int skip_field(Ctx *c, Rd *r, uint32_t field, uint32_t wt, int depth)
{
    uint64_t v;
    Span s;
    switch (wt) {
    case 0:
        return rd_varint(c, r, &v);
    case 1:
        if (r->e - r->p < 8)
            return fail_at(c, r->p, "truncated fixed64");
        r->p += 8;
        return 0;
    case 2:
        return rd_bytes(c, r, &s);
    case 3:
        return skip_group(c, r, field, depth);
    case 4:
        return fail_at(c, r->p, "unexpected end-group tag for field %u", field);
    case 5:
        if (r->e - r->p < 4)
            return fail_at(c, r->p, "truncated fixed32");
        r->p += 4;
        return 0;
    default:
        return fail_at(c, r->p, "invalid wire type %u for field %u", wt, field);
    }
}

static int wrong_wt(Ctx *c, const uint8_t *tp, uint32_t f, const char *msg, uint32_t wt)
{
    return fail_at(c, tp, "field %u of %s has wrong wire type %u", f, msg, wt);
}

#define EXPECT(W)                                                              \
    do {                                                                       \
        if (wt != (W))                                                         \
            return wrong_wt(c, tp, f, MSG, wt);                                \
    } while (0)

#define NEXT_TAG()                                                             \
    const uint8_t *tp = r.p;                                                   \
    uint32_t f, wt;                                                            \
    TRY(rd_tag(c, &r, &f, &wt))

static int utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (n - i >= 8) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ULL)) {
                i += 8;
                continue;
            }
        }
        uint8_t b = s[i];
        if (b < 0x80) {
            i++;
        } else if (b >= 0xC2 && b <= 0xDF) {
            if (n - i < 2 || (s[i + 1] & 0xC0) != 0x80)
                return 0;
            i += 2;
        } else if (b >= 0xE0 && b <= 0xEF) {
            if (n - i < 3)
                return 0;
            uint8_t b1 = s[i + 1], b2 = s[i + 2];
            if ((b1 & 0xC0) != 0x80 || (b2 & 0xC0) != 0x80)
                return 0;
            if (b == 0xE0 && b1 < 0xA0)
                return 0; /* overlong */
            if (b == 0xED && b1 >= 0xA0)
                return 0; /* surrogate */
            i += 3;
        } else if (b >= 0xF0 && b <= 0xF4) {
            if (n - i < 4)
                return 0;
            uint8_t b1 = s[i + 1], b2 = s[i + 2], b3 = s[i + 3];
            if ((b1 & 0xC0) != 0x80 || (b2 & 0xC0) != 0x80 || (b3 & 0xC0) != 0x80)
                return 0;
            if (b == 0xF0 && b1 < 0x90)
                return 0; /* overlong */
            if (b == 0xF4 && b1 >= 0x90)
                return 0; /* > U+10FFFF */
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

/* A string field: length-delimited, valid UTF-8. */
static inline int rd_string(Ctx *c, Rd *r, Span *s, const uint8_t *tp, uint32_t f,
                            const char *msg)
{
    TRY(rd_bytes(c, r, s));
    if (!utf8_valid(s->p, s->n))
        return fail_at(c, tp, "invalid UTF-8 in string field %u of %s", f, msg);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Merged singular sub-messages                                              */

static void blocks_release(Ctx *c, size_t mark)
{
    while (c->nblocks > mark)
        PyMem_RawFree(c->blocks[--c->nblocks]);
}

/* Walk the top level of a piece, checking only its framing. */
static int check_framing(Ctx *c, Span s, int depth)
{
    Rd r = rd_of(s);
    while (r.p < r.e) {
        uint32_t f, wt;
        TRY(rd_tag(c, &r, &f, &wt));
        TRY(skip_field(c, &r, f, wt, depth));
    }
    return 0;
}

/* The occurrences of length-delimited `field` in `parent` from `from` (a tag
 * boundary) on, concatenated: how protobuf merges a repeated singular
 * sub-message. With one occurrence, that occurrence itself. */
static int merged(Ctx *c, Span parent, const uint8_t *from, uint32_t field, int depth,
                  Span *out)
{
    Rd r = {from, parent.p + parent.n};
    size_t count = 0, total = 0;
    Span first = {empty_bytes, 0};
    while (r.p < r.e) {
        uint32_t f, wt;
        TRY(rd_tag(c, &r, &f, &wt));
        if (f == field && wt == 2) {
            Span s;
            TRY(rd_bytes(c, &r, &s));
            if (!count)
                first = s;
            count++;
            total += s.n;
        } else {
            TRY(skip_field(c, &r, f, wt, depth));
        }
    }
    if (count <= 1) {
        *out = first;
        return 0;
    }
    if (c->nblocks == c->capblocks) {
        size_t cap = c->capblocks ? c->capblocks * 2 : 8;
        uint8_t **p = (uint8_t **)PyMem_RawRealloc(c->blocks, cap * sizeof(uint8_t *));
        if (!p)
            return oom(c);
        c->blocks = p;
        c->capblocks = cap;
    }
    uint8_t *blk = (uint8_t *)PyMem_RawMalloc(total ? total : 1);
    if (!blk)
        return oom(c);
    c->blocks[c->nblocks++] = blk;
    size_t n = 0;
    r.p = from;
    while (r.p < r.e) {
        uint32_t f, wt;
        TRY(rd_tag(c, &r, &f, &wt));
        if (f == field && wt == 2) {
            Span s;
            TRY(rd_bytes(c, &r, &s));
            /* each piece is parsed on its own by protobuf: check its framing */
            TRY(check_framing(c, s, depth));
            if (s.n)
                memcpy(blk + n, s.p, s.n);
            n += s.n;
        } else {
            TRY(skip_field(c, &r, f, wt, depth));
        }
    }
    out->p = blk;
    out->n = total;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Value rendering                                                           */

static size_t fmt_double(double v, char *out /* >= 40 bytes */)
{
    if (isnan(v)) {
        memcpy(out, "NaN", 4);
        return 3;
    }
    if (isinf(v)) {
        memcpy(out, v > 0 ? "+Inf" : "-Inf", 5);
        return 4;
    }
    int n = 0;
    for (int p = 1; p <= 17; p++) {
        n = snprintf(out, 40, "%.*g", p, v);
        if (strtod(out, NULL) == v)
            return (size_t)n;
    }
    n = snprintf(out, 40, "%.17g", v);
    return (size_t)n;
}

static size_t fmt_int(int64_t v, char *out /* >= 24 */)
{
    char tmp[24];
    size_t n = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    size_t o = 0;
    if (v < 0)
        out[o++] = '-';
    while (n)
        out[o++] = tmp[--n];
    return o;
}

static inline double bits_to_double(uint64_t b)
{
    double d;
    memcpy(&d, &b, 8);
    return d;
}

static inline uint64_t double_to_bits(double d)
{
    uint64_t b;
    memcpy(&b, &d, 8);
    return b;
}

static const char b64chars[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int put_base64(Ctx *c, Buf *b, const uint8_t *s, size_t n)
{
    size_t outn = (n / 3 + (n % 3 != 0)) * 4;
    TRY(reserve(c, b, outn));
    uint8_t *d = b->p + b->n;
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t x = ((uint32_t)s[i] << 16) | ((uint32_t)s[i + 1] << 8) | s[i + 2];
        *d++ = (uint8_t)b64chars[(x >> 18) & 63];
        *d++ = (uint8_t)b64chars[(x >> 12) & 63];
        *d++ = (uint8_t)b64chars[(x >> 6) & 63];
        *d++ = (uint8_t)b64chars[x & 63];
    }
    if (n - i == 1) {
        uint32_t x = (uint32_t)s[i] << 16;
        *d++ = (uint8_t)b64chars[(x >> 18) & 63];
        *d++ = (uint8_t)b64chars[(x >> 12) & 63];
        *d++ = '=';
        *d++ = '=';
    } else if (n - i == 2) {
        uint32_t x = ((uint32_t)s[i] << 16) | ((uint32_t)s[i + 1] << 8);
        *d++ = (uint8_t)b64chars[(x >> 18) & 63];
        *d++ = (uint8_t)b64chars[(x >> 12) & 63];
        *d++ = (uint8_t)b64chars[(x >> 6) & 63];
        *d++ = '=';
    }
    b->n = (size_t)(d - b->p);
    return 0;
}

static int put_json_str(Ctx *c, Buf *b, const uint8_t *s, size_t n)
{
    static const char hexd[] = "0123456789abcdef";
    if (n > (SIZE_MAX - 2) / 6)
        return oom(c);
    TRY(reserve(c, b, 6 * n + 2));
    uint8_t *d = b->p + b->n;
    *d++ = '"';
    for (size_t i = 0; i < n; i++) {
        uint8_t ch = s[i];
        if (ch >= 0x20 && ch != '"' && ch != '\\') {
            *d++ = ch;
            continue;
        }
        *d++ = '\\';
        switch (ch) {
        case '"':
            *d++ = '"';
            break;
        case '\\':
            *d++ = '\\';
            break;
        case '\n':
            *d++ = 'n';
            break;
        case '\r':
            *d++ = 'r';
            break;
        case '\t':
            *d++ = 't';
            break;
        case '\b':
            *d++ = 'b';
            break;
        case '\f':
            *d++ = 'f';
            break;
        default:
            *d++ = 'u';
            *d++ = '0';
            *d++ = '0';
            *d++ = (uint8_t)hexd[ch >> 4];
            *d++ = (uint8_t)hexd[ch & 15];
        }
    }
    *d++ = '"';
    b->n = (size_t)(d - b->p);
    return 0;
}

static int put_hex(Ctx *c, Buf *b, const uint8_t *s, size_t n)
{
    static const char hexd[] = "0123456789abcdef";
    if (n > (SIZE_MAX - 10) / 2)
        return oom(c);
    TRY(reserve(c, b, 2 * n + 10));
    uint8_t *d = put_varint(b->p + b->n, 2 * (uint64_t)n);
    for (size_t i = 0; i < n; i++) {
        *d++ = (uint8_t)hexd[s[i] >> 4];
        *d++ = (uint8_t)hexd[s[i] & 15];
    }
    b->n = (size_t)(d - b->p);
    return 0;
}

static int json_array(Ctx *c, Span arr, int depth);
static int json_kvlist(Ctx *c, Span kvl, int depth);

/* Render an AnyValue at message level `depth`. With json, append its JSON form
 * to the arena; otherwise set *val (pointer or arena slice) to its attribute
 * string form. */
static int render_any(Ctx *c, Span av, int depth, int json, Attr *val)
{
#define MSG "AnyValue"
    if (depth > MAX_DEPTH)
        return fail_at(c, av.p, "message nesting deeper than %d levels", MAX_DEPTH);
    Rd r = rd_of(av);

    /* Fast path: a lone string_value (the canonical common case). */
    if (!json && av.n >= 2 && av.p[0] == 0x0A) {
        Rd q = {av.p + 1, r.e};
        uint64_t n;
        if (rd_varint(c, &q, &n) == 0 && n == (uint64_t)(q.e - q.p)) {
            if (!utf8_valid(q.p, (size_t)n))
                return fail_at(c, av.p, "invalid UTF-8 in string field 1 of AnyValue");
            val->v = q.p;
            val->vn = (size_t)n;
            return 0;
        }
        if (c->failed)
            return -1;
    }

    /* Pass 1: which oneof member wins, and where its final run starts. */
    uint32_t lm = 0;
    const uint8_t *run = NULL;
    while (r.p < r.e) {
        NEXT_TAG();
        switch (f) {
        case 1:
        case 5:
        case 6:
        case 7:
            EXPECT(2);
            break;
        case 2:
        case 3:
        case 8:
            EXPECT(0);
            break;
        case 4:
            EXPECT(1);
            break;
        default:
            break;
        }
        if (f <= 8 && f != lm) {
            lm = f;
            run = tp;
        }
        TRY(skip_field(c, &r, f, wt, depth + 1));
    }

    /* Pass 2: validate everything, keep the last member's value. */
    Span sv = {empty_bytes, 0}, first = {empty_bytes, 0};
    uint64_t iv = 0, dv = 0;
    size_t nfinal = 0;
    r = rd_of(av);
    while (r.p < r.e) {
        NEXT_TAG();
        Span s;
        switch (f) {
        case 1:
            TRY(rd_string(c, &r, &s, tp, f, MSG));
            sv = s;
            break;
        case 7:
            TRY(rd_bytes(c, &r, &s));
            sv = s;
            break;
        case 2:
        case 3:
            TRY(rd_varint(c, &r, &iv));
            break;
        case 8: /* string_value_strindex (newer opentelemetry-proto) */
            TRY(rd_varint(c, &r, &iv));
            break;
        case 4:
            TRY(rd_fixed64(c, &r, &dv));
            break;
        case 5:
        case 6:
            TRY(rd_bytes(c, &r, &s));
            if (f == lm && tp >= run) {
                if (!nfinal)
                    first = s;
                nfinal++;
            } else { /* overwritten by a later member: validate only */
                size_t save = c->arena.n;
                TRY(f == 5 ? json_array(c, s, depth + 1) : json_kvlist(c, s, depth + 1));
                c->arena.n = save;
            }
            break;
        default:
            TRY(skip_field(c, &r, f, wt, depth + 1));
        }
    }

    Buf *a = &c->arena;
    size_t start = a->n;
    char tmp[48];
    size_t tn;
    switch (lm) {
    case 8: /* string_value_strindex: the twin renders the unhandled member as null */
        if (json)
            return b_raw(c, a, "null", 4);
        val->v = (const uint8_t *)"null";
        val->vn = 4;
        return 0;
    case 0:
        if (json)
            return b_raw(c, a, "null", 4);
        val->v = empty_bytes;
        val->vn = 0;
        return 0;
    case 1:
        if (json)
            return put_json_str(c, a, sv.p, sv.n);
        val->v = sv.p;
        val->vn = sv.n;
        return 0;
    case 2:
        if (json)
            return b_raw(c, a, iv ? "true" : "false", iv ? 4 : 5);
        val->v = (const uint8_t *)(iv ? "true" : "false");
        val->vn = iv ? 4 : 5;
        return 0;
    case 3:
        tn = fmt_int((int64_t)iv, tmp);
        TRY(b_raw(c, a, tmp, tn));
        break;
    case 4: {
        double d = bits_to_double(dv);
        tn = fmt_double(d, tmp);
        if (json && (isnan(d) || isinf(d)))
            TRY(put_json_str(c, a, (const uint8_t *)tmp, tn));
        else
            TRY(b_raw(c, a, tmp, tn));
        break;
    }
    case 7:
        if (json)
            TRY(b_u8(c, a, '"'));
        TRY(put_base64(c, a, sv.p, sv.n));
        if (json)
            TRY(b_u8(c, a, '"'));
        break;
    case 5:
    case 6: {
        size_t mark = c->nblocks;
        if (nfinal > 1)
            TRY(merged(c, av, run, lm, depth + 1, &first));
        int rc = lm == 5 ? json_array(c, first, depth + 1) : json_kvlist(c, first, depth + 1);
        blocks_release(c, mark);
        TRY(rc);
        break;
    }
    }
    if (!json) {
        val->v = NULL;
        val->voff = start;
        val->vn = a->n - start;
    }
    return 0;
#undef MSG
}

static int json_array(Ctx *c, Span arr, int depth)
{
#define MSG "ArrayValue"
    if (depth > MAX_DEPTH)
        return fail_at(c, arr.p, "message nesting deeper than %d levels", MAX_DEPTH);
    TRY(b_u8(c, &c->arena, '['));
    Rd r = rd_of(arr);
    int n = 0;
    while (r.p < r.e) {
        NEXT_TAG();
        if (f == 1) {
            EXPECT(2);
            Span s;
            TRY(rd_bytes(c, &r, &s));
            if (n++)
                TRY(b_u8(c, &c->arena, ','));
            TRY(render_any(c, s, depth + 1, 1, NULL));
        } else {
            TRY(skip_field(c, &r, f, wt, depth + 1));
        }
    }
    return b_u8(c, &c->arena, ']');
#undef MSG
}

/* Parse a KeyValue: its key and the (merged) span of its value. */
static int parse_kv_fields(Ctx *c, Span kv, int depth, Span *key, Span *val, int *has_val)
{
#define MSG "KeyValue"
    if (depth > MAX_DEPTH)
        return fail_at(c, kv.p, "message nesting deeper than %d levels", MAX_DEPTH);
    Rd r = rd_of(kv);
    size_t nv = 0;
    key->p = empty_bytes;
    key->n = 0;
    val->p = empty_bytes;
    val->n = 0;
    while (r.p < r.e) {
        NEXT_TAG();
        Span s;
        if (f == 1) {
            EXPECT(2);
            TRY(rd_string(c, &r, &s, tp, f, MSG));
            *key = s;
        } else if (f == 2) {
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            if (!nv)
                *val = s;
            nv++;
        } else {
            TRY(skip_field(c, &r, f, wt, depth + 1));
        }
    }
    *has_val = nv > 0;
    if (nv > 1)
        TRY(merged(c, kv, kv.p, 2, depth + 1, val));
    return 0;
#undef MSG
}

static int json_kvlist(Ctx *c, Span kvl, int depth)
{
#define MSG "KeyValueList"
    if (depth > MAX_DEPTH)
        return fail_at(c, kvl.p, "message nesting deeper than %d levels", MAX_DEPTH);
    TRY(b_u8(c, &c->arena, '{'));
    Rd r = rd_of(kvl);
    int n = 0;
    while (r.p < r.e) {
        NEXT_TAG();
        if (f == 1) {
            EXPECT(2);
            Span s, key, val;
            int has;
            TRY(rd_bytes(c, &r, &s));
            size_t mark = c->nblocks;
            int rc = parse_kv_fields(c, s, depth + 1, &key, &val, &has);
            if (rc == 0 && n++)
                rc = b_u8(c, &c->arena, ',');
            if (rc == 0)
                rc = put_json_str(c, &c->arena, key.p, key.n);
            if (rc == 0)
                rc = b_u8(c, &c->arena, ':');
            if (rc == 0) {
                if (has)
                    rc = render_any(c, val, depth + 2, 1, NULL);
                else
                    rc = b_raw(c, &c->arena, "null", 4);
            }
            blocks_release(c, mark);
            TRY(rc);
        } else {
            TRY(skip_field(c, &r, f, wt, depth + 1));
        }
    }
    return b_u8(c, &c->arena, '}');
#undef MSG
}

/* Parse one KeyValue at `depth` and push it on the attribute stack. Merge
 * blocks it allocates stay alive until the caller releases them. */
static int push_kv(Ctx *c, Span kv, int depth)
{
    Attr a;
    Span key, val;
    int has;
    TRY(parse_kv_fields(c, kv, depth, &key, &val, &has));
    a.k = key.p;
    a.kn = key.n;
    a.voff = 0;
    if (has) {
        TRY(render_any(c, val, depth + 1, 0, &a));
    } else {
        a.v = empty_bytes;
        a.vn = 0;
    }
    return attrs_push(c, &a);
}

/* ------------------------------------------------------------------------ */
/* Attribute maps                                                            */

static inline int key_cmp(const Attr *a, const Attr *b)
{
    size_t m = a->kn < b->kn ? a->kn : b->kn;
    if (m) {
        int r = memcmp(a->k, b->k, m);
        if (r)
            return r;
    }
    return (a->kn > b->kn) - (a->kn < b->kn);
}

static void insertion_sort(Attr *a, size_t n)
{
    for (size_t i = 1; i < n; i++) {
        if (key_cmp(&a[i - 1], &a[i]) <= 0)
            continue;
        Attr x = a[i];
        size_t j = i;
        while (j > 0 && key_cmp(&a[j - 1], &x) > 0) {
            a[j] = a[j - 1];
            j--;
        }
        a[j] = x;
    }
}

/* Stable merge sort (bottom-up over insertion-sorted runs). */
static int stable_sort(Ctx *c, Attr *a, size_t n)
{
    const size_t RUN = 16;
    if (n <= RUN) {
        insertion_sort(a, n);
        return 0;
    }
    if (c->capsort < n) {
        Attr *t = (Attr *)PyMem_RawRealloc(c->sorttmp, n * sizeof(Attr));
        if (!t)
            return oom(c);
        c->sorttmp = t;
        c->capsort = n;
    }
    for (size_t i = 0; i < n; i += RUN)
        insertion_sort(a + i, n - i < RUN ? n - i : RUN);
    Attr *src = a, *dst = c->sorttmp;
    for (size_t w = RUN; w < n; w *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * w) {
            size_t mid = lo + w < n ? lo + w : n;
            size_t hi = lo + 2 * w < n ? lo + 2 * w : n;
            size_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi)
                dst[k++] = key_cmp(&src[j], &src[i]) < 0 ? src[j++] : src[i++];
            while (i < mid)
                dst[k++] = src[i++];
            while (j < hi)
                dst[k++] = src[j++];
        }
        Attr *t = src;
        src = dst;
        dst = t;
    }
    if (src != a)
        memcpy(a, src, n * sizeof(Attr));
    return 0;
}

/* Sort the attributes pushed since `mark`, write them as a RowBinary Map to
 * `out` (first value of a repeated key wins), optionally copy the value of
 * service.name into c->service, and pop them. */
static int emit_map(Ctx *c, Buf *out, size_t mark, int want_service)
{
    Attr *a = c->attrs + mark;
    size_t n = c->nattrs - mark;
    TRY(stable_sort(c, a, n));
    size_t uniq = 0;
    for (size_t i = 0; i < n; i++)
        if (i == 0 || key_cmp(&a[i - 1], &a[i]) != 0)
            uniq++;
    TRY(b_varint(c, out, uniq));
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && key_cmp(&a[i - 1], &a[i]) == 0)
            continue;
        const uint8_t *v = a[i].v ? a[i].v : c->arena.p + a[i].voff;
        TRY(b_str(c, out, a[i].k, a[i].kn));
        TRY(b_str(c, out, v, a[i].vn));
        if (want_service && a[i].kn == 12 && memcmp(a[i].k, "service.name", 12) == 0) {
            c->service.n = 0;
            TRY(b_raw(c, &c->service, v, a[i].vn));
        }
    }
    c->nattrs = mark;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Data points                                                               */

typedef struct {
    int kind;
    Buf *out;
    size_t *rows;
    int32_t temporality;
    int monotonic;
} Body;

static int write_exemplars(Ctx *c, Buf *out, Span dp, uint32_t exfield, size_t nex)
{
#define MSG "Exemplar"
    if (nex == 0) {
        TRY(reserve(c, out, 5));
        memset(out->p + out->n, 0, 5);
        out->n += 5;
        return 0;
    }
    if (c->capex < nex) {
        if (nex > SIZE_MAX / sizeof(Exemplar))
            return oom(c);
        Exemplar *e = (Exemplar *)PyMem_RawRealloc(c->ex, nex * sizeof(Exemplar));
        if (!e)
            return oom(c);
        c->ex = e;
        c->capex = nex;
    }
    c->exmaps.n = 0;
    size_t i = 0;
    Rd d = rd_of(dp);
    while (d.p < d.e) {
        uint32_t df, dwt;
        TRY(rd_tag(c, &d, &df, &dwt));
        if (df != exfield || dwt != 2) {
            TRY(skip_field(c, &d, df, dwt, 6));
            continue;
        }
        Span es;
        TRY(rd_bytes(c, &d, &es));
        Exemplar *e = &c->ex[i++];
        e->time = 0;
        e->value = double_to_bits(0.0);
        e->span_id.p = e->trace_id.p = empty_bytes;
        e->span_id.n = e->trace_id.n = 0;
        size_t mark = c->nattrs, amark = c->arena.n, bmark = c->nblocks;
        Rd r = rd_of(es);
        while (r.p < r.e) {
            NEXT_TAG();
            uint64_t v;
            switch (f) {
            case 2:
                EXPECT(1);
                TRY(rd_fixed64(c, &r, &e->time));
                break;
            case 3:
                EXPECT(1);
                TRY(rd_fixed64(c, &r, &e->value));
                break;
            case 6:
                EXPECT(1);
                TRY(rd_fixed64(c, &r, &v));
                e->value = double_to_bits((double)(int64_t)v);
                break;
            case 4:
                EXPECT(2);
                TRY(rd_bytes(c, &r, &e->span_id));
                break;
            case 5:
                EXPECT(2);
                TRY(rd_bytes(c, &r, &e->trace_id));
                break;
            case 7: {
                EXPECT(2);
                Span s;
                TRY(rd_bytes(c, &r, &s));
                TRY(push_kv(c, s, 7));
                break;
            }
            default:
                TRY(skip_field(c, &r, f, wt, 7));
            }
        }
        TRY(emit_map(c, &c->exmaps, mark, 0));
        c->arena.n = amark;
        blocks_release(c, bmark);
    }
    TRY(b_varint(c, out, nex));
    TRY(b_raw(c, out, c->exmaps.p, c->exmaps.n));
    TRY(b_varint(c, out, nex));
    TRY(reserve(c, out, 16 * nex + 10));
    for (i = 0; i < nex; i++)
        TRY(b_u64(c, out, c->ex[i].time));
    TRY(b_varint(c, out, nex));
    for (i = 0; i < nex; i++)
        TRY(b_u64(c, out, c->ex[i].value));
    TRY(b_varint(c, out, nex));
    for (i = 0; i < nex; i++)
        TRY(put_hex(c, out, c->ex[i].span_id.p, c->ex[i].span_id.n));
    TRY(b_varint(c, out, nex));
    for (i = 0; i < nex; i++)
        TRY(put_hex(c, out, c->ex[i].trace_id.p, c->ex[i].trace_id.n));
    return 0;
#undef MSG
}

static inline int write_head(Ctx *c, Buf *out)
{
    return b_raw(c, out, c->mhead.p, c->mhead.n);
}

/* ------------------------------------------------------------------------ */
/* Cardinality limiting (see exporters/cardinality.py for the semantics)     */

/* Attribute sets are told apart by a seeded 64-bit hash of their RowBinary
 * map (sorted, de-duplicated, values rendered), so two spellings of one set
 * are one set. The twin computes the same function (attrs_hash there). */
#define H_K0 0x9E3779B97F4A7C15ULL
#define H_K1 0xA0761D6478BD642FULL
#define H_K2 0xE7037ED1A0B428DBULL
#define H_K3 0x8EBC6AF09C88C6E3ULL
#define H_K4 0x589965CC75374CC3ULL
#define H_K5 0x1D8E4E27C47D124FULL

static inline uint64_t mum(uint64_t a, uint64_t b)
{
#if defined(__SIZEOF_INT128__)
    unsigned __int128 p = (unsigned __int128)a * b;
    return (uint64_t)p ^ (uint64_t)(p >> 64);
#else
    uint64_t al = a & 0xFFFFFFFFu, ah = a >> 32, bl = b & 0xFFFFFFFFu, bh = b >> 32;
    uint64_t ll = al * bl, lh = al * bh, hl = ah * bl, hh = ah * bh;
    uint64_t mid = (ll >> 32) + (lh & 0xFFFFFFFFu) + (hl & 0xFFFFFFFFu);
    uint64_t lo = (ll & 0xFFFFFFFFu) | (mid << 32);
    uint64_t hi = hh + (lh >> 32) + (hl >> 32) + (mid >> 32);
    return lo ^ hi;
#endif
}

static inline uint64_t load_le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* Block k of 16 bytes goes into lane k % 2 (two multiply chains side by
 * side). A partial last block is the last 16 bytes of the data (overlapping
 * the one before), or the data zero-padded when it is shorter than 16 bytes;
 * read with plain loads, as a copy to the stack would stall the next load.
 * The length goes in first and last. */
#define H_MIX(lane, p0, p1) lane = mum((p0) ^ lane ^ H_K1, (p1) ^ s2)
static uint64_t attrs_hash(const uint8_t *p, size_t n, uint64_t seed)
{
    uint64_t a = seed ^ ((uint64_t)n * H_K0), b = seed ^ H_K5, s2 = seed ^ H_K2;
    size_t nb = n / 16, k = 0;
    for (; k + 2 <= nb; k += 2) {
        const uint8_t *q = p + 16 * k;
        H_MIX(a, load_le64(q), load_le64(q + 8));
        H_MIX(b, load_le64(q + 16), load_le64(q + 24));
    }
    if (k < nb) {
        H_MIX(a, load_le64(p + 16 * k), load_le64(p + 16 * k + 8));
        k++;
    }
    if (n % 16) {
        uint64_t w0 = 0, w1 = 0;
        if (n >= 16) {
            w0 = load_le64(p + n - 16);
            w1 = load_le64(p + n - 8);
        } else {
            for (size_t i = 0; i < n; i++) {
                if (i < 8)
                    w0 |= (uint64_t)p[i] << (8 * i);
                else
                    w1 |= (uint64_t)p[i] << (8 * (i - 8));
            }
        }
        if (k & 1)
            H_MIX(b, w0, w1);
        else
            H_MIX(a, w0, w1);
    }
    uint64_t h = mum(a ^ H_K3, b ^ (uint64_t)n ^ H_K4);
    return h ? h : 1;
}
#undef H_MIX

/* The map every overflowing point gets: {"otel.metric.overflow": "true"}. */
static const uint8_t overflow_map[] = "\x01\x14otel.metric.overflow\x04true";
#define OVERFLOW_MAP_LEN (sizeof(overflow_map) - 1)

/* A set of 64-bit hashes (open addressing, 0 = empty slot). */
typedef struct {
    uint64_t *keys;
    size_t cap, n;
} HSet;

/* 1 if present, 0 if absent (and then `*slot` is where it would go). */
static inline int hset_find(const HSet *s, uint64_t h, size_t *slot)
{
    if (!s->cap) {
        *slot = 0;
        return 0;
    }
    size_t mask = s->cap - 1, i = (size_t)(h ^ (h >> 29)) & mask;
    while (s->keys[i]) {
        if (s->keys[i] == h)
            return 1;
        i = (i + 1) & mask;
    }
    *slot = i;
    return 0;
}

/* Insert an absent key; grows at half full. -1 when out of memory. */
static int hset_add(HSet *s, uint64_t h)
{
    if ((s->n + 1) * 2 > s->cap) {
        size_t ncap = s->cap ? s->cap * 2 : 16;
        uint64_t *k = (uint64_t *)PyMem_RawCalloc(ncap, sizeof(uint64_t));
        if (!k)
            return -1;
        HSet t = {k, ncap, 0};
        for (size_t i = 0; i < s->cap; i++) {
            if (s->keys[i]) {
                size_t slot = 0;
                hset_find(&t, s->keys[i], &slot);
                t.keys[slot] = s->keys[i];
            }
        }
        t.n = s->n;
        PyMem_RawFree(s->keys);
        *s = t;
    }
    size_t slot = 0;
    if (hset_find(s, h, &slot))
        return 0;
    s->keys[slot] = h;
    s->n++;
    return 0;
}

typedef struct {
    uint64_t h; /* 0: free slot */
    uint8_t *name;
    size_t nlen;
    HSet sets;
    int warned;
} NameEnt;

/* stethoscope._native.CardinalityState: the limiter's memory for one window. */
typedef struct LimState {
    PyObject_HEAD
    PyThread_type_lock lock;
    uint64_t seed;
    size_t limit, max_metrics;
    NameEnt *names; /* open addressing, capacity a power of two >= 2 * max_metrics */
    size_t ncap, nnames;
    uint64_t series;             /* distinct sets tracked, all names */
    uint64_t overflowed, untracked; /* since the last take() */
    size_t *warn;                /* names that began to overflow since the last take() */
    size_t nwarn, capwarn;
} LimState;

typedef struct Pend {
    size_t off, len; /* the map's bytes in the output buffer */
    uint64_t h;
    int over;
} Pend;

static void lim_clear(LimState *st)
{
    for (size_t i = 0; i < st->ncap; i++) {
        NameEnt *e = &st->names[i];
        if (e->h) {
            PyMem_RawFree(e->name);
            PyMem_RawFree(e->sets.keys);
        }
        memset(e, 0, sizeof(*e));
    }
    st->nnames = 0;
    st->series = 0;
    st->nwarn = 0;
}

/* The entry of a metric name, added if there is room; NULL when the table is
 * full (the name is then not tracked this window). *oom set on failure. */
static NameEnt *lim_name(LimState *st, const uint8_t *name, size_t n, int *oom_flag)
{
    uint64_t h = attrs_hash(name, n, st->seed);
    size_t mask = st->ncap - 1, i = (size_t)(h ^ (h >> 29)) & mask;
    while (st->names[i].h) {
        NameEnt *e = &st->names[i];
        if (e->h == h && e->nlen == n && (n == 0 || memcmp(e->name, name, n) == 0))
            return e;
        i = (i + 1) & mask;
    }
    if (st->nnames >= st->max_metrics)
        return NULL;
    NameEnt *e = &st->names[i];
    e->name = (uint8_t *)PyMem_RawMalloc(n ? n : 1);
    if (!e->name) {
        *oom_flag = 1;
        return NULL;
    }
    if (n)
        memcpy(e->name, name, n);
    e->nlen = n;
    e->h = h;
    e->warned = 0;
    e->sets.keys = NULL;
    e->sets.cap = e->sets.n = 0;
    st->nnames++;
    return e;
}

/* Write a point's head and attribute map; with the limiter on, note the map. */
static int point_map(Ctx *c, Buf *out, size_t mark)
{
    TRY(write_head(c, out));
    size_t off = out->n;
    TRY(emit_map(c, out, mark, 0));
    if (!c->lim_on)
        return 0;
    size_t len = out->n - off;
    if (len == OVERFLOW_MAP_LEN && memcmp(out->p + off, overflow_map, len) == 0)
        return 0; /* already an overflow point (from an SDK): passes as is */
    if (c->npend == c->cappend) {
        size_t ncap = c->cappend ? c->cappend * 2 : 64;
        struct Pend *p = (struct Pend *)PyMem_RawRealloc(c->pend, ncap * sizeof(struct Pend));
        if (!p)
            return oom(c);
        c->pend = p;
        c->cappend = ncap;
    }
    struct Pend *p = &c->pend[c->npend++];
    p->off = off;
    p->len = len;
    p->h = attrs_hash(out->p + off, len, c->lim->seed);
    p->over = 0;
    return 0;
}

/* Decide on the noted points of one metric (all written to `out` from
 * `start` on) and rewrite the maps of those past the limit. */
static int limit_metric(Ctx *c, Span name, Buf *out, size_t start)
{
    LimState *st = c->lim;
    size_t nover = 0, room = st->limit - 1;
    int nomem = 0;
    PyThread_acquire_lock(st->lock, WAIT_LOCK);
    NameEnt *e = lim_name(st, name.p, name.n, &nomem);
    if (!e) {
        if (!nomem)
            st->untracked += c->npend;
    } else {
        for (size_t i = 0; i < c->npend; i++) {
            struct Pend *p = &c->pend[i];
            size_t slot = 0;
            if (hset_find(&e->sets, p->h, &slot))
                continue;
            if (e->sets.n < room) {
                if (hset_add(&e->sets, p->h) < 0) {
                    nomem = 1;
                    break;
                }
                st->series++;
                continue;
            }
            p->over = 1;
            nover++;
        }
        st->overflowed += nover;
        if (nover && !e->warned && !nomem) {
            if (st->nwarn == st->capwarn) {
                size_t ncap = st->capwarn ? st->capwarn * 2 : 16;
                size_t *w = (size_t *)PyMem_RawRealloc(st->warn, ncap * sizeof(size_t));
                if (w) {
                    st->warn = w;
                    st->capwarn = ncap;
                }
            }
            if (st->nwarn < st->capwarn) {
                e->warned = 1;
                st->warn[st->nwarn++] = (size_t)(e - st->names);
            }
        }
    }
    PyThread_release_lock(st->lock);
    size_t npend = c->npend;
    c->npend = 0;
    if (nomem)
        return oom(c);
    if (!nover)
        return 0;
    /* Overflow maps no longer than the maps they replace (the usual case: the
     * attribute that floods is long): compact in place, from the first one on. */
    int shrink = 1;
    size_t first = npend;
    for (size_t i = 0; i < npend; i++) {
        if (!c->pend[i].over)
            continue;
        if (first == npend)
            first = i;
        if (c->pend[i].len < OVERFLOW_MAP_LEN) {
            shrink = 0;
            break;
        }
    }
    if (shrink) {
        size_t w = c->pend[first].off, at = w;
        for (size_t i = first; i < npend; i++) {
            struct Pend *p = &c->pend[i];
            if (!p->over)
                continue;
            if (p->off > at) {
                memmove(out->p + w, out->p + at, p->off - at);
                w += p->off - at;
            }
            memcpy(out->p + w, overflow_map, OVERFLOW_MAP_LEN);
            w += OVERFLOW_MAP_LEN;
            at = p->off + p->len;
        }
        memmove(out->p + w, out->p + at, out->n - at);
        out->n = w + (out->n - at);
        return 0;
    }
    Buf *s = &c->scratch;
    s->n = 0;
    size_t at = start;
    for (size_t i = 0; i < npend; i++) {
        struct Pend *p = &c->pend[i];
        if (!p->over)
            continue;
        TRY(b_raw(c, s, out->p + at, p->off - at));
        TRY(b_raw(c, s, overflow_map, OVERFLOW_MAP_LEN));
        at = p->off + p->len;
    }
    TRY(b_raw(c, s, out->p + at, out->n - at));
    out->n = start;
    return b_raw(c, out, s->p, s->n);
}

static int number_dp(Ctx *c, Span dp, const Body *b)
{
#define MSG "NumberDataPoint"
    uint64_t start = 0, time = 0, value = double_to_bits(0.0), v;
    uint32_t flags = 0;
    size_t nex = 0, mark = c->nattrs, amark = c->arena.n, bmark = c->nblocks;
    Rd r = rd_of(dp);
    while (r.p < r.e) {
        NEXT_TAG();
        Span s;
        switch (f) {
        case 2:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &start));
            break;
        case 3:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &time));
            break;
        case 4:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &value));
            break;
        case 6:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &v));
            value = double_to_bits((double)(int64_t)v);
            break;
        case 5:
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            nex++;
            break;
        case 7:
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            TRY(push_kv(c, s, 6));
            break;
        case 8:
            EXPECT(0);
            TRY(rd_varint(c, &r, &v));
            flags = (uint32_t)v;
            break;
        default:
            TRY(skip_field(c, &r, f, wt, 6));
        }
    }
    Buf *out = b->out;
    TRY(point_map(c, out, mark));
    c->arena.n = amark;
    blocks_release(c, bmark);
    TRY(reserve(c, out, 28));
    put_le64(out->p + out->n, start);
    put_le64(out->p + out->n + 8, time);
    put_le64(out->p + out->n + 16, value);
    put_le32(out->p + out->n + 24, flags);
    out->n += 28;
    TRY(write_exemplars(c, out, dp, 5, nex));
    if (b->kind == K_SUM) {
        TRY(b_u32(c, out, (uint32_t)b->temporality));
        TRY(b_u8(c, out, b->monotonic ? 1 : 0));
    }
    (*b->rows)++;
    return 0;
#undef MSG
}

/* Write all elements of a repeated fixed64/double field (packed or not). */
static int write_fixed64s(Ctx *c, Buf *out, Span dp, uint32_t field, size_t count)
{
    TRY(b_varint(c, out, count));
    if (count > SIZE_MAX / 8)
        return oom(c);
    TRY(reserve(c, out, 8 * count));
    Rd r = rd_of(dp);
    while (r.p < r.e) {
        uint32_t f, wt;
        TRY(rd_tag(c, &r, &f, &wt));
        if (f == field && wt == 1) {
            TRY(b_raw(c, out, r.p, 8)); /* wire and RowBinary are both little-endian */
            r.p += 8;
        } else if (f == field && wt == 2) {
            Span s;
            TRY(rd_bytes(c, &r, &s));
            TRY(b_raw(c, out, s.p, s.n));
        } else {
            TRY(skip_field(c, &r, f, wt, 6));
        }
    }
    return 0;
}

static int hist_dp(Ctx *c, Span dp, const Body *b)
{
#define MSG "HistogramDataPoint"
    uint64_t start = 0, time = 0, count = 0, v;
    uint64_t sum = double_to_bits(0.0), mn = sum, mx = sum;
    uint32_t flags = 0;
    size_t nex = 0, nb = 0, ne = 0, mark = c->nattrs, amark = c->arena.n, bmark = c->nblocks;
    Rd r = rd_of(dp);
    while (r.p < r.e) {
        NEXT_TAG();
        Span s;
        switch (f) {
        case 2:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &start));
            break;
        case 3:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &time));
            break;
        case 4:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &count));
            break;
        case 5:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &sum));
            break;
        case 11:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &mn));
            break;
        case 12:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &mx));
            break;
        case 6:
        case 7: {
            size_t *cnt = f == 6 ? &nb : &ne;
            if (wt == 1) {
                TRY(rd_fixed64(c, &r, &v));
                (*cnt)++;
            } else if (wt == 2) {
                TRY(rd_bytes(c, &r, &s));
                if (s.n % 8)
                    return fail_at(c, tp, "packed field %u of %s has a length (%zu) "
                                          "that is not a multiple of 8", f, MSG, s.n);
                *cnt += s.n / 8;
            } else {
                return wrong_wt(c, tp, f, MSG, wt);
            }
            break;
        }
        case 8:
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            nex++;
            break;
        case 9:
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            TRY(push_kv(c, s, 6));
            break;
        case 10:
            EXPECT(0);
            TRY(rd_varint(c, &r, &v));
            flags = (uint32_t)v;
            break;
        default:
            TRY(skip_field(c, &r, f, wt, 6));
        }
    }
    Buf *out = b->out;
    TRY(point_map(c, out, mark));
    c->arena.n = amark;
    blocks_release(c, bmark);
    TRY(b_u64(c, out, start));
    TRY(b_u64(c, out, time));
    TRY(b_u64(c, out, count));
    TRY(b_u64(c, out, sum));
    TRY(write_fixed64s(c, out, dp, 6, nb));
    TRY(write_fixed64s(c, out, dp, 7, ne));
    TRY(write_exemplars(c, out, dp, 8, nex));
    TRY(b_u32(c, out, flags));
    TRY(b_u64(c, out, mn));
    TRY(b_u64(c, out, mx));
    TRY(b_u32(c, out, (uint32_t)b->temporality));
    (*b->rows)++;
    return 0;
#undef MSG
}

/* Count the varints of a packed run, checking each one. */
static int count_packed_varints(Ctx *c, Span s, size_t *count)
{
    Rd r = rd_of(s);
    uint64_t v;
    while (r.p < r.e) {
        TRY(rd_varint(c, &r, &v));
        (*count)++;
    }
    return 0;
}

/* ExponentialHistogramDataPoint.Buckets (already merged): offset + counts. */
static int write_buckets(Ctx *c, Buf *out, Span bk)
{
#define MSG "Buckets"
    uint64_t v;
    uint32_t off = 0;
    size_t n = 0;
    Rd r = rd_of(bk);
    while (r.p < r.e) {
        NEXT_TAG();
        Span s;
        if (f == 1) {
            EXPECT(0);
            TRY(rd_varint(c, &r, &v));
            uint32_t u = (uint32_t)v;
            off = (u >> 1) ^ (0u - (u & 1));
        } else if (f == 2) {
            if (wt == 0) {
                TRY(rd_varint(c, &r, &v));
                n++;
            } else if (wt == 2) {
                TRY(rd_bytes(c, &r, &s));
                TRY(count_packed_varints(c, s, &n));
            } else {
                return wrong_wt(c, tp, f, MSG, wt);
            }
        } else {
            TRY(skip_field(c, &r, f, wt, 7));
        }
    }
    TRY(b_u32(c, out, off));
    TRY(b_varint(c, out, n));
    if (n > SIZE_MAX / 8)
        return oom(c);
    TRY(reserve(c, out, 8 * n));
    r = rd_of(bk);
    while (r.p < r.e) {
        uint32_t f, wt;
        TRY(rd_tag(c, &r, &f, &wt));
        if (f == 2 && wt == 0) {
            TRY(rd_varint(c, &r, &v));
            TRY(b_u64(c, out, v));
        } else if (f == 2 && wt == 2) {
            Span s;
            TRY(rd_bytes(c, &r, &s));
            Rd q = rd_of(s);
            while (q.p < q.e) {
                TRY(rd_varint(c, &q, &v));
                TRY(b_u64(c, out, v));
            }
        } else {
            TRY(skip_field(c, &r, f, wt, 7));
        }
    }
    return 0;
#undef MSG
}

static int exph_dp(Ctx *c, Span dp, const Body *b)
{
#define MSG "ExponentialHistogramDataPoint"
    uint64_t start = 0, time = 0, count = 0, zero = 0, v;
    uint64_t sum = double_to_bits(0.0), mn = sum, mx = sum;
    uint32_t flags = 0, scale = 0;
    size_t nex = 0, npos = 0, nneg = 0, mark = c->nattrs, amark = c->arena.n,
           bmark = c->nblocks;
    Span pos = {empty_bytes, 0}, neg = {empty_bytes, 0};
    Rd r = rd_of(dp);
    while (r.p < r.e) {
        NEXT_TAG();
        Span s;
        switch (f) {
        case 1:
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            TRY(push_kv(c, s, 6));
            break;
        case 2:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &start));
            break;
        case 3:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &time));
            break;
        case 4:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &count));
            break;
        case 5:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &sum));
            break;
        case 6: {
            EXPECT(0);
            TRY(rd_varint(c, &r, &v));
            uint32_t u = (uint32_t)v;
            scale = (u >> 1) ^ (0u - (u & 1));
            break;
        }
        case 7:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &zero));
            break;
        case 8:
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            if (!npos++)
                pos = s;
            break;
        case 9:
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            if (!nneg++)
                neg = s;
            break;
        case 10:
            EXPECT(0);
            TRY(rd_varint(c, &r, &v));
            flags = (uint32_t)v;
            break;
        case 11:
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            nex++;
            break;
        case 12:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &mn));
            break;
        case 13:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &mx));
            break;
        case 14:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &v));
            break;
        default:
            TRY(skip_field(c, &r, f, wt, 6));
        }
    }
    Buf *out = b->out;
    TRY(point_map(c, out, mark));
    c->arena.n = amark;
    if (npos > 1)
        TRY(merged(c, dp, dp.p, 8, 6, &pos));
    if (nneg > 1)
        TRY(merged(c, dp, dp.p, 9, 6, &neg));
    TRY(b_u64(c, out, start));
    TRY(b_u64(c, out, time));
    TRY(b_u64(c, out, count));
    TRY(b_u64(c, out, sum));
    TRY(b_u32(c, out, scale));
    TRY(b_u64(c, out, zero));
    TRY(write_buckets(c, out, pos));
    TRY(write_buckets(c, out, neg));
    blocks_release(c, bmark);
    TRY(write_exemplars(c, out, dp, 11, nex));
    TRY(b_u32(c, out, flags));
    TRY(b_u64(c, out, mn));
    TRY(b_u64(c, out, mx));
    TRY(b_u32(c, out, (uint32_t)b->temporality));
    (*b->rows)++;
    return 0;
#undef MSG
}

/* Quantiles (which == 1) or values (which == 2) of a SummaryDataPoint. */
static int write_quantiles(Ctx *c, Buf *out, Span dp, size_t nq, uint32_t which)
{
#define MSG "ValueAtQuantile"
    TRY(b_varint(c, out, nq));
    Rd d = rd_of(dp);
    while (d.p < d.e) {
        uint32_t df, dwt;
        TRY(rd_tag(c, &d, &df, &dwt));
        if (df != 6 || dwt != 2) {
            TRY(skip_field(c, &d, df, dwt, 6));
            continue;
        }
        Span q;
        TRY(rd_bytes(c, &d, &q));
        uint64_t val = double_to_bits(0.0), x;
        Rd r = rd_of(q);
        while (r.p < r.e) {
            NEXT_TAG();
            if (f == 1 || f == 2) {
                EXPECT(1);
                TRY(rd_fixed64(c, &r, &x));
                if (f == which)
                    val = x;
            } else {
                TRY(skip_field(c, &r, f, wt, 7));
            }
        }
        TRY(b_u64(c, out, val));
    }
    return 0;
#undef MSG
}

static int summary_dp(Ctx *c, Span dp, const Body *b)
{
#define MSG "SummaryDataPoint"
    uint64_t start = 0, time = 0, count = 0, sum = double_to_bits(0.0), v;
    uint32_t flags = 0;
    size_t nq = 0, mark = c->nattrs, amark = c->arena.n, bmark = c->nblocks;
    Rd r = rd_of(dp);
    while (r.p < r.e) {
        NEXT_TAG();
        Span s;
        switch (f) {
        case 2:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &start));
            break;
        case 3:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &time));
            break;
        case 4:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &count));
            break;
        case 5:
            EXPECT(1);
            TRY(rd_fixed64(c, &r, &sum));
            break;
        case 6:
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            nq++;
            break;
        case 7:
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            TRY(push_kv(c, s, 6));
            break;
        case 8:
            EXPECT(0);
            TRY(rd_varint(c, &r, &v));
            flags = (uint32_t)v;
            break;
        default:
            TRY(skip_field(c, &r, f, wt, 6));
        }
    }
    Buf *out = b->out;
    TRY(point_map(c, out, mark));
    c->arena.n = amark;
    blocks_release(c, bmark);
    TRY(b_u64(c, out, start));
    TRY(b_u64(c, out, time));
    TRY(b_u64(c, out, count));
    TRY(b_u64(c, out, sum));
    TRY(write_quantiles(c, out, dp, nq, 1));
    TRY(write_quantiles(c, out, dp, nq, 2));
    TRY(b_u32(c, out, flags));
    (*b->rows)++;
    return 0;
#undef MSG
}

/* ------------------------------------------------------------------------ */
/* Metric bodies, metrics, scopes, resources                                 */

static const char *const body_names[NKINDS] = {"Gauge", "Sum", "Histogram",
                                               "ExponentialHistogram", "Summary"};

/* A Gauge/Sum/Histogram/ExponentialHistogram/Summary message (level 4). */
static int process_body(Ctx *c, int kind, Span body, Buf *out, size_t *rows)
{
    const char *MSG = body_names[kind];
    Body b = {kind, out, rows, 0, 0};
    uint64_t v;
    Rd r = rd_of(body);
    while (r.p < r.e) {
        NEXT_TAG();
        if (f == 1) {
            EXPECT(2);
            Span s;
            TRY(rd_bytes(c, &r, &s));
        } else if (f == 2 && kind != K_GAUGE && kind != K_SUMMARY) {
            EXPECT(0);
            TRY(rd_varint(c, &r, &v));
            b.temporality = (int32_t)(uint32_t)v;
        } else if (f == 3 && kind == K_SUM) {
            EXPECT(0);
            TRY(rd_varint(c, &r, &v));
            b.monotonic = v != 0;
        } else {
            TRY(skip_field(c, &r, f, wt, 5));
        }
    }
    r = rd_of(body);
    while (r.p < r.e) {
        uint32_t f, wt;
        TRY(rd_tag(c, &r, &f, &wt));
        if (f != 1) {
            TRY(skip_field(c, &r, f, wt, 5));
            continue;
        }
        Span dp;
        TRY(rd_bytes(c, &r, &dp));
        switch (kind) {
        case K_GAUGE:
        case K_SUM:
            TRY(number_dp(c, dp, &b));
            break;
        case K_HIST:
            TRY(hist_dp(c, dp, &b));
            break;
        case K_EXPH:
            TRY(exph_dp(c, dp, &b));
            break;
        default:
            TRY(summary_dp(c, dp, &b));
        }
    }
    return 0;
}

static int data_kind(uint32_t f)
{
    switch (f) {
    case 5:
        return K_GAUGE;
    case 7:
        return K_SUM;
    case 9:
        return K_HIST;
    case 10:
        return K_EXPH;
    case 11:
        return K_SUMMARY;
    default:
        return -1;
    }
}

/* Metric (level 3). */
static int process_metric(Ctx *c, Span m)
{
#define MSG "Metric"
    Span name = {empty_bytes, 0}, desc = name, unit = name, s;
    uint32_t lm = 0;
    const uint8_t *run = NULL;
    size_t bmark = c->nblocks;
    Rd r = rd_of(m);
    while (r.p < r.e) {
        NEXT_TAG();
        switch (f) {
        case 1:
            EXPECT(2);
            TRY(rd_string(c, &r, &name, tp, f, MSG));
            break;
        case 2:
            EXPECT(2);
            TRY(rd_string(c, &r, &desc, tp, f, MSG));
            break;
        case 3:
            EXPECT(2);
            TRY(rd_string(c, &r, &unit, tp, f, MSG));
            break;
        case 5:
        case 7:
        case 9:
        case 10:
        case 11:
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            if (f != lm) {
                lm = f;
                run = tp;
            }
            break;
        case 12: { /* metadata: ignored, but validated like protobuf does */
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            size_t mark = c->nattrs, amark = c->arena.n, bm = c->nblocks;
            TRY(push_kv(c, s, 4));
            c->nattrs = mark;
            c->arena.n = amark;
            blocks_release(c, bm);
            break;
        }
        default:
            TRY(skip_field(c, &r, f, wt, 4));
        }
    }
    if (!lm)
        return 0;
    int kind = data_kind(lm);
    if (!c->seen[kind]) {
        c->seen[kind] = 1;
        c->order[c->norder++] = kind;
    }
    Buf *h = &c->mhead;
    h->n = 0;
    TRY(b_raw(c, h, c->res_head.p, c->res_head.n));
    TRY(b_raw(c, h, c->scope_head.p, c->scope_head.n));
    TRY(b_str(c, h, name.p, name.n));
    TRY(b_str(c, h, desc.p, desc.n));
    TRY(b_str(c, h, unit.p, unit.n));

    /* Members overwritten by a later, different member: validate only. */
    size_t nfinal = 0;
    Span first = {empty_bytes, 0};
    r = rd_of(m);
    while (r.p < r.e) {
        NEXT_TAG();
        int k = data_kind(f);
        if (k < 0 || wt != 2) {
            TRY(skip_field(c, &r, f, wt, 4));
            continue;
        }
        TRY(rd_bytes(c, &r, &s));
        if (tp >= run) { /* the final run: all occurrences of lm */
            if (!nfinal)
                first = s;
            nfinal++;
        } else {
            size_t dummy = 0;
            int rc = process_body(c, k, s, &c->discard, &dummy);
            c->discard.n = 0;
            TRY(rc);
        }
    }
    if (nfinal > 1)
        TRY(merged(c, m, run, lm, 4, &first));
    size_t start = c->out[kind].n;
    c->lim_on = c->lim != NULL;
    c->npend = 0;
    int rc = process_body(c, kind, first, &c->out[kind], &c->rows[kind]);
    c->lim_on = 0;
    if (rc == 0 && c->npend)
        rc = limit_metric(c, name, &c->out[kind], start);
    blocks_release(c, bmark);
    return rc;
#undef MSG
}

/* InstrumentationScope (level 3) + ScopeMetrics header. */
static int process_scope_metrics(Ctx *c, Span sm)
{
#define MSG "ScopeMetrics"
    Span scope = {empty_bytes, 0}, url = scope, s;
    size_t nscope = 0, bmark = c->nblocks;
    Rd r = rd_of(sm);
    while (r.p < r.e) {
        NEXT_TAG();
        switch (f) {
        case 1:
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            if (!nscope++)
                scope = s;
            break;
        case 2:
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            break;
        case 3:
            EXPECT(2);
            TRY(rd_string(c, &r, &url, tp, f, MSG));
            break;
        default:
            TRY(skip_field(c, &r, f, wt, 3));
        }
    }
#undef MSG
    if (nscope > 1)
        TRY(merged(c, sm, sm.p, 1, 3, &scope));
    {
#define MSG "InstrumentationScope"
        Span name = {empty_bytes, 0}, version = name;
        uint32_t dropped = 0;
        uint64_t v;
        size_t mark = c->nattrs, amark = c->arena.n;
        r = rd_of(scope);
        while (r.p < r.e) {
            NEXT_TAG();
            switch (f) {
            case 1:
                EXPECT(2);
                TRY(rd_string(c, &r, &name, tp, f, MSG));
                break;
            case 2:
                EXPECT(2);
                TRY(rd_string(c, &r, &version, tp, f, MSG));
                break;
            case 3:
                EXPECT(2);
                TRY(rd_bytes(c, &r, &s));
                TRY(push_kv(c, s, 4));
                break;
            case 4:
                EXPECT(0);
                TRY(rd_varint(c, &r, &v));
                dropped = (uint32_t)v;
                break;
            default:
                TRY(skip_field(c, &r, f, wt, 4));
            }
        }
        Buf *h = &c->scope_head;
        h->n = 0;
        TRY(b_str(c, h, name.p, name.n));
        TRY(b_str(c, h, version.p, version.n));
        TRY(emit_map(c, h, mark, 0));
        c->arena.n = amark;
        TRY(b_u32(c, h, dropped));
        TRY(b_str(c, h, url.p, url.n));
        TRY(b_str(c, h, c->service.p, c->service.n));
#undef MSG
    }
    blocks_release(c, bmark);
    r = rd_of(sm);
    while (r.p < r.e) {
        uint32_t f, wt;
        TRY(rd_tag(c, &r, &f, &wt));
        if (f == 2) {
            TRY(rd_bytes(c, &r, &s));
            TRY(process_metric(c, s));
        } else {
            TRY(skip_field(c, &r, f, wt, 3));
        }
    }
    return 0;
}

/* ResourceMetrics (level 1) with its Resource (level 2). */
static int process_resource_metrics(Ctx *c, Span rm)
{
#define MSG "ResourceMetrics"
    Span res = {empty_bytes, 0}, url = res, s;
    size_t nres = 0, bmark = c->nblocks;
    Rd r = rd_of(rm);
    while (r.p < r.e) {
        NEXT_TAG();
        switch (f) {
        case 1:
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            if (!nres++)
                res = s;
            break;
        case 2:
            EXPECT(2);
            TRY(rd_bytes(c, &r, &s));
            break;
        case 3:
            EXPECT(2);
            TRY(rd_string(c, &r, &url, tp, f, MSG));
            break;
        default:
            TRY(skip_field(c, &r, f, wt, 2));
        }
    }
#undef MSG
    if (nres > 1)
        TRY(merged(c, rm, rm.p, 1, 2, &res));
    {
#define MSG "Resource"
        size_t mark = c->nattrs, amark = c->arena.n;
        uint64_t v;
        r = rd_of(res);
        while (r.p < r.e) {
            NEXT_TAG();
            if (f == 1) {
                EXPECT(2);
                TRY(rd_bytes(c, &r, &s));
                TRY(push_kv(c, s, 3));
            } else if (f == 2) {
                EXPECT(0);
                TRY(rd_varint(c, &r, &v));
            } else {
                TRY(skip_field(c, &r, f, wt, 3));
            }
        }
        c->service.n = 0;
        c->res_head.n = 0;
        TRY(emit_map(c, &c->res_head, mark, 1));
        c->arena.n = amark;
        TRY(b_str(c, &c->res_head, url.p, url.n));
#undef MSG
    }
    blocks_release(c, bmark);
    r = rd_of(rm);
    while (r.p < r.e) {
        uint32_t f, wt;
        TRY(rd_tag(c, &r, &f, &wt));
        if (f == 2) {
            TRY(rd_bytes(c, &r, &s));
            TRY(process_scope_metrics(c, s));
        } else {
            TRY(skip_field(c, &r, f, wt, 2));
        }
    }
    return 0;
}

static int process_request(Ctx *c)
{
#define MSG "ExportMetricsServiceRequest"
    Span all = {c->data ? c->data : empty_bytes, c->size};
    Rd r = rd_of(all);
    while (r.p < r.e) {
        NEXT_TAG();
        if (f == 1) {
            EXPECT(2);
            Span s;
            TRY(rd_bytes(c, &r, &s));
            TRY(process_resource_metrics(c, s));
        } else {
            TRY(skip_field(c, &r, f, wt, 1));
        }
    }
    return 0;
#undef MSG
}

static void ctx_free(Ctx *c)
{
    for (int k = 0; k < NKINDS; k++)
        buf_free(&c->out[k]);
    buf_free(&c->discard);
    buf_free(&c->arena);
    buf_free(&c->res_head);
    buf_free(&c->scope_head);
    buf_free(&c->mhead);
    buf_free(&c->service);
    buf_free(&c->exmaps);
    PyMem_RawFree(c->attrs);
    PyMem_RawFree(c->sorttmp);
    PyMem_RawFree(c->ex);
    blocks_release(c, 0);
    PyMem_RawFree(c->blocks);
    PyMem_RawFree(c->pend);
    buf_free(&c->scratch);
}

static int run_encode(Ctx *c)
{
#ifdef HAVE_USELOCALE
    locale_t old = (locale_t)0;
    if (c_numeric_locale)
        old = uselocale(c_numeric_locale);
#endif
    int rc = process_request(c);
#ifdef HAVE_USELOCALE
    if (c_numeric_locale)
        uselocale(old);
#endif
    return rc;
}

/* ------------------------------------------------------------------------ */
/* CardinalityState                                                          */

static PyTypeObject LimStateType;

static PyObject *lim_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"limit", "max_metrics", "seed", NULL};
    Py_ssize_t limit, max_metrics;
    unsigned long long seed;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nnK:CardinalityState", kwlist, &limit, &max_metrics, &seed))
        return NULL;
    if (limit < 2) {
        PyErr_Format(PyExc_ValueError, "cardinality limit must be 2 or more, got %zd", limit);
        return NULL;
    }
    if (max_metrics < 1 || max_metrics > (Py_ssize_t)1 << 24) {
        PyErr_Format(PyExc_ValueError, "max_metrics must be between 1 and 16777216, got %zd", max_metrics);
        return NULL;
    }
    LimState *st = (LimState *)type->tp_alloc(type, 0);
    if (!st)
        return NULL;
    st->limit = (size_t)limit;
    st->max_metrics = (size_t)max_metrics;
    st->seed = (uint64_t)seed;
    size_t cap = 16;
    while (cap < 2 * st->max_metrics)
        cap *= 2;
    st->names = (NameEnt *)PyMem_RawCalloc(cap, sizeof(NameEnt));
    st->lock = PyThread_allocate_lock();
    if (!st->names || !st->lock) {
        Py_DECREF(st);
        return PyErr_NoMemory();
    }
    st->ncap = cap;
    return (PyObject *)st;
}

static void lim_dealloc(LimState *st)
{
    if (st->names) {
        lim_clear(st);
        PyMem_RawFree(st->names);
    }
    PyMem_RawFree(st->warn);
    if (st->lock)
        PyThread_free_lock(st->lock);
    Py_TYPE(st)->tp_free((PyObject *)st);
}

static void lim_lock(LimState *st)
{
    if (!PyThread_acquire_lock(st->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(st->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

static PyObject *lim_reset(LimState *st, PyObject *Py_UNUSED(ignored))
{
    lim_lock(st);
    lim_clear(st);
    PyThread_release_lock(st->lock);
    Py_RETURN_NONE;
}

static PyObject *lim_take(LimState *st, PyObject *Py_UNUSED(ignored))
{
    PyObject *names = PyList_New(0);
    if (!names)
        return NULL;
    lim_lock(st);
    uint64_t over = st->overflowed, untracked = st->untracked, series = st->series;
    int err = 0;
    for (size_t i = 0; i < st->nwarn && !err; i++) {
        NameEnt *e = &st->names[st->warn[i]];
        PyObject *s = PyUnicode_DecodeUTF8((const char *)e->name, (Py_ssize_t)e->nlen, "replace");
        err = !s || PyList_Append(names, s) < 0;
        Py_XDECREF(s);
    }
    if (!err) {
        st->overflowed = st->untracked = 0;
        st->nwarn = 0;
    }
    PyThread_release_lock(st->lock);
    if (err) {
        Py_DECREF(names);
        return NULL;
    }
    return Py_BuildValue("(KKKN)", (unsigned long long)over, (unsigned long long)untracked,
                         (unsigned long long)series, names);
}

static PyMethodDef lim_methods[] = {
    {"reset", (PyCFunction)lim_reset, METH_NOARGS, "Forget every metric name and attribute set (a new window)."},
    {"take", (PyCFunction)lim_take, METH_NOARGS,
     "take() -> (overflowed, untracked, series, names)\n\n"
     "Points folded and points of untracked names since the last call, the sets tracked\n"
     "now, and the names that began to overflow since the last call (each once a window)."},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(lim_doc, "CardinalityState(limit, max_metrics, seed)\n--\n\n"
                      "What the cardinality limit remembers in one window: per metric name, the 64-bit\n"
                      "hashes of its attribute sets. Pass it to encode_metrics; thread-safe.");

static PyTypeObject LimStateType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "stethoscope._native.CardinalityState",
    .tp_basicsize = sizeof(LimState),
    .tp_dealloc = (destructor)lim_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = lim_doc,
    .tp_methods = lim_methods,
    .tp_new = lim_new,
};

PyDoc_STRVAR(attrs_hash_doc, "attrs_hash(data, seed, /)\n--\n\n"
                             "The seeded 64-bit hash the cardinality limit keys attribute maps by.");

static PyObject *py_attrs_hash(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer view;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "y*K:attrs_hash", &view, &seed))
        return NULL;
    uint64_t h = attrs_hash((const uint8_t *)view.buf, (size_t)view.len, (uint64_t)seed);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(h);
}

/* ------------------------------------------------------------------------ */
/* Python binding                                                            */

PyDoc_STRVAR(encode_metrics_doc,
             "encode_metrics(data, limiter=None, /)\n--\n\n"
             "Encode an OTLP ExportMetricsServiceRequest as ClickHouse RowBinary.\n\n"
             "``data`` is any object supporting the buffer protocol. Returns\n"
             "``{kind: (rows, rowbinary_bytes)}`` for each metric kind with rows.\n"
             "With a CardinalityState, points past its per-metric limit get the map\n"
             "{otel.metric.overflow: true} instead of their attributes.\n"
             "Raises ValueError when ``data`` is not a valid request.");

static PyObject *py_encode_metrics(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *arg, *limiter = Py_None;
    if (!PyArg_UnpackTuple(args, "encode_metrics", 1, 2, &arg, &limiter))
        return NULL;
    if (limiter != Py_None && !PyObject_TypeCheck(limiter, &LimStateType)) {
        PyErr_Format(PyExc_TypeError, "limiter must be a stethoscope._native.CardinalityState or None, not %.100s",
                     Py_TYPE(limiter)->tp_name);
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Ctx *c = (Ctx *)PyMem_Calloc(1, sizeof(Ctx));
    if (!c) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    c->data = (const uint8_t *)view.buf;
    c->size = (size_t)view.len;
    c->lim = limiter == Py_None ? NULL : (LimState *)limiter;
    int rc;
    if (c->size >= 4096) {
        Py_BEGIN_ALLOW_THREADS
        rc = run_encode(c);
        Py_END_ALLOW_THREADS
    } else {
        rc = run_encode(c);
    }
    PyBuffer_Release(&view);
    c->data = NULL;

    PyObject *result = NULL;
    if (rc < 0) {
        if (c->oom)
            PyErr_NoMemory();
        else
            PyErr_Format(PyExc_ValueError, "invalid OTLP metrics protobuf: %s", c->err);
        goto done;
    }
    result = PyDict_New();
    if (!result)
        goto done;
    for (int i = 0; i < c->norder; i++) {
        int k = c->order[i];
        if (!c->rows[k])
            continue;
        PyObject *t = Py_BuildValue("(ny#)", (Py_ssize_t)c->rows[k],
                                    (const char *)(c->out[k].p ? c->out[k].p : empty_bytes),
                                    (Py_ssize_t)c->out[k].n);
        if (!t || PyDict_SetItemString(result, kind_names[k], t) < 0) {
            Py_XDECREF(t);
            Py_CLEAR(result);
            goto done;
        }
        Py_DECREF(t);
    }
done:
    ctx_free(c);
    PyMem_Free(c);
    return result;
}

static PyMethodDef native_methods[] = {
    {"encode_metrics", (PyCFunction)py_encode_metrics, METH_VARARGS, encode_metrics_doc},
    {"attrs_hash", (PyCFunction)py_attrs_hash, METH_VARARGS, attrs_hash_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    "stethoscope._native",
    "C kernels of Stethoscope (see stethoscope.native for their Python twins).",
    -1,
    native_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
#ifdef HAVE_USELOCALE
    if (!c_numeric_locale)
        c_numeric_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
#endif
    if (PyType_Ready(&LimStateType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m)
        return NULL;
    Py_INCREF(&LimStateType);
    if (PyModule_AddObject(m, "CardinalityState", (PyObject *)&LimStateType) < 0) {
        Py_DECREF(&LimStateType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
