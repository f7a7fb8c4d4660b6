/* elkeid_agent._accel: the per-record hot path in C (accel/README.md).
 *
 * Every function here has a pure-Python twin that stays the reference
 * (elkeid_agent/native.py names them); both give byte-identical results and
 * the Python side keeps every error text. Where the input is not of the
 * exact types handled here (bytes, list/tuple of bytes) or the input is
 * bad in a way the pure function reports with an exception, the function
 * returns NotImplemented and native.pick() calls the pure twin, so the
 * exception and its text come from one place only.
 *
 * Built against the stable ABI of CPython 3.9 (Py_LIMITED_API 0x03090000):
 * one binary per architecture serves CPython 3.9-3.13. That rules out the
 * buffer protocol (limited API only from 3.11) and METH_FASTCALL (3.10),
 * hence exact bytes and METH_VARARGS.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------ protobuf */

/* The texts of wire.py's WireError for each way a Record's top level can
 * fail to parse (read_varint and iter_fields, in the order they check). */
static const char *const TRUNCATED_VARINT = "truncated varint";
static const char *const VARINT_OVERFLOW = "varint overflows 64 bits";
static const char *const VARINT_TOO_LONG = "varint longer than 10 bytes";
static const char *const FIELD_ZERO = "field number 0";
static const char *const LEN_PAST_END = "length-delimited field runs past the end";
static const char *const TRUNCATED_FIXED64 = "truncated fixed64";
static const char *const TRUNCATED_FIXED32 = "truncated fixed32";
/* "unsupported wire type %d" is built by the caller from bad_wire_type. */

/* wire.read_varint: at most 10 bytes, the value must fit 64 bits. */
static const char *
read_varint(const unsigned char *p, Py_ssize_t end, Py_ssize_t *pos, uint64_t *out)
{
    uint64_t result = 0;
    Py_ssize_t i = *pos;
    int shift;
    for (shift = 0; shift < 70; shift += 7) {
        unsigned char b;
        if (i >= end)
            return TRUNCATED_VARINT;
        b = p[i++];
        if (shift == 63) {
            /* Python's int does not overflow: the tenth byte is checked
             * for bits past 64 only when it ends the varint. */
            if (!(b & 0x80)) {
                if ((b & 0x7F) > 1)
                    return VARINT_OVERFLOW;
                result |= (uint64_t)(b & 0x7F) << 63;
                *pos = i;
                *out = result;
                return NULL;
            }
            break;
        }
        result |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *pos = i;
            *out = result;
            return NULL;
        }
    }
    return VARINT_TOO_LONG;
}

/* wire.decode_record(body, deep=False) as a check: NULL when the top level
 * parses, else the WireError text (*bad_wire_type >= 0 for "unsupported
 * wire type %d"). */
static const char *
record_error(const unsigned char *p, Py_ssize_t end, int *bad_wire_type)
{
    Py_ssize_t pos = 0;
    *bad_wire_type = -1;
    while (pos < end) {
        uint64_t key, value;
        unsigned int wire_type;
        const char *err = read_varint(p, end, &pos, &key);
        if (err)
            return err;
        wire_type = (unsigned int)(key & 7);
        if ((key >> 3) == 0)
            return FIELD_ZERO;
        switch (wire_type) {
        case 0:
            err = read_varint(p, end, &pos, &value);
            if (err)
                return err;
            break;
        case 2:
            err = read_varint(p, end, &pos, &value);
            if (err)
                return err;
            if (value > (uint64_t)(end - pos))
                return LEN_PAST_END;
            pos += (Py_ssize_t)value;
            break;
        case 1:
            if (end - pos < 8)
                return TRUNCATED_FIXED64;
            pos += 8;
            break;
        case 5:
            if (end - pos < 4)
                return TRUNCATED_FIXED32;
            pos += 4;
            break;
        default:
            *bad_wire_type = (int)wire_type;
            return "";
        }
    }
    return NULL;
}

static PyObject *
error_text(const char *err, int bad_wire_type)
{
    if (bad_wire_type >= 0)
        return PyUnicode_FromFormat("unsupported wire type %d", bad_wire_type);
    return PyUnicode_FromString(err);
}

static PyObject *
accel_record_error(PyObject *self, PyObject *args)
{
    const char *buf;
    Py_ssize_t len;
    int bad_wire_type;
    const char *err;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#:record_error", &buf, &len))
        return NULL;
    err = record_error((const unsigned char *)buf, len, &bad_wire_type);
    if (err == NULL)
        Py_RETURN_NONE;
    return error_text(err, bad_wire_type);
}

/* ------------------------------------------------------------ frames */

/* ingest.split_frames's statuses (the Python constants are the same). */
enum { SPLIT_COMPLETE = 0, SPLIT_PARTIAL = 1, SPLIT_TOO_LONG = 2, SPLIT_NOT_RECORD = 3 };

static PyObject *
split_result(PyObject *out, Py_ssize_t pos, int status, unsigned long n, PyObject *why)
{
    if (why == NULL) {
        Py_INCREF(Py_None);
        why = Py_None;
    }
    return Py_BuildValue("(NnikN)", out, pos, status, n, why);
}

/* A Python int as a long long, saturated (a bound past the C range compares
 * like the Python int would); -1 without an exception for a non-int. */
static int
saturated_long_long(PyObject *o, long long *out)
{
    int overflow;
    long long v;
    if (!PyLong_Check(o))
        return -1;
    v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -2;
    *out = overflow > 0 ? LLONG_MAX : overflow < 0 ? LLONG_MIN : v;
    return 0;
}

/* split_frames(data, max_frame, validate) -> (bodies, pos, status, n, why):
 * see ingest.split_frames, the reference. */
static PyObject *
accel_split_frames(PyObject *self, PyObject *args)
{
    PyObject *data, *limit, *out;
    long long max_frame;
    int validate, got;
    char *buf;
    Py_ssize_t end, pos = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOp:split_frames", &data, &limit, &validate))
        return NULL;
    got = saturated_long_long(limit, &max_frame);
    if (got == -2)
        return NULL;
    if (got < 0 || !PyBytes_CheckExact(data))
        Py_RETURN_NOTIMPLEMENTED;
    if (PyBytes_AsStringAndSize(data, &buf, &end) < 0)
        return NULL;
    out = PyList_New(0);
    if (out == NULL)
        return NULL;
    while (end - pos >= 4) {
        const unsigned char *h = (const unsigned char *)buf + pos;
        unsigned long n = (unsigned long)h[0] | ((unsigned long)h[1] << 8)
                          | ((unsigned long)h[2] << 16) | ((unsigned long)h[3] << 24);
        PyObject *body;
        if ((long long)n > max_frame)
            return split_result(out, pos, SPLIT_TOO_LONG, n, NULL);
        if ((Py_ssize_t)n > end - pos - 4)
            return split_result(out, pos, SPLIT_PARTIAL, n, NULL);
        if (validate) {
            int bad_wire_type;
            const char *err = record_error(h + 4, (Py_ssize_t)n, &bad_wire_type);
            if (err != NULL) {
                PyObject *why = error_text(err, bad_wire_type);
                if (why == NULL) {
                    Py_DECREF(out);
                    return NULL;
                }
                return split_result(out, pos, SPLIT_NOT_RECORD, n, why);
            }
        }
        body = PyBytes_FromStringAndSize((const char *)h + 4, (Py_ssize_t)n);
        if (body == NULL || PyList_Append(out, body) < 0) {
            Py_XDECREF(body);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(body);
        pos += 4 + (Py_ssize_t)n;
    }
    return split_result(out, pos, SPLIT_COMPLETE, 0, NULL);
}

/* ------------------------------------------------------------ batches */

/* The items of a list or tuple of exact bytes: borrowed references, or -1
 * when the sequence is something else (the pure twin handles it). Subclasses
 * count: the record queue's Batch is a list subclass (it adds attributes,
 * not a different iteration). */
static Py_ssize_t
bytes_items(PyObject *seq, PyObject **(*items))
{
    Py_ssize_t n, i;
    int is_list = PyList_Check(seq);
    if (!is_list && !PyTuple_Check(seq))
        return -1;
    n = is_list ? PyList_Size(seq) : PyTuple_Size(seq);
    *items = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(PyObject *));
    if (*items == NULL) {
        PyErr_NoMemory();
        return -2;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = is_list ? PyList_GetItem(seq, i) : PyTuple_GetItem(seq, i);
        if (item == NULL || !PyBytes_CheckExact(item)) {
            PyMem_Free(*items);
            *items = NULL;
            return -1;
        }
        (*items)[i] = item;
    }
    return n;
}

static int
varint_width(uint64_t v)
{
    int w = 1;
    while (v >= 0x80) {
        v >>= 7;
        w++;
    }
    return w;
}

static unsigned char *
put_varint(unsigned char *p, uint64_t v)
{
    while (v >= 0x80) {
        *p++ = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    *p++ = (unsigned char)v;
    return p;
}

/* packaged_data(records, header): wire.packaged_data in one allocation. */
static PyObject *
accel_packaged_data(PyObject *self, PyObject *args)
{
    PyObject *records, *header, *out;
    PyObject **items = NULL;
    Py_ssize_t count, i, total, header_len;
    unsigned char *p;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO:packaged_data", &records, &header))
        return NULL;
    if (!PyBytes_CheckExact(header))
        Py_RETURN_NOTIMPLEMENTED;
    count = bytes_items(records, &items);
    if (count == -2)
        return NULL;
    if (count < 0)
        Py_RETURN_NOTIMPLEMENTED;
    header_len = PyBytes_Size(header);
    total = header_len;
    for (i = 0; i < count; i++) {
        Py_ssize_t n = PyBytes_Size(items[i]);
        Py_ssize_t add = 1 + varint_width((uint64_t)n) + n;
        if (total > PY_SSIZE_T_MAX - add) {
            PyMem_Free(items);
            return PyErr_NoMemory();
        }
        total += add;
    }
    out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) {
        PyMem_Free(items);
        return NULL;
    }
    p = (unsigned char *)PyBytes_AsString(out);
    for (i = 0; i < count; i++) {
        Py_ssize_t n = PyBytes_Size(items[i]);
        *p++ = 0x0a;
        p = put_varint(p, (uint64_t)n);
        memcpy(p, PyBytes_AsString(items[i]), (size_t)n);
        p += n;
    }
    if (header_len)
        memcpy(p, PyBytes_AsString(header), (size_t)header_len);
    PyMem_Free(items);
    return out;
}

/* pack_records(records): spool.pack_records (u32 LE lengths, then bodies). */
static PyObject *
accel_pack_records(PyObject *self, PyObject *args)
{
    PyObject *records, *out;
    PyObject **items = NULL;
    Py_ssize_t count, i, total;
    unsigned char *p, *body;
    (void)self;
    if (!PyArg_ParseTuple(args, "O:pack_records", &records))
        return NULL;
    count = bytes_items(records, &items);
    if (count == -2)
        return NULL;
    if (count < 0)
        Py_RETURN_NOTIMPLEMENTED;
    if (count > PY_SSIZE_T_MAX / 4) {
        PyMem_Free(items);
        return PyErr_NoMemory();
    }
    total = count * 4;
    for (i = 0; i < count; i++) {
        Py_ssize_t n = PyBytes_Size(items[i]);
        /* struct.pack("I") refuses lengths past 32 bits: the pure twin
         * raises its error. */
        if ((uint64_t)n > 0xFFFFFFFFu || total > PY_SSIZE_T_MAX - n) {
            PyMem_Free(items);
            Py_RETURN_NOTIMPLEMENTED;
        }
        total += n;
    }
    out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) {
        PyMem_Free(items);
        return NULL;
    }
    p = (unsigned char *)PyBytes_AsString(out);
    body = p + count * 4;
    for (i = 0; i < count; i++) {
        Py_ssize_t n = PyBytes_Size(items[i]);
        uint32_t v = (uint32_t)n;
        p[0] = (unsigned char)v;
        p[1] = (unsigned char)(v >> 8);
        p[2] = (unsigned char)(v >> 16);
        p[3] = (unsigned char)(v >> 24);
        p += 4;
        memcpy(body, PyBytes_AsString(items[i]), (size_t)n);
        body += n;
    }
    PyMem_Free(items);
    return out;
}

/* unpack_records(raw, count): spool.unpack_records; NotImplemented for any
 * inconsistency, so the pure twin raises its CorruptFrame. */
static PyObject *
accel_unpack_records(PyObject *self, PyObject *args)
{
    PyObject *raw, *count_obj, *out;
    Py_ssize_t count, len, i, pos;
    long long wide;
    int got;
    uint64_t sum = 0;
    const unsigned char *buf;
    char *cbuf;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO:unpack_records", &raw, &count_obj))
        return NULL;
    got = saturated_long_long(count_obj, &wide);
    if (got == -2)
        return NULL;
    /* negative or absurd counts: the pure twin's error */
    if (got < 0 || wide < 0 || wide > PY_SSIZE_T_MAX || !PyBytes_CheckExact(raw))
        Py_RETURN_NOTIMPLEMENTED;
    count = (Py_ssize_t)wide;
    if (PyBytes_AsStringAndSize(raw, &cbuf, &len) < 0)
        return NULL;
    buf = (const unsigned char *)cbuf;
    if (count > len / 4)
        Py_RETURN_NOTIMPLEMENTED;
    for (i = 0; i < count; i++) {
        const unsigned char *h = buf + i * 4;
        sum += (uint64_t)h[0] | ((uint64_t)h[1] << 8) | ((uint64_t)h[2] << 16)
               | ((uint64_t)h[3] << 24);
    }
    if (sum != (uint64_t)(len - count * 4))
        Py_RETURN_NOTIMPLEMENTED;
    out = PyList_New(count);
    if (out == NULL)
        return NULL;
    pos = count * 4;
    for (i = 0; i < count; i++) {
        const unsigned char *h = buf + i * 4;
        Py_ssize_t n = (Py_ssize_t)((uint32_t)h[0] | ((uint32_t)h[1] << 8)
                                    | ((uint32_t)h[2] << 16) | ((uint32_t)h[3] << 24));
        PyObject *body = PyBytes_FromStringAndSize(cbuf + pos, n);
        if (body == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SetItem(out, i, body);  /* steals body */
        pos += n;
    }
    return out;
}

/* ------------------------------------------------------------ module */

static PyMethodDef accel_methods[] = {
    {"record_error", accel_record_error, METH_VARARGS,
     "record_error(body) -> None, or the WireError text of wire.decode_record(body, deep=False)."},
    {"split_frames", accel_split_frames, METH_VARARGS,
     "split_frames(data, max_frame, validate) -> (bodies, pos, status, n, why); see ingest.split_frames."},
    {"packaged_data", accel_packaged_data, METH_VARARGS,
     "packaged_data(records, header) -> bytes; see wire.packaged_data."},
    {"pack_records", accel_pack_records, METH_VARARGS,
     "pack_records(records) -> bytes; see buffer.spool.pack_records."},
    {"unpack_records", accel_unpack_records, METH_VARARGS,
     "unpack_records(raw, count) -> list; see buffer.spool.unpack_records."},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT, "_accel",
    "The per-record hot path in C; elkeid_agent.native decides whether it is used.",
    -1, accel_methods, NULL, NULL, NULL, NULL
};

PyMODINIT_FUNC
PyInit__accel(void)
{
    PyObject *m = PyModule_Create(&accel_module);
    if (m == NULL)
        return NULL;
    /* native.py refuses a binary whose interface is not the one it expects. */
    if (PyModule_AddIntConstant(m, "INTERFACE", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
