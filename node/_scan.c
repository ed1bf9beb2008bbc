/* node._scan: the hot loops of node.reader.scan(), decode_frames() and node.writer's
 * batch framing, in C.
 *
 * scan_entries(data, pos, seq, skip_before, stop_seq, out)
 *     -> (pos, seq, entries_passed, status)
 *
 * Walks ARCW v1 entries ([u32 length][u64 timestamp us][u32 CRC-32][payload],
 * big-endian) of the bytes object ``data`` from offset ``pos``. Each entry passed
 * whose CRC matches is appended to the list ``out`` (or only counted when ``out``
 * is None) as (seq, timestamp, payload); entries before ``skip_before`` (when it
 * is not 0) are passed without a CRC check, as in the Python code. ``seq`` and
 * ``stop_seq`` may be None.
 *
 * It never judges anything: it stops *before* the first entry that needs the
 * Python code's judgement and returns where it stopped, so the caller runs its
 * own logic from there (and may call again). Status codes: see STATUS_* below.
 *
 * frames_offset(data, skip) -> int
 * split_points(data, max_bytes) -> [(count, end), ...]
 *
 * Walks of a run of frames by their length fields only (no CRC), for the
 * replication code: where frame number skip starts (-1 when the run ends before
 * it), and where to cut the run into pieces of about max_bytes. They run once per
 * batch on every node, where the Python loops cost too much (README, Performance).
 *
 * frame_payloads(payloads, timestamp_us, too_large) -> bytes
 *
 * The write side: frames a whole batch in one call, byte for byte as the Python
 * code in node.writer does (a header per payload, then the payload). Every payload
 * is checked before anything is framed; an oversized one raises too_large(size).
 *
 * The CRC-32 (IEEE, reflected 0xEDB88320, as zlib.crc32) is folded with PCLMULQDQ
 * on x86-64 CPUs that have it (checked at import; WALREP_NO_CLMUL=1 turns it off),
 * and otherwise comes from a slice-by-8 table here, so that the extension needs
 * nothing beyond Python's headers; when setup.py could link the system zlib
 * (WALREP_USE_ZLIB) long payloads then go to zlib's crc32, which is faster there.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HEADER_BYTES 16
#define MAX_PAYLOAD_BYTES (100 * 1024 * 1024)

enum {
    STATUS_END = 0,          /* pos reached the end of data */
    STATUS_STOP_SEQ = 1,     /* seq > stop_seq */
    STATUS_PARTIAL_HEADER = 2,
    STATUS_BAD_LENGTH = 3,   /* length > MAX_PAYLOAD_BYTES */
    STATUS_PAST_END = 4,     /* entry extends past the end of data */
    STATUS_ZERO_HEADER = 5,  /* length 0 and timestamp 0: maybe a zero-filled tail */
    STATUS_CRC_MISMATCH = 6,
    STATUS_SEQ_LIMIT = 7,    /* seq cannot be carried in 64 bits: Python goes on */
};

/* ---- CRC-32 ------------------------------------------------------------------- */

/* slice-by-8: about 2 GB/s whatever the length, and quicker than zlib's crc32 below
 * about 1 KiB (zlib, braided, reaches 3.7 GB/s on long buffers but pays a setup
 * cost per call: 0.7 GB/s on 100 bytes). */
static uint32_t crc_table[8][256];

static void
crc_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
        crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = crc_table[0][n];
        for (int t = 1; t < 8; t++) {
            c = crc_table[0][c & 0xFF] ^ (c >> 8);
            crc_table[t][n] = c;
        }
    }
}

/* The running (inverted) state: start with 0xFFFFFFFF, invert at the end. */
static uint32_t
crc32_table_update(uint32_t c, const unsigned char *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        c = crc_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
        n--;
    }
    while (n >= 8) {
        /* Assemble the words byte by byte: endian-independent, and compilers
         * turn it into plain loads on little-endian machines. */
        uint32_t lo = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16
                      | (uint32_t)p[3] << 24;
        uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16
                      | (uint32_t)p[7] << 24;
        lo ^= c;
        c = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF]
            ^ crc_table[5][(lo >> 16) & 0xFF] ^ crc_table[4][lo >> 24]
            ^ crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF]
            ^ crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = crc_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

static uint32_t
crc32_table(const unsigned char *p, size_t n)
{
    return crc32_table_update(0xFFFFFFFFu, p, n) ^ 0xFFFFFFFFu;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WALREP_HAVE_CLMUL 1
#include <immintrin.h>

/* Carry-less multiplication (PCLMULQDQ), after Gopal et al., "Fast CRC Computation
 * for Generic Polynomials Using PCLMULQDQ Instruction" (Intel, 2009), in its
 * bit-reflected form. The data is folded 64 bytes at a time into four 128-bit
 * lanes, the lanes into one, the rest 16 bytes at a time, and the 128-bit
 * remainder is reduced to 32 bits (Barrett). The constants are x^k mod P for the
 * fold distances, bit-reflected and shifted one bit, as that paper derives them for
 * P = 0x104C11DB7: 512 - 64 and 512 + 64 bits (four lanes), 128 - 64 and 128 + 64
 * (one lane), 64 (the 64 to 32 step), then P itself and floor(x^64 / P) (Barrett).
 * Checked against zlib.crc32 in tests/node/test_scan_accel.py: every length up to
 * 299 bytes and some up to 64 KiB, at every alignment of a 16-byte load. Used only
 * when the CPU says it has PCLMULQDQ (SSE2 is part of x86-64). */
#define CLMUL_MIN_BYTES 64

static int have_clmul;

__attribute__((target("pclmul"))) static uint32_t
crc32_clmul_update(uint32_t c, const unsigned char *p, size_t n)
{
    /* n >= CLMUL_MIN_BYTES; the last n % 16 bytes go through the table. */
    const __m128i k_four = _mm_set_epi64x(0x1c6e41596, 0x154442bd4);
    const __m128i k_one = _mm_set_epi64x(0x0ccaa009e, 0x1751997d0);
    const __m128i k_64 = _mm_set_epi64x(0, 0x163cd6124);
    const __m128i k_barrett = _mm_set_epi64x(0x1f7011641, 0x1db710641);
    const __m128i low32 = _mm_set_epi32(0, 0, 0, -1);

    __m128i x0 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128((int)c));
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
    p += 64;
    n -= 64;
#define FOLD(x, k, next) \
    _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128((x), (k), 0x00), \
                                _mm_clmulepi64_si128((x), (k), 0x11)), (next))
    while (n >= 64) {
        x0 = FOLD(x0, k_four, _mm_loadu_si128((const __m128i *)p));
        x1 = FOLD(x1, k_four, _mm_loadu_si128((const __m128i *)(p + 16)));
        x2 = FOLD(x2, k_four, _mm_loadu_si128((const __m128i *)(p + 32)));
        x3 = FOLD(x3, k_four, _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    x0 = FOLD(x0, k_one, x1);
    x0 = FOLD(x0, k_one, x2);
    x0 = FOLD(x0, k_one, x3);
    while (n >= 16) {
        x0 = FOLD(x0, k_one, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
#undef FOLD
    /* 128 bits to 64, then to 32 (with the 32 bits shifted in from the top). */
    x0 = _mm_xor_si128(_mm_srli_si128(x0, 8), _mm_clmulepi64_si128(x0, k_one, 0x10));
    x0 = _mm_xor_si128(_mm_srli_si128(x0, 4),
                       _mm_clmulepi64_si128(_mm_and_si128(x0, low32), k_64, 0x00));
    /* Barrett: the remainder of the 64-bit value by P. */
    __m128i t = _mm_and_si128(
        _mm_clmulepi64_si128(_mm_and_si128(x0, low32), k_barrett, 0x10), low32);
    x0 = _mm_xor_si128(x0, _mm_clmulepi64_si128(t, k_barrett, 0x00));
    c = (uint32_t)_mm_cvtsi128_si32(_mm_srli_si128(x0, 4));
    return crc32_table_update(c, p, n);
}
#endif /* x86-64 */

#ifdef WALREP_USE_ZLIB
#include <zlib.h>
#define ZLIB_FROM_BYTES 1024

static uint32_t
crc32_zlib(const unsigned char *p, size_t n)
{
    uLong c = crc32(0L, Z_NULL, 0);
    while (n > 0) { /* zlib's uInt may be narrower than size_t */
        uInt chunk = n > 0x40000000u ? 0x40000000u : (uInt)n;
        c = crc32(c, p, chunk);
        p += chunk;
        n -= chunk;
    }
    return (uint32_t)c;
}
#endif /* WALREP_USE_ZLIB */

/* Folding with PCLMULQDQ where the CPU has it: about 5x zlib's crc32 on 100 KB
 * (figures in README, Performance). Without it, slice-by-8, and zlib's crc32 from
 * 1 KiB when it was linked. */
static uint32_t
crc32_ieee(const unsigned char *p, size_t n)
{
#ifdef WALREP_HAVE_CLMUL
    if (have_clmul && n >= CLMUL_MIN_BYTES)
        return crc32_clmul_update(0xFFFFFFFFu, p, n) ^ 0xFFFFFFFFu;
#endif
#ifdef WALREP_USE_ZLIB
    if (n >= ZLIB_FROM_BYTES)
        return crc32_zlib(p, n);
#endif
    return crc32_table(p, n);
}

static const char *
crc_implementation(void)
{
#ifdef WALREP_HAVE_CLMUL
    if (have_clmul)
        return "pclmulqdq from 64 B, slice-by-8 below";
#endif
#ifdef WALREP_USE_ZLIB
    return "slice-by-8, zlib from 1 KiB";
#else
    return "slice-by-8";
#endif
}

static inline uint32_t
be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static inline uint64_t
be64(const unsigned char *p)
{
    return (uint64_t)be32(p) << 32 | (uint64_t)be32(p + 4);
}

/* An int argument as int64, saturated; *is_none set for None. -1 with an error set
 * on a wrong type. */
static int
as_saturated_int64(PyObject *obj, const char *what, int64_t *value, int *is_none)
{
    *is_none = 0;
    if (obj == Py_None) {
        *is_none = 1;
        *value = 0;
        return 0;
    }
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int or None", what);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow > 0)
        v = LLONG_MAX;
    else if (overflow < 0)
        v = LLONG_MIN;
    *value = (int64_t)v;
    return overflow ? 1 : 0;
}

/* The tuple (seq or None, timestamp, payload), new reference; NULL on error. */
static PyObject *
make_entry(int no_seq, int64_t seq, PyObject *ts_obj, const unsigned char *payload,
           uint32_t length)
{
    PyObject *s, *p, *item;
    if (no_seq) {
        s = Py_None;
        Py_INCREF(s);
    }
    else if ((s = PyLong_FromLongLong(seq)) == NULL)
        return NULL;
    if ((p = PyBytes_FromStringAndSize((const char *)payload, length)) == NULL) {
        Py_DECREF(s);
        return NULL;
    }
    if ((item = PyTuple_New(3)) == NULL) {
        Py_DECREF(s);
        Py_DECREF(p);
        return NULL;
    }
    Py_INCREF(ts_obj);
    PyTuple_SET_ITEM(item, 0, s);
    PyTuple_SET_ITEM(item, 1, ts_obj);
    PyTuple_SET_ITEM(item, 2, p);
    /* Ints, bytes and None cannot make a cycle: keep these (possibly millions of)
     * tuples out of the collector's way, as it would itself do at its next pass. */
    PyObject_GC_UnTrack(item);
    return item;
}

static PyObject *
scan_entries(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "scan_entries(data, pos, seq, skip_before, stop_seq, out)");
        return NULL;
    }
    PyObject *data = args[0], *out = args[5];
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "data must be bytes");
        return NULL;
    }
    if (out != Py_None && !PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "out must be a list or None");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    if (pos < 0) {
        PyErr_SetString(PyExc_ValueError, "pos must not be negative");
        return NULL;
    }

    int64_t seq, skip_before, stop_seq;
    int no_seq, no_skip, no_stop, r;
    int status = STATUS_END;
    Py_ssize_t passed = 0;
    PyObject *ts_obj = NULL; /* the int of the last timestamp, ts */
    uint64_t ts = 0;

    r = as_saturated_int64(args[2], "seq", &seq, &no_seq);
    if (r < 0)
        return NULL;
    if (r > 0 || (!no_seq && (seq == INT64_MIN || seq == INT64_MAX))) {
        /* At or beyond the 64-bit limits: leave it to the Python code. */
        return Py_BuildValue("(nOni)", pos, args[2], (Py_ssize_t)0, STATUS_SEQ_LIMIT);
    }
    /* seq stays strictly between INT64_MIN and INT64_MAX below, so saturating these
     * keeps every comparison with it unchanged (and a nonzero value never saturates
     * to 0). */
    if (as_saturated_int64(args[3], "skip_before", &skip_before, &no_skip) < 0)
        return NULL;
    if (no_skip)
        skip_before = 0;
    if (as_saturated_int64(args[4], "stop_seq", &stop_seq, &no_stop) < 0)
        return NULL;

    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(data);
    const Py_ssize_t size = PyBytes_GET_SIZE(data);
    const int check_stop = !no_stop && !no_seq;

    while (pos < size) {
        if (!no_seq && seq == INT64_MAX) {
            /* The sequence after this entry would not fit: the Python code goes on. */
            status = STATUS_SEQ_LIMIT;
            break;
        }
        if (check_stop && seq > stop_seq) {
            status = STATUS_STOP_SEQ;
            break;
        }
        if (size - pos < HEADER_BYTES) {
            status = STATUS_PARTIAL_HEADER;
            break;
        }
        const unsigned char *h = buf + pos;
        uint32_t length = be32(h);
        uint64_t timestamp = be64(h + 4);
        uint32_t crc = be32(h + 12);
        if (length > MAX_PAYLOAD_BYTES) {
            status = STATUS_BAD_LENGTH;
            break;
        }
        Py_ssize_t end = pos + HEADER_BYTES + (Py_ssize_t)length;
        if (end > size) {
            status = STATUS_PAST_END;
            break;
        }
        if (length == 0 && timestamp == 0) {
            status = STATUS_ZERO_HEADER;
            break;
        }
        if (skip_before == 0 || seq >= skip_before) {
            if (crc32_ieee(h + HEADER_BYTES, length) != crc) {
                status = STATUS_CRC_MISMATCH;
                break;
            }
            if (out != Py_None) {
                /* Entries of one batch share their timestamp: share the int too. */
                if (ts_obj == NULL || timestamp != ts) {
                    Py_XDECREF(ts_obj);
                    if ((ts_obj = PyLong_FromUnsignedLongLong(timestamp)) == NULL)
                        return NULL;
                    ts = timestamp;
                }
                PyObject *item = make_entry(no_seq, seq, ts_obj, h + HEADER_BYTES, length);
                if (item == NULL || PyList_Append(out, item) < 0) {
                    Py_XDECREF(item);
                    Py_DECREF(ts_obj);
                    return NULL;
                }
                Py_DECREF(item);
            }
        }
        pos = end;
        passed++;
        if (!no_seq)
            seq++;
    }

    Py_XDECREF(ts_obj);
    if (no_seq)
        return Py_BuildValue("(nOni)", pos, Py_None, passed, status);
    return Py_BuildValue("(nLni)", pos, (long long)seq, passed, status);
}

static PyObject *
crc32_py(PyObject *module, PyObject *arg)
{
    (void)module;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    uint32_t c = crc32_ieee((const unsigned char *)view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(c);
}

/* ---- framing ------------------------------------------------------------------ */

/* A batch is framed with the GIL held below this many bytes: that is at most about
 * half a millisecond of work, shorter than the switch interval, and a GIL round trip
 * would cost more than it lets other threads gain. Above it, other threads run. */
#define FRAME_NOGIL_FROM_BYTES (1024 * 1024)
/* Batches up to this many payloads keep their buffer views on the stack. */
#define FRAME_STACK_VIEWS 32

static inline void
put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static inline void
put_be64(unsigned char *p, uint64_t v)
{
    put_be32(p, (uint32_t)(v >> 32));
    put_be32(p + 4, (uint32_t)v);
}

/* Set the exception too_large(size) returns (PayloadTooLarge, for node.writer). */
static void
raise_too_large(PyObject *too_large, Py_ssize_t size)
{
    PyObject *n = PyLong_FromSsize_t(size);
    if (n == NULL)
        return;
    PyObject *exc = PyObject_CallOneArg(too_large, n);
    Py_DECREF(n);
    if (exc == NULL)
        return;
    if (PyExceptionInstance_Check(exc))
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    else
        PyErr_Format(PyExc_TypeError, "too_large must return an exception, not %.100s",
                     Py_TYPE(exc)->tp_name);
    Py_DECREF(exc);
}

static PyObject *
frame_payloads(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "frame_payloads(payloads, timestamp_us, too_large)");
        return NULL;
    }
    PyObject *too_large = args[2];
    if (!PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "timestamp_us must be an int");
        return NULL;
    }
    /* OverflowError outside 0..2**64-1, where struct.pack(">Q") raises struct.error. */
    unsigned long long timestamp = PyLong_AsUnsignedLongLong(args[1]);
    if (timestamp == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;

    /* A tuple of our own: the payloads stay alive and in place even if a buffer
     * exporter's code changes the caller's list while we collect the views. */
    PyObject *batch = PySequence_Tuple(args[0]);
    if (batch == NULL)
        return NULL;
    const Py_ssize_t n = PyTuple_GET_SIZE(batch);
    Py_buffer stack_views[FRAME_STACK_VIEWS];
    Py_buffer *views = stack_views;
    if (n > FRAME_STACK_VIEWS && (views = PyMem_New(Py_buffer, n)) == NULL) {
        Py_DECREF(batch);
        return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    Py_ssize_t held = 0, total = 0;

    /* First every payload is taken and checked: an error leaves nothing framed. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(batch, i);
        Py_buffer *view = &views[i];
        if (PyBytes_CheckExact(item)) {
            /* As bytes.join does: a bytes object needs no export, only a reference,
             * which PyBuffer_Release below drops. */
            Py_INCREF(item);
            view->obj = item;
            view->buf = PyBytes_AS_STRING(item);
            view->len = PyBytes_GET_SIZE(item);
        }
        else if (PyObject_GetBuffer(item, view, PyBUF_SIMPLE) < 0) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Format(PyExc_TypeError,
                             "payload %zd: a bytes-like object is required, not '%.100s'", i,
                             Py_TYPE(item)->tp_name);
            }
            goto done;
        }
        held++;
        /* view->len counts bytes, whatever the item size of a memoryview. */
        if (view->len > MAX_PAYLOAD_BYTES) {
            raise_too_large(too_large, view->len);
            goto done;
        }
        if (total > PY_SSIZE_T_MAX - HEADER_BYTES - view->len) {
            PyErr_SetString(PyExc_OverflowError, "the batch is too large for one bytes object");
            goto done;
        }
        total += HEADER_BYTES + view->len;
    }

    if ((result = PyBytes_FromStringAndSize(NULL, total)) == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    /* Nothing below touches a Python object, and the views keep every buffer exported
     * (a bytearray cannot be resized meanwhile). The CRC is taken of the copy, so
     * even a payload that another thread changes while we work is framed with the
     * CRC of the bytes written. */
    PyThreadState *saved = total >= FRAME_NOGIL_FROM_BYTES ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        const size_t len = (size_t)views[i].len;
        unsigned char *payload = out + HEADER_BYTES;
        if (len)
            memcpy(payload, views[i].buf, len);
        put_be32(out, (uint32_t)len);
        put_be64(out + 4, (uint64_t)timestamp);
        put_be32(out + 12, crc32_ieee(payload, len));
        out = payload + len;
    }
    if (saved != NULL)
        PyEval_RestoreThread(saved);

done:
    for (Py_ssize_t i = 0; i < held; i++)
        PyBuffer_Release(&views[i]);
    if (views != stack_views)
        PyMem_Free(views);
    Py_DECREF(batch);
    return result;
}

/* ---- walks by length ------------------------------------------------------------- */

static PyObject *
frames_offset(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "frames_offset(data, skip)");
        return NULL;
    }
    Py_ssize_t skip = PyLong_AsSsize_t(args[1]);
    if (skip == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *data = view.buf;
    Py_ssize_t size = view.len, pos = 0;
    for (Py_ssize_t i = 0; i < skip && pos >= 0; i++) {
        if (size - pos < HEADER_BYTES)
            pos = -1;
        else
            pos += HEADER_BYTES + (Py_ssize_t)be32(data + pos);
    }
    if (pos > size)
        pos = -1;
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(pos);
}

static PyObject *
split_points(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "split_points(data, max_bytes)");
        return NULL;
    }
    Py_ssize_t max_bytes = PyLong_AsSsize_t(args[1]);
    if (max_bytes == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *data = view.buf;
    Py_ssize_t size = view.len, pos = 0, start = 0, count = 0, entry = 0;
    PyObject *points = PyList_New(0);
    if (points == NULL)
        goto done;
    while (pos < size) {
        if (size - pos < HEADER_BYTES || size - pos - HEADER_BYTES < (Py_ssize_t)be32(data + pos)) {
            PyErr_Format(PyExc_ValueError,
                         "run of frames ends inside entry %zd (at byte %zd of %zd)", entry, pos,
                         size);
            Py_CLEAR(points);
            goto done;
        }
        pos += HEADER_BYTES + (Py_ssize_t)be32(data + pos);
        count++;
        entry++;
        if (pos - start >= max_bytes || pos == size) {
            PyObject *point = Py_BuildValue("(nn)", count, pos);
            if (point == NULL || PyList_Append(points, point) < 0) {
                Py_XDECREF(point);
                Py_CLEAR(points);
                goto done;
            }
            Py_DECREF(point);
            start = pos;
            count = 0;
        }
    }
done:
    PyBuffer_Release(&view);
    return points;
}

static PyMethodDef methods[] = {
    {"scan_entries", (PyCFunction)(void (*)(void))scan_entries, METH_FASTCALL,
     "scan_entries(data, pos, seq, skip_before, stop_seq, out) -> "
     "(pos, seq, entries_passed, status)\n\n"
     "Append good entries to out from pos; stop before the first one that needs "
     "the Python code's judgement."},
    {"frames_offset", (PyCFunction)(void (*)(void))frames_offset, METH_FASTCALL,
     "frames_offset(data, skip) -> int\n\n"
     "Byte offset of frame number skip in a run of frames, by lengths only; "
     "-1 when the run ends before it."},
    {"split_points", (PyCFunction)(void (*)(void))split_points, METH_FASTCALL,
     "split_points(data, max_bytes) -> [(count, end), ...]\n\n"
     "Where to cut a run of frames into pieces of about max_bytes, by lengths only. "
     "ValueError when the run ends inside an entry."},
    {"crc32", crc32_py, METH_O, "CRC-32 (IEEE) of a bytes-like object, as zlib.crc32."},
    {"frame_payloads", (PyCFunction)(void (*)(void))frame_payloads, METH_FASTCALL,
     "frame_payloads(payloads, timestamp_us, too_large) -> bytes\n\n"
     "The ARCW entries of bytes-like payloads, one after another, all with timestamp_us. "
     "Every payload is checked first: one over MAX_PAYLOAD_BYTES raises too_large(size) "
     "and nothing is framed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "walrep.node._scan",
    .m_doc = "C fast paths of node.reader.scan() and decode_frames(), and of batch framing "
             "in node.writer.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    crc_init();
#ifdef WALREP_HAVE_CLMUL
    __builtin_cpu_init();
    const char *no_clmul = getenv("WALREP_NO_CLMUL"); /* tests compare both paths */
    have_clmul = __builtin_cpu_supports("pclmul") && !(no_clmul != NULL && *no_clmul != '\0');
#endif
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "STATUS_END", STATUS_END) < 0
        || PyModule_AddIntConstant(m, "STATUS_STOP_SEQ", STATUS_STOP_SEQ) < 0
        || PyModule_AddIntConstant(m, "STATUS_PARTIAL_HEADER", STATUS_PARTIAL_HEADER) < 0
        || PyModule_AddIntConstant(m, "STATUS_BAD_LENGTH", STATUS_BAD_LENGTH) < 0
        || PyModule_AddIntConstant(m, "STATUS_PAST_END", STATUS_PAST_END) < 0
        || PyModule_AddIntConstant(m, "STATUS_ZERO_HEADER", STATUS_ZERO_HEADER) < 0
        || PyModule_AddIntConstant(m, "STATUS_CRC_MISMATCH", STATUS_CRC_MISMATCH) < 0
        || PyModule_AddIntConstant(m, "STATUS_SEQ_LIMIT", STATUS_SEQ_LIMIT) < 0
        || PyModule_AddIntConstant(m, "MAX_PAYLOAD_BYTES", MAX_PAYLOAD_BYTES) < 0
        || PyModule_AddStringConstant(m, "CRC_IMPLEMENTATION", crc_implementation()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
