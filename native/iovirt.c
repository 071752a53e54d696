/*
 * iovirt native syscall layer.
 *
 * This file is deliberately thin: every exported function validates its
 * arguments, performs one (or a tightly coupled handful of) Linux system
 * calls, and converts the result to a JS value.  Descriptor ownership and
 * error typing live in the TypeScript wrapper (src/node/native.ts); retry and
 * buffering policy belong to its callers.
 *
 * Error conventions:
 *   - A failed system call throws an Error whose `code` is the errno name
 *     (e.g. "EAGAIN"), `errno` is the positive errno number and `syscall` is
 *     the name of the failing call.  The wrapper turns these into SysError.
 *   - A bad argument (wrong type, out of range) throws TypeError/RangeError
 *     with code "ERR_INVALID_ARG_TYPE"/"ERR_OUT_OF_RANGE"; those are caller
 *     bugs and carry no errno.
 *   - No function leaks a file descriptor on any error path: if anything
 *     fails after a descriptor was created, the descriptor is closed before
 *     the exception propagates.
 */

#include <node_api.h>
#include <uv.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* 2^53 - 1: every integer up to here is exactly representable as a JS
 * number.  Anything we accept or return as a number must stay within it. */
#define MAX_SAFE_INTEGER ((uint64_t)9007199254740991ULL)

/* Upper bound for SCM_RIGHTS on send: vhost-user needs at most 8 memory
 * regions per message, 16 leaves headroom while keeping the control buffer
 * on the stack. */
#define SEND_MAX_FDS 16
/* The kernel's own per-message limit (SCM_MAX_FD); receiving more than this
 * in one message is impossible, so it bounds the receive control buffer. */
#define RECV_MAX_FDS 253

/* Custom code for "ancillary data was truncated" (MSG_CTRUNC).  It is not a
 * real errno, so it is reported with errno 0. */
#define CODE_CTRUNC "ECTRUNC"

/* ------------------------------------------------------------------------ */
/* Error helpers                                                             */
/* ------------------------------------------------------------------------ */

static const char *errno_name(int err) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
  const char *name = strerrorname_np(err);
  if (name != NULL) return name;
#endif
  /* libuv's error codes are negated errno values on Unix, so its name table
   * doubles as a portable fallback (e.g. for musl). */
  return uv_err_name(-err);
}

static void set_named_property_str(napi_env env, napi_value obj, const char *key, const char *val) {
  napi_value v;
  if (napi_create_string_utf8(env, val, NAPI_AUTO_LENGTH, &v) == napi_ok)
    napi_set_named_property(env, obj, key, v);
}

static void set_named_property_int(napi_env env, napi_value obj, const char *key, int64_t val) {
  napi_value v;
  if (napi_create_int64(env, val, &v) == napi_ok) napi_set_named_property(env, obj, key, v);
}

/* Builds (but does not throw) the Error describing a failed system call.
 * Returns NULL only if the engine itself is failing. */
static napi_value make_sys_error(napi_env env, const char *syscall, const char *code, int err,
                                 const char *detail) {
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s (%s)", syscall, detail, code);
  napi_value code_v, msg_v, error;
  if (napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &code_v) != napi_ok ||
      napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &msg_v) != napi_ok ||
      napi_create_error(env, code_v, msg_v, &error) != napi_ok)
    return NULL;
  set_named_property_int(env, error, "errno", err);
  set_named_property_str(env, error, "syscall", syscall);
  return error;
}

/* Throws for errno `err` (positive).  Always returns NULL so call sites can
 * write `return throw_errno(...)`. */
static napi_value throw_errno(napi_env env, const char *syscall, int err) {
  napi_value error = make_sys_error(env, syscall, errno_name(err), err, strerror(err));
  if (error != NULL) napi_throw(env, error);
  return NULL;
}

static napi_value throw_arg(napi_env env, bool range, const char *name, const char *what) {
  char msg[200];
  snprintf(msg, sizeof msg, "argument '%s' %s", name, what);
  if (range)
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", msg);
  else
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
  return NULL;
}

/* An N-API call failing means a programming error in this file or an engine
 * in a bad state (e.g. terminating).  Surface it instead of crashing, but do
 * not mask an exception that is already pending. */
static void throw_napi_failure(napi_env env, const char *expr) {
  bool pending = false;
  if (napi_is_exception_pending(env, &pending) == napi_ok && pending) return;
  const napi_extended_error_info *info = NULL;
  napi_get_last_error_info(env, &info);
  char msg[300];
  snprintf(msg, sizeof msg, "internal N-API failure in %s: %s", expr,
           info != NULL && info->error_message != NULL ? info->error_message : "unknown");
  napi_throw_error(env, "ERR_IOVIRT_NAPI", msg);
}

#define NAPI_CALL(env, call)                                                                       \
  do {                                                                                             \
    if ((call) != napi_ok) {                                                                       \
      throw_napi_failure((env), #call);                                                            \
      return NULL;                                                                                 \
    }                                                                                              \
  } while (0)

/* Variant for functions that own resources: jumps to a cleanup label. */
#define NAPI_CALL_GOTO(env, call, label)                                                           \
  do {                                                                                             \
    if ((call) != napi_ok) {                                                                       \
      throw_napi_failure((env), #call);                                                            \
      goto label;                                                                                  \
    }                                                                                              \
  } while (0)

/* Variant for the bool-returning argument helpers below. */
#define NAPI_CALL_BOOL(env, call)                                                                  \
  do {                                                                                             \
    if ((call) != napi_ok) {                                                                       \
      throw_napi_failure((env), #call);                                                            \
      return false;                                                                                \
    }                                                                                              \
  } while (0)

/* Fetches exactly the declared number of arguments; missing ones read as
 * `undefined`, which the argument helpers reject or treat as defaults. */
#define GET_ARGS(n)                                                                                \
  size_t argc = (n);                                                                               \
  napi_value argv[(n) > 0 ? (n) : 1];                                                              \
  napi_value this_arg;                                                                             \
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, &this_arg, NULL));                      \
  (void)this_arg;                                                                                  \
  for (size_t i_ = argc; i_ < (n); i_++) NAPI_CALL(env, napi_get_undefined(env, &argv[i_]))

/* Closes a descriptor we created on an error path; errors are irrelevant
 * because the original failure is what gets reported. */
static void close_quietly(int fd) {
  int saved = errno;
  if (fd >= 0) close(fd);
  errno = saved;
}

/* ------------------------------------------------------------------------ */
/* Argument helpers: each returns false after throwing.                      */
/* ------------------------------------------------------------------------ */

static bool is_type(napi_env env, napi_value v, napi_valuetype want) {
  napi_valuetype t;
  return napi_typeof(env, v, &t) == napi_ok && t == want;
}

static bool arg_fd(napi_env env, napi_value v, const char *name, int *out) {
  double d;
  if (!is_type(env, v, napi_number) || napi_get_value_double(env, v, &d) != napi_ok) {
    throw_arg(env, false, name, "must be a file descriptor number");
    return false;
  }
  if (!(d >= 0 && d <= INT_MAX && d == (double)(int)d)) {
    throw_arg(env, true, name, "must be a non-negative integer file descriptor");
    return false;
  }
  *out = (int)d;
  return true;
}

/* Unsigned 64-bit quantity (length, offset, value): a safe-integer number or
 * a BigInt that converts losslessly.  BigInt exists so that offsets and
 * ioctl arguments above 2^53 remain expressible. */
static bool arg_u64(napi_env env, napi_value v, const char *name, uint64_t *out) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok) t = napi_undefined;
  if (t == napi_bigint) {
    bool lossless = false;
    uint64_t u;
    if (napi_get_value_bigint_uint64(env, v, &u, &lossless) != napi_ok || !lossless) {
      throw_arg(env, true, name, "must be a BigInt in [0, 2^64)");
      return false;
    }
    *out = u;
    return true;
  }
  if (t == napi_number) {
    double d;
    if (napi_get_value_double(env, v, &d) == napi_ok && d >= 0 && d <= (double)MAX_SAFE_INTEGER &&
        d == (double)(uint64_t)d) {
      *out = (uint64_t)d;
      return true;
    }
    throw_arg(env, true, name, "must be a non-negative safe integer");
    return false;
  }
  throw_arg(env, false, name, "must be a number or BigInt");
  return false;
}

/* File offsets are off_t (signed 64-bit); reject values that would wrap. */
static bool arg_off(napi_env env, napi_value v, const char *name, off_t *out) {
  uint64_t u;
  if (!arg_u64(env, v, name, &u)) return false;
  if (u > (uint64_t)INT64_MAX) {
    throw_arg(env, true, name, "must be below 2^63");
    return false;
  }
  *out = (off_t)u;
  return true;
}

static bool arg_int(napi_env env, napi_value v, const char *name, int64_t lo, int64_t hi,
                    int64_t *out) {
  double d;
  if (!is_type(env, v, napi_number) || napi_get_value_double(env, v, &d) != napi_ok) {
    throw_arg(env, false, name, "must be a number");
    return false;
  }
  if (!(d >= (double)lo && d <= (double)hi && d == (double)(int64_t)d)) {
    throw_arg(env, true, name, "is out of range");
    return false;
  }
  *out = (int64_t)d;
  return true;
}

/* Reads an optional boolean property of an options object.  `undefined` (for
 * either the object or the property) means false. */
static bool opt_flag(napi_env env, napi_value obj, const char *key, bool *out) {
  *out = false;
  napi_valuetype t;
  NAPI_CALL_BOOL(env, napi_typeof(env, obj, &t));
  if (t == napi_undefined || t == napi_null) return true;
  if (t != napi_object) {
    throw_arg(env, false, "options", "must be an object");
    return false;
  }
  napi_value v;
  NAPI_CALL_BOOL(env, napi_get_named_property(env, obj, key, &v));
  NAPI_CALL_BOOL(env, napi_typeof(env, v, &t));
  if (t == napi_undefined) return true;
  if (t != napi_boolean) {
    throw_arg(env, false, key, "must be a boolean");
    return false;
  }
  NAPI_CALL_BOOL(env, napi_get_value_bool(env, v, out));
  return true;
}

/* Copies a JS string into `buf`, rejecting truncation and embedded NULs:
 * both would silently make the kernel act on a different path. */
static bool arg_cstring(napi_env env, napi_value v, const char *name, char *buf, size_t size) {
  size_t len = 0;
  if (!is_type(env, v, napi_string) ||
      napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) {
    throw_arg(env, false, name, "must be a string");
    return false;
  }
  if (len + 1 > size) {
    throw_arg(env, true, name, "is too long");
    return false;
  }
  size_t copied = 0;
  NAPI_CALL_BOOL(env, napi_get_value_string_utf8(env, v, buf, size, &copied));
  if (strlen(buf) != copied) {
    throw_arg(env, true, name, "must not contain NUL characters");
    return false;
  }
  return true;
}

static size_t typedarray_element_size(napi_typedarray_type t) {
  switch (t) {
    case napi_int8_array:
    case napi_uint8_array:
    case napi_uint8_clamped_array: return 1;
    case napi_int16_array:
    case napi_uint16_array: return 2;
    case napi_int32_array:
    case napi_uint32_array:
    case napi_float32_array: return 4;
    default: return 8; /* float64, bigint64, biguint64 */
  }
}

/* Resolves any ArrayBuffer view (typed array or DataView) to a raw pointer
 * and byte length.  Works equally for views over heap ArrayBuffers,
 * SharedArrayBuffers and the external buffers returned by mmap(); N-API
 * already adds the view's byteOffset to the pointer. */
static bool arg_bytes(napi_env env, napi_value v, const char *name, void **data, size_t *len) {
  bool is_ta = false, is_dv = false;
  NAPI_CALL_BOOL(env, napi_is_typedarray(env, v, &is_ta));
  if (is_ta) {
    napi_typedarray_type type;
    size_t count;
    NAPI_CALL_BOOL(env, napi_get_typedarray_info(env, v, &type, &count, data, NULL, NULL));
    *len = count * typedarray_element_size(type);
    return true;
  }
  NAPI_CALL_BOOL(env, napi_is_dataview(env, v, &is_dv));
  if (is_dv) {
    NAPI_CALL_BOOL(env, napi_get_dataview_info(env, v, len, data, NULL, NULL));
    return true;
  }
  throw_arg(env, false, name, "must be a TypedArray or DataView");
  return false;
}

static napi_value make_fd(napi_env env, int fd) {
  napi_value v;
  if (napi_create_int32(env, fd, &v) != napi_ok) {
    close_quietly(fd);
    throw_napi_failure(env, "napi_create_int32");
    return NULL;
  }
  return v;
}

static napi_value make_number(napi_env env, double d) {
  napi_value v;
  NAPI_CALL(env, napi_create_double(env, d, &v));
  return v;
}

static napi_value make_undefined(napi_env env) {
  napi_value v;
  NAPI_CALL(env, napi_get_undefined(env, &v));
  return v;
}

/* ------------------------------------------------------------------------ */
/* Basic descriptors                                                         */
/* ------------------------------------------------------------------------ */

static napi_value js_getpagesize(napi_env env, napi_callback_info info) {
  (void)info;
  return make_number(env, (double)sysconf(_SC_PAGESIZE));
}

static napi_value js_close(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int fd;
  if (!arg_fd(env, argv[0], "fd", &fd)) return NULL;
  /* On Linux the descriptor is released even when close() reports EINTR, so
   * retrying could close an unrelated, newly allocated fd.  Treat EINTR as
   * success. */
  if (close(fd) < 0 && errno != EINTR) return throw_errno(env, "close", errno);
  return make_undefined(env);
}

static napi_value js_memfd_create(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  char name[250]; /* the kernel limit is 249 bytes plus NUL */
  bool sealing, hugetlb;
  if (!arg_cstring(env, argv[0], "name", name, sizeof name)) return NULL;
  if (!opt_flag(env, argv[1], "allowSealing", &sealing)) return NULL;
  if (!opt_flag(env, argv[1], "hugetlb", &hugetlb)) return NULL;
  /* MFD_HUGETLB: backed by the default huge page size (2 MiB on x86-64). */
  int fd = memfd_create(name, MFD_CLOEXEC | (sealing ? MFD_ALLOW_SEALING : 0) | (hugetlb ? MFD_HUGETLB : 0));
  if (fd < 0) return throw_errno(env, "memfd_create", errno);
  return make_fd(env, fd);
}

static napi_value js_ftruncate(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  int fd;
  off_t size;
  if (!arg_fd(env, argv[0], "fd", &fd) || !arg_off(env, argv[1], "size", &size)) return NULL;
  if (ftruncate(fd, size) < 0) return throw_errno(env, "ftruncate", errno);
  return make_undefined(env);
}

static napi_value js_open(napi_env env, napi_callback_info info) {
  GET_ARGS(4);
  bool direct, dsync, nonblock;
  char path[PATH_MAX];
  char flags_s[16];
  int64_t mode = 0666;
  if (!arg_cstring(env, argv[0], "path", path, sizeof path)) return NULL;
  if (!arg_cstring(env, argv[1], "flags", flags_s, sizeof flags_s)) return NULL;
  if (!is_type(env, argv[2], napi_undefined) && !arg_int(env, argv[2], "mode", 0, 07777, &mode))
    return NULL;
  int flags;
  if (strcmp(flags_s, "r") == 0)
    flags = O_RDONLY;
  else if (strcmp(flags_s, "rw") == 0)
    flags = O_RDWR;
  else if (strcmp(flags_s, "rw+create") == 0)
    flags = O_RDWR | O_CREAT;
  else
    return throw_arg(env, true, "flags", "must be 'r', 'rw' or 'rw+create'");
  if (!opt_flag(env, argv[3], "direct", &direct) || !opt_flag(env, argv[3], "dsync", &dsync) ||
      !opt_flag(env, argv[3], "nonblock", &nonblock))
    return NULL;
  if (direct) flags |= O_DIRECT;
  if (dsync) flags |= O_DSYNC;
  if (nonblock) flags |= O_NONBLOCK;
  int fd = open(path, flags | O_CLOEXEC, (mode_t)mode);
  if (fd < 0) return throw_errno(env, "open", errno);
  return make_fd(env, fd);
}

static napi_value js_fstat(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int fd;
  if (!arg_fd(env, argv[0], "fd", &fd)) return NULL;
  struct stat st;
  if (fstat(fd, &st) < 0) return throw_errno(env, "fstat", errno);
  napi_value obj, size, mode;
  NAPI_CALL(env, napi_create_object(env, &obj));
  NAPI_CALL(env, napi_create_double(env, (double)st.st_size, &size));
  NAPI_CALL(env, napi_create_uint32(env, (uint32_t)st.st_mode, &mode));
  NAPI_CALL(env, napi_set_named_property(env, obj, "size", size));
  NAPI_CALL(env, napi_set_named_property(env, obj, "mode", mode));
  return obj;
}

static napi_value js_fdatasync(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int fd;
  if (!arg_fd(env, argv[0], "fd", &fd)) return NULL;
  if (fdatasync(fd) < 0) return throw_errno(env, "fdatasync", errno);
  return make_undefined(env);
}

static napi_value js_fallocate(napi_env env, napi_callback_info info) {
  GET_ARGS(4);
  int fd;
  bool punch, keep, zero;
  off_t offset, len;
  if (!arg_fd(env, argv[0], "fd", &fd) || !opt_flag(env, argv[1], "punchHole", &punch) ||
      !opt_flag(env, argv[1], "keepSize", &keep) || !opt_flag(env, argv[1], "zeroRange", &zero) ||
      !arg_off(env, argv[2], "offset", &offset) || !arg_off(env, argv[3], "len", &len))
    return NULL;
  /* Flags are passed through unmodified; the kernel enforces combinations
   * (e.g. PUNCH_HOLE requires KEEP_SIZE) and reports EINVAL/EOPNOTSUPP. */
  int mode = (punch ? FALLOC_FL_PUNCH_HOLE : 0) | (keep ? FALLOC_FL_KEEP_SIZE : 0) |
             (zero ? FALLOC_FL_ZERO_RANGE : 0);
  if (fallocate(fd, mode, offset, len) < 0) return throw_errno(env, "fallocate", errno);
  return make_undefined(env);
}

/* pread/pwrite block the JS thread for the duration of the I/O; callers that
 * need concurrency run them in a worker.  The target may be any view,
 * including one over a SharedArrayBuffer or an mmap()ed buffer. */
static napi_value js_pread(napi_env env, napi_callback_info info) {
  GET_ARGS(3);
  int fd;
  void *data;
  size_t len;
  off_t offset;
  if (!arg_fd(env, argv[0], "fd", &fd) || !arg_bytes(env, argv[1], "buffer", &data, &len) ||
      !arg_off(env, argv[2], "offset", &offset))
    return NULL;
  ssize_t n = pread(fd, data, len, offset);
  if (n < 0) return throw_errno(env, "pread", errno);
  return make_number(env, (double)n);
}

static napi_value js_pwrite(napi_env env, napi_callback_info info) {
  GET_ARGS(3);
  int fd;
  void *data;
  size_t len;
  off_t offset;
  if (!arg_fd(env, argv[0], "fd", &fd) || !arg_bytes(env, argv[1], "buffer", &data, &len) ||
      !arg_off(env, argv[2], "offset", &offset))
    return NULL;
  ssize_t n = pwrite(fd, data, len, offset);
  if (n < 0) return throw_errno(env, "pwrite", errno);
  return make_number(env, (double)n);
}

static napi_value js_ioctl(napi_env env, napi_callback_info info) {
  GET_ARGS(3);
  int fd;
  uint64_t request;
  if (!arg_fd(env, argv[0], "fd", &fd) || !arg_u64(env, argv[1], "request", &request)) return NULL;
  bool is_number = is_type(env, argv[2], napi_number) || is_type(env, argv[2], napi_bigint);
  unsigned long arg;
  if (is_number) {
    uint64_t u;
    if (!arg_u64(env, argv[2], "arg", &u)) return NULL;
    arg = (unsigned long)u;
  } else if (is_type(env, argv[2], napi_undefined)) {
    arg = 0;
  } else {
    void *data;
    size_t len;
    if (!arg_bytes(env, argv[2], "arg", &data, &len)) return NULL;
    arg = (unsigned long)(uintptr_t)data;
  }
  int r = ioctl(fd, (unsigned long)request, arg);
  if (r < 0) return throw_errno(env, "ioctl", errno);
  return make_number(env, (double)r);
}

static napi_value js_address_of(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  void *data = NULL;
  size_t len;
  bool is_ab = false;
  NAPI_CALL(env, napi_is_arraybuffer(env, argv[0], &is_ab));
  if (is_ab) {
    NAPI_CALL(env, napi_get_arraybuffer_info(env, argv[0], &data, &len));
  } else if (!arg_bytes(env, argv[0], "view", &data, &len)) {
    return NULL;
  }
  napi_value v;
  NAPI_CALL(env, napi_create_bigint_uint64(env, (uint64_t)(uintptr_t)data, &v));
  return v;
}

/* ------------------------------------------------------------------------ */
/* mmap                                                                      */
/* ------------------------------------------------------------------------ */

/* ---- SIGBUS guard ------------------------------------------------------
 * A front end may shrink a memfd after we mapped it (or hand us one that
 * does not cover what it claims); touching a page past the file's end then
 * raises SIGBUS, which would kill the whole back end.  Guarded mappings are
 * registered here.  The handler replaces the faulting page with a private
 * zero page, marks the mapping poisoned and returns: the access is retried
 * and reads zeros, and the TypeScript side sees the poison and fails the
 * device instead of trusting what it read.  Only pages that user space
 * touched are replaced, so the kernel's own copies (pread/pwrite straight
 * into guest memory) still see the hole and fail with EFAULT: a disk write
 * from lost memory fails instead of writing zeros.
 *
 * Slots are written only under guard_lock on a JS thread and read without
 * locks by the handler, which may run on any thread: `start` is published
 * last and withdrawn first. */
#define GUARD_SLOTS 16384 /* one per mapping: 16 TiB of guest RAM in 1 GiB windows */
/* Pages of one mapping replaced one by one before the rest of it is replaced
 * in one go: each lone replacement splits the mapping, and a front end that
 * makes us touch many scattered lost pages would otherwise exhaust
 * vm.max_map_count, after which the guard could not help. */
#define GUARD_PAGE_CAP 64

typedef struct {
  _Atomic uintptr_t start; /* 0 = free */
  _Atomic uintptr_t end;
  _Atomic int poisoned;
  _Atomic unsigned replaced; /* pages replaced one by one */
} guard_slot_t;

static guard_slot_t guard_slots[GUARD_SLOTS];
static _Atomic unsigned guard_events;
static pthread_mutex_t guard_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction guard_previous;
static bool guard_installed;
static uintptr_t guard_page_mask;

static void guard_sigbus(int sig, siginfo_t *si, void *uc) {
  uintptr_t a = (uintptr_t)si->si_addr;
  /* si_code <= 0: sent by kill() or sigqueue(), not a fault; si_addr means nothing then. */
  for (int i = 0; si->si_code > 0 && i < GUARD_SLOTS; i++) {
    uintptr_t start = atomic_load(&guard_slots[i].start);
    uintptr_t end = atomic_load(&guard_slots[i].end);
    if (start == 0 || a < start || a >= end) continue;
    uintptr_t page = a & guard_page_mask;
    size_t len = (size_t)(~guard_page_mask + 1);
    if (atomic_fetch_add(&guard_slots[i].replaced, 1) >= GUARD_PAGE_CAP) len = end - page;
    void *r = mmap((void *)page, len, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r == MAP_FAILED) break;
    atomic_store(&guard_slots[i].poisoned, 1);
    atomic_fetch_add(&guard_events, 1);
    return;
  }
  /* Not ours: what would have happened without us. */
  if ((guard_previous.sa_flags & SA_SIGINFO) != 0 && guard_previous.sa_sigaction != NULL) {
    guard_previous.sa_sigaction(sig, si, uc);
  } else if (guard_previous.sa_handler == SIG_IGN) {
    return;
  } else if (guard_previous.sa_handler != SIG_DFL) {
    guard_previous.sa_handler(sig);
  } else {
    /* The default action, terminate: for a fault, returning re-executes the access, which
     * faults again; a sent signal is raised again and delivered when we return. */
    signal(SIGBUS, SIG_DFL);
    if (si->si_code <= 0) raise(SIGBUS);
  }
}

/* Registers [start, end); returns the slot, or -1 (errno set) when the handler
 * cannot be installed or every slot is taken. */
static int guard_register(uintptr_t start, uintptr_t end) {
  int slot = -1;
  pthread_mutex_lock(&guard_lock);
  if (!guard_installed) {
    guard_page_mask = ~((uintptr_t)sysconf(_SC_PAGESIZE) - 1);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = guard_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &guard_previous) == 0) guard_installed = true;
  }
  if (guard_installed) {
    for (int i = 0; i < GUARD_SLOTS; i++) {
      if (atomic_load(&guard_slots[i].start) != 0) continue;
      atomic_store(&guard_slots[i].end, end);
      atomic_store(&guard_slots[i].poisoned, 0);
      atomic_store(&guard_slots[i].replaced, 0);
      atomic_store(&guard_slots[i].start, start);
      slot = i;
      break;
    }
    if (slot < 0) errno = ENOSPC;
  }
  pthread_mutex_unlock(&guard_lock);
  return slot;
}

static void guard_unregister(int slot) {
  if (slot < 0) return;
  pthread_mutex_lock(&guard_lock);
  atomic_store(&guard_slots[slot].start, 0);
  pthread_mutex_unlock(&guard_lock);
}

/* Shared between the ArrayBuffer's finalizer and explicit munmap().  Once
 * the buffer exists the finalizer owns freeing it; munmap() only flips
 * `unmapped`.  `data` is what the buffer shows: `addr` plus the distance
 * from the page-aligned offset that was mapped to the offset asked for. */
typedef struct {
  void *addr;
  size_t len;
  int guard; /* guard slot, or -1 */
  bool unmapped;
  bool owned_by_buffer;
} mapping_t;

/* Unmaps once (and stops guarding); returns munmap's errno, 0 on success or when already done. */
static int mapping_release(mapping_t *m) {
  if (m->unmapped) return 0;
  guard_unregister(m->guard);
  m->guard = -1;
  m->unmapped = true;
  return munmap(m->addr, m->len) < 0 ? errno : 0;
}

/* Node runs external-buffer finalizers on the JS thread, so the flags need
 * no synchronisation with js_munmap.  V8 may also run the finalizer while
 * napi_create_external_arraybuffer fails (for example a buffer over its
 * size limit); the record then still belongs to js_mmap, which frees it. */
static void mapping_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)data;
  mapping_t *m = hint;
  mapping_release(m);
  if (m->owned_by_buffer) free(m);
}

static napi_value js_mmap(napi_env env, napi_callback_info info) {
  GET_ARGS(6);
  int fd;
  uint64_t length;
  off_t offset;
  char prot_s[4];
  bool shared, guard = false;
  if (!arg_fd(env, argv[0], "fd", &fd) || !arg_u64(env, argv[1], "length", &length) ||
      !arg_off(env, argv[2], "offset", &offset) ||
      !arg_cstring(env, argv[3], "prot", prot_s, sizeof prot_s))
    return NULL;
  if (!is_type(env, argv[4], napi_boolean)) return throw_arg(env, false, "shared", "must be a boolean");
  NAPI_CALL(env, napi_get_value_bool(env, argv[4], &shared));
  if (!is_type(env, argv[5], napi_undefined)) {
    if (!is_type(env, argv[5], napi_boolean)) return throw_arg(env, false, "guard", "must be a boolean");
    NAPI_CALL(env, napi_get_value_bool(env, argv[5], &guard));
  }
  int prot;
  if (strcmp(prot_s, "r") == 0)
    prot = PROT_READ;
  else if (strcmp(prot_s, "rw") == 0)
    prot = PROT_READ | PROT_WRITE;
  else
    return throw_arg(env, true, "prot", "must be 'r' or 'rw'");
  /* The kernel would reject 0 with EINVAL too, but an empty external
   * ArrayBuffer cannot be told apart from a detached one. */
  if (length == 0) return throw_arg(env, true, "length", "must be greater than 0");
  /* Any offset: map from the page below it and show the buffer from there. */
  size_t delta = (size_t)offset % (size_t)sysconf(_SC_PAGESIZE);
  if (length > SIZE_MAX - delta) return throw_arg(env, true, "length", "is too large");

  mapping_t *m = malloc(sizeof *m);
  if (m == NULL) return throw_errno(env, "mmap", ENOMEM);
  void *addr = mmap(NULL, (size_t)length + delta, prot, shared ? MAP_SHARED : MAP_PRIVATE, fd, offset - (off_t)delta);
  if (addr == MAP_FAILED) {
    int err = errno;
    free(m);
    return throw_errno(env, "mmap", err);
  }
  m->addr = addr;
  m->len = (size_t)length + delta;
  m->guard = -1;
  m->unmapped = false;
  m->owned_by_buffer = false;
  if (guard) {
    m->guard = guard_register((uintptr_t)addr, (uintptr_t)addr + m->len);
    if (m->guard < 0) {
      int err = errno;
      mapping_release(m);
      free(m);
      return throw_errno(env, "mmap (SIGBUS guard: handler or slots)", err);
    }
  }

  napi_value ab;
  if (napi_create_external_arraybuffer(env, (char *)addr + delta, (size_t)length, mapping_finalize, m, &ab) != napi_ok) {
    /* Engines built with the V8 sandbox refuse external buffers, and V8
     * refuses buffers over its size limit (4 GiB in Node 20).  The finalizer
     * may or may not have run; either way the record is still ours. */
    mapping_release(m);
    free(m);
    throw_napi_failure(env, "napi_create_external_arraybuffer");
    return NULL;
  }
  m->owned_by_buffer = true;
  /* Attaching the record to the buffer lets munmap() find it without a
   * global table; the wrap has no finalizer because the buffer finalizer
   * owns the record. */
  if (napi_wrap(env, ab, m, NULL, NULL, NULL) != napi_ok) {
    /* The finalizer will munmap and free when the buffer is collected. */
    throw_napi_failure(env, "napi_wrap");
    return NULL;
  }
  return ab;
}

/* The mapping record of a live buffer returned by mmap(), or NULL after throwing. */
static mapping_t *mapping_of(napi_env env, napi_value v) {
  bool is_ab = false;
  void *m_ptr = NULL;
  if (napi_is_arraybuffer(env, v, &is_ab) != napi_ok || !is_ab || napi_unwrap(env, v, &m_ptr) != napi_ok || m_ptr == NULL) {
    throw_arg(env, false, "buffer", "must be a live ArrayBuffer returned by mmap()");
    return NULL;
  }
  return m_ptr;
}

/* Whether the SIGBUS guard replaced part of a guarded mapping with zero pages. */
static napi_value js_mapping_poisoned(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  mapping_t *m = mapping_of(env, argv[0]);
  if (m == NULL) return NULL;
  napi_value v;
  NAPI_CALL(env, napi_get_boolean(env, m->guard >= 0 && atomic_load(&guard_slots[m->guard].poisoned) != 0, &v));
  return v;
}

/* How many SIGBUS faults the guard has absorbed in this process: a cheap
 * "did anything happen" check before asking each mapping. */
/* guardCounter() -> an ArrayBuffer over the 4-byte event counter itself, so
 * hot paths read it with one atomic load instead of a call into the addon.
 * The counter is static: the buffer never dangles and needs no finalizer. */
static napi_value js_guard_counter(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value ab;
  NAPI_CALL(env, napi_create_external_arraybuffer(env, (void *)&guard_events, sizeof guard_events, NULL, NULL, &ab));
  return ab;
}

static napi_value js_guard_events(napi_env env, napi_callback_info info) {
  (void)info;
  return make_number(env, (double)atomic_load(&guard_events));
}

/* fcntl(F_ADD_SEALS) on a memfd created with sealing allowed. */
static napi_value js_add_seals(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  int fd;
  int64_t seals;
  if (!arg_fd(env, argv[0], "fd", &fd) || !arg_int(env, argv[1], "seals", 0, INT_MAX, &seals)) return NULL;
  if (fcntl(fd, F_ADD_SEALS, (int)seals) < 0) return throw_errno(env, "fcntl", errno);
  return make_undefined(env);
}

/* fcntl(F_GET_SEALS): the seals of a memfd (EINVAL for files that cannot be sealed). */
static napi_value js_get_seals(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int fd;
  if (!arg_fd(env, argv[0], "fd", &fd)) return NULL;
  int r = fcntl(fd, F_GET_SEALS);
  if (r < 0) return throw_errno(env, "fcntl", errno);
  return make_number(env, (double)r);
}

/* mlock(2) of a whole buffer returned by mmap(): keeps its pages resident
 * (UIO DMA buffers, whose physical addresses must not change). */
static napi_value js_mlock(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  mapping_t *m = mapping_of(env, argv[0]);
  if (m == NULL) return NULL;
  if (mlock(m->addr, m->len) < 0) return throw_errno(env, "mlock", errno);
  return make_undefined(env);
}

static napi_value js_munmap(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  bool is_ab = false;
  NAPI_CALL(env, napi_is_arraybuffer(env, argv[0], &is_ab));
  if (!is_ab) return throw_arg(env, false, "buffer", "must be an ArrayBuffer returned by mmap()");
  void *m_ptr = NULL;
  if (napi_unwrap(env, argv[0], &m_ptr) != napi_ok || m_ptr == NULL) {
    /* Unmapping twice is harmless: the first call removed the wrap and
     * detached the buffer. */
    bool detached = false;
    NAPI_CALL(env, napi_is_detached_arraybuffer(env, argv[0], &detached));
    if (detached) return make_undefined(env);
    return throw_arg(env, false, "buffer", "must be an ArrayBuffer returned by mmap()");
  }
  mapping_t *m = m_ptr;
  int err = mapping_release(m);
  if (err != 0) return throw_errno(env, "munmap", err);
  /* Order matters: drop the wrap first so no later call can reach a record
   * the finalizer may free once the detach releases the backing store. */
  void *ignored;
  NAPI_CALL(env, napi_remove_wrap(env, argv[0], &ignored));
  NAPI_CALL(env, napi_detach_arraybuffer(env, argv[0]));
  return make_undefined(env);
}

/* ------------------------------------------------------------------------ */
/* eventfd                                                                   */
/* ------------------------------------------------------------------------ */

static napi_value js_eventfd(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  int64_t initval;
  bool nonblock, semaphore;
  if (!arg_int(env, argv[0], "initval", 0, UINT32_MAX, &initval) ||
      !opt_flag(env, argv[1], "nonblock", &nonblock) ||
      !opt_flag(env, argv[1], "semaphore", &semaphore))
    return NULL;
  int flags = EFD_CLOEXEC | (nonblock ? EFD_NONBLOCK : 0) | (semaphore ? EFD_SEMAPHORE : 0);
  int fd = eventfd((unsigned int)initval, flags);
  if (fd < 0) return throw_errno(env, "eventfd", errno);
  return make_fd(env, fd);
}

static napi_value js_eventfd_read(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int fd;
  if (!arg_fd(env, argv[0], "fd", &fd)) return NULL;
  uint64_t value;
  ssize_t n = read(fd, &value, sizeof value);
  if (n < 0) return throw_errno(env, "read", errno);
  if (n != (ssize_t)sizeof value) return throw_errno(env, "read", EIO);
  /* The counter is 64-bit; a number above 2^53 would be silently rounded,
   * so fail loudly instead (the counter has been consumed regardless).  Only
   * a writer adding values of that magnitude can cause this. */
  if (value > MAX_SAFE_INTEGER) return throw_errno(env, "read", ERANGE);
  return make_number(env, (double)value);
}

static napi_value js_eventfd_write(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  int fd;
  uint64_t value;
  if (!arg_fd(env, argv[0], "fd", &fd) || !arg_u64(env, argv[1], "value", &value)) return NULL;
  ssize_t n = write(fd, &value, sizeof value);
  if (n < 0) return throw_errno(env, "write", errno);
  if (n != (ssize_t)sizeof value) return throw_errno(env, "write", EIO);
  return make_undefined(env);
}

/* ------------------------------------------------------------------------ */
/* Readiness watching (uv_poll_t)                                            */
/* ------------------------------------------------------------------------ */

/* Lifetime: a watcher starts active, holding a strong reference to its JS
 * handle object so an active watcher is never collected out from under
 * libuv.  Stopping (explicitly or at environment teardown) releases every JS
 * reference and starts uv_close(); the memory is freed only in the close
 * callback, which libuv runs after the last poll callback.
 *
 * The async cleanup hook stays registered until that close callback: Node
 * unloads the addon's code when a worker thread exits, and it must not do so
 * while libuv still holds a pointer to watcher_on_close. */
typedef struct {
  uv_poll_t poll;
  napi_env env;
  napi_ref callback;      /* strong */
  napi_ref self;          /* strong until closed */
  napi_async_context ctx; /* makes callbacks visible to async_hooks and
                             drains microtasks after each callback */
  napi_async_cleanup_hook_handle cleanup;
  bool stopped;     /* no further JS callbacks */
  bool in_callback; /* JS callback (or its uncaught-exception handling) on stack */
  bool closing;     /* uv_close issued; JS references released */
} watcher_t;

static void watcher_on_close(uv_handle_t *handle) {
  watcher_t *w = handle->data;
  if (w->cleanup != NULL) napi_remove_async_cleanup_hook(w->cleanup);
  free(w);
}

/* Releases the JS side and closes the handle; idempotent.  Must not run
 * while the JS callback is on the stack because its async context is in
 * use, hence the deferral in watcher_stop. */
static void watcher_close(watcher_t *w) {
  if (w->closing) return;
  w->closing = true;
  if (w->callback != NULL) napi_delete_reference(w->env, w->callback);
  if (w->self != NULL) napi_delete_reference(w->env, w->self);
  if (w->ctx != NULL) napi_async_destroy(w->env, w->ctx);
  w->callback = w->self = NULL;
  w->ctx = NULL;
  uv_close((uv_handle_t *)&w->poll, watcher_on_close);
}

static void watcher_stop(watcher_t *w) {
  if (w->stopped) return;
  w->stopped = true;
  uv_poll_stop(&w->poll);
  if (!w->in_callback) watcher_close(w);
}

/* The environment is going away (process exit or worker termination) with
 * the watcher possibly still active; an open handle would break the loop
 * teardown, so close it now.  No JS can be running at this point. */
static void watcher_env_cleanup(napi_async_cleanup_hook_handle handle, void *arg) {
  (void)handle;
  watcher_t *w = arg;
  w->in_callback = false;
  watcher_stop(w);
  watcher_close(w);
}

static const char *events_string(int events) {
  bool r = (events & UV_READABLE) != 0, wr = (events & UV_WRITABLE) != 0;
  return r && wr ? "rw" : r ? "r" : wr ? "w" : "";
}

static void watcher_on_poll(uv_poll_t *handle, int status, int events) {
  watcher_t *w = handle->data;
  if (w->stopped) return;
  napi_env env = w->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;

  napi_value cb, recv, argv[2];
  if (napi_get_reference_value(env, w->callback, &cb) != napi_ok || cb == NULL ||
      napi_get_reference_value(env, w->self, &recv) != napi_ok || recv == NULL)
    goto out;
  if (status < 0) {
    argv[0] = make_sys_error(env, "poll", uv_err_name(status), -status, uv_strerror(status));
    if (argv[0] == NULL) goto out;
  } else if (napi_get_null(env, &argv[0]) != napi_ok) {
    goto out;
  }
  if (napi_create_string_utf8(env, events_string(events), NAPI_AUTO_LENGTH, &argv[1]) != napi_ok)
    goto out;

  /* in_callback spans the exception handling too: an 'uncaughtException'
   * listener may call stop() synchronously from napi_fatal_exception. */
  w->in_callback = true;
  if (napi_make_callback(env, w->ctx, recv, cb, 2, argv, NULL) == napi_pending_exception) {
    /* No JS frame below us can catch it: route the exception to process
     * 'uncaughtException' like any other event-loop callback. */
    napi_value exc;
    if (napi_get_and_clear_last_exception(env, &exc) == napi_ok) napi_fatal_exception(env, exc);
  }
  w->in_callback = false;
  /* stop() was called during the callback; finish what it deferred. */
  if (w->stopped) watcher_close(w);
out:
  napi_close_handle_scope(env, scope);
}

/* Resolves `this` of stop/ref/unref.  NULL (without an exception) means the
 * watcher was already stopped: stop() removes the wrap, and calling these
 * methods afterwards is harmless. */
static bool watcher_from_this(napi_env env, napi_callback_info info, napi_value *this_out,
                              watcher_t **out) {
  void *ptr = NULL;
  *out = NULL;
  if (napi_get_cb_info(env, info, NULL, NULL, this_out, NULL) != napi_ok) {
    throw_napi_failure(env, "napi_get_cb_info");
    return false;
  }
  if (napi_unwrap(env, *this_out, &ptr) == napi_ok) *out = ptr;
  return true;
}

static napi_value js_watcher_stop(napi_env env, napi_callback_info info) {
  napi_value this_arg;
  watcher_t *w;
  if (!watcher_from_this(env, info, &this_arg, &w)) return NULL;
  if (w != NULL) {
    void *ignored;
    NAPI_CALL(env, napi_remove_wrap(env, this_arg, &ignored));
    watcher_stop(w);
  }
  return make_undefined(env);
}

static napi_value js_watcher_ref(napi_env env, napi_callback_info info) {
  napi_value this_arg;
  watcher_t *w;
  if (!watcher_from_this(env, info, &this_arg, &w)) return NULL;
  if (w != NULL && !w->stopped) uv_ref((uv_handle_t *)&w->poll);
  return make_undefined(env);
}

static napi_value js_watcher_unref(napi_env env, napi_callback_info info) {
  napi_value this_arg;
  watcher_t *w;
  if (!watcher_from_this(env, info, &this_arg, &w)) return NULL;
  if (w != NULL && !w->stopped) uv_unref((uv_handle_t *)&w->poll);
  return make_undefined(env);
}

static napi_value js_watch(napi_env env, napi_callback_info info) {
  GET_ARGS(3);
  int fd;
  char events_s[4];
  if (!arg_fd(env, argv[0], "fd", &fd) ||
      !arg_cstring(env, argv[1], "events", events_s, sizeof events_s))
    return NULL;
  int events;
  if (strcmp(events_s, "r") == 0)
    events = UV_READABLE;
  else if (strcmp(events_s, "w") == 0)
    events = UV_WRITABLE;
  else if (strcmp(events_s, "rw") == 0)
    events = UV_READABLE | UV_WRITABLE;
  else
    return throw_arg(env, true, "events", "must be 'r', 'w' or 'rw'");
  if (!is_type(env, argv[2], napi_function))
    return throw_arg(env, false, "callback", "must be a function");

  uv_loop_t *loop;
  NAPI_CALL(env, napi_get_uv_event_loop(env, &loop));

  watcher_t *w = calloc(1, sizeof *w);
  if (w == NULL) return throw_errno(env, "uv_poll_init", ENOMEM);
  w->env = env;
  int rc = uv_poll_init(loop, &w->poll, fd);
  if (rc < 0) {
    free(w); /* a failed uv_poll_init leaves nothing to close */
    napi_value err = make_sys_error(env, "uv_poll_init", uv_err_name(rc), -rc, uv_strerror(rc));
    if (err != NULL) napi_throw(env, err);
    return NULL;
  }
  w->poll.data = w;
  /* From here on the handle is initialised: every failure path must go
   * through watcher_close (uv_close), never free(). */

  napi_value handle, name;
  napi_property_descriptor methods[] = {
      {"stop", NULL, js_watcher_stop, NULL, NULL, NULL, napi_default, NULL},
      {"ref", NULL, js_watcher_ref, NULL, NULL, NULL, napi_default, NULL},
      {"unref", NULL, js_watcher_unref, NULL, NULL, NULL, napi_default, NULL},
  };
  NAPI_CALL_GOTO(env, napi_add_async_cleanup_hook(env, watcher_env_cleanup, w, &w->cleanup), fail);
  NAPI_CALL_GOTO(env, napi_create_object(env, &handle), fail);
  NAPI_CALL_GOTO(env, napi_define_properties(env, handle, 3, methods), fail);
  NAPI_CALL_GOTO(env, napi_create_reference(env, argv[2], 1, &w->callback), fail);
  NAPI_CALL_GOTO(env, napi_create_reference(env, handle, 1, &w->self), fail);
  NAPI_CALL_GOTO(env, napi_create_string_utf8(env, "iovirt:watch", NAPI_AUTO_LENGTH, &name), fail);
  NAPI_CALL_GOTO(env, napi_async_init(env, handle, name, &w->ctx), fail);
  rc = uv_poll_start(&w->poll, events, watcher_on_poll);
  if (rc < 0) {
    napi_value err = make_sys_error(env, "uv_poll_start", uv_err_name(rc), -rc, uv_strerror(rc));
    if (err != NULL) napi_throw(env, err);
    goto fail;
  }
  /* Wrap last: once wrapped, stop() can reach the watcher. */
  if (napi_wrap(env, handle, w, NULL, NULL, NULL) != napi_ok) {
    uv_poll_stop(&w->poll);
    throw_napi_failure(env, "napi_wrap");
    goto fail;
  }
  return handle;

fail:
  w->stopped = true;
  watcher_close(w);
  return NULL;
}

/* ------------------------------------------------------------------------ */
/* Unix domain sockets                                                       */
/* ------------------------------------------------------------------------ */

static bool fill_sockaddr(napi_env env, napi_value v, struct sockaddr_un *addr) {
  memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  return arg_cstring(env, v, "path", addr->sun_path, sizeof addr->sun_path);
}

static napi_value js_unix_socket(napi_env env, napi_callback_info info) {
  (void)info;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return throw_errno(env, "socket", errno);
  return make_fd(env, fd);
}

static napi_value js_unix_bind(napi_env env, napi_callback_info info) {
  GET_ARGS(3);
  int fd;
  struct sockaddr_un addr;
  int64_t mode;
  if (!arg_fd(env, argv[0], "fd", &fd) || !fill_sockaddr(env, argv[1], &addr) ||
      !arg_int(env, argv[2], "mode", 0, 07777, &mode))
    return NULL;
  /* A socket file left by a previous run would make bind() fail with
   * EADDRINUSE.  Only remove it if it really is a socket, so a typo can
   * never delete a regular file. */
  struct stat st;
  if (lstat(addr.sun_path, &st) == 0 && S_ISSOCK(st.st_mode)) {
    if (unlink(addr.sun_path) < 0 && errno != ENOENT) return throw_errno(env, "unlink", errno);
  }
  if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) return throw_errno(env, "bind", errno);
  /* Between bind() and chmod() the file briefly has umask-derived
   * permissions; callers that care should bind inside a 0700 directory.
   * Changing the process umask instead would race with other threads. */
  if (chmod(addr.sun_path, (mode_t)mode) < 0) {
    int err = errno;
    unlink(addr.sun_path); /* never leave a socket with the wrong mode */
    return throw_errno(env, "chmod", err);
  }
  return make_undefined(env);
}

static napi_value js_unix_listen(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  int fd;
  int64_t backlog;
  if (!arg_fd(env, argv[0], "fd", &fd) || !arg_int(env, argv[1], "backlog", 0, INT_MAX, &backlog))
    return NULL;
  if (listen(fd, (int)backlog) < 0) return throw_errno(env, "listen", errno);
  return make_undefined(env);
}

static napi_value js_unix_accept(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int fd;
  if (!arg_fd(env, argv[0], "fd", &fd)) return NULL;
  int conn = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (conn < 0) return throw_errno(env, "accept4", errno);
  return make_fd(env, conn);
}

static napi_value js_unix_connect(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  int fd;
  struct sockaddr_un addr;
  if (!arg_fd(env, argv[0], "fd", &fd) || !fill_sockaddr(env, argv[1], &addr)) return NULL;
  /* AF_UNIX stream connect never returns EINPROGRESS: it either completes
   * at once or, on a non-blocking socket whose peer's backlog is full,
   * fails with EAGAIN and leaves the socket unconnected so the caller can
   * simply retry.  Blocking here instead could deadlock a process that is
   * also the listener. */
  if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
    return throw_errno(env, "connect", errno);
  return make_undefined(env);
}

static napi_value js_socketpair(napi_env env, napi_callback_info info) {
  (void)info;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
    return throw_errno(env, "socketpair", errno);
  napi_value arr, a, b;
  NAPI_CALL_GOTO(env, napi_create_array_with_length(env, 2, &arr), fail);
  NAPI_CALL_GOTO(env, napi_create_int32(env, sv[0], &a), fail);
  NAPI_CALL_GOTO(env, napi_create_int32(env, sv[1], &b), fail);
  NAPI_CALL_GOTO(env, napi_set_element(env, arr, 0, a), fail);
  NAPI_CALL_GOTO(env, napi_set_element(env, arr, 1, b), fail);
  return arr;
fail:
  close_quietly(sv[0]);
  close_quietly(sv[1]);
  return NULL;
}

static napi_value js_sendmsg(napi_env env, napi_callback_info info) {
  GET_ARGS(3);
  int fd;
  void *data;
  size_t len;
  if (!arg_fd(env, argv[0], "fd", &fd) || !arg_bytes(env, argv[1], "data", &data, &len))
    return NULL;

  int fds[SEND_MAX_FDS];
  uint32_t nfds = 0;
  if (!is_type(env, argv[2], napi_undefined)) {
    bool is_array = false;
    NAPI_CALL(env, napi_is_array(env, argv[2], &is_array));
    if (!is_array) return throw_arg(env, false, "fds", "must be an array of file descriptors");
    NAPI_CALL(env, napi_get_array_length(env, argv[2], &nfds));
    if (nfds > SEND_MAX_FDS) return throw_arg(env, true, "fds", "must hold at most 16 descriptors");
    for (uint32_t i = 0; i < nfds; i++) {
      napi_value el;
      NAPI_CALL(env, napi_get_element(env, argv[2], i, &el));
      if (!arg_fd(env, el, "fds[i]", &fds[i])) return NULL;
    }
  }
  /* A zero-length stream write transmits nothing, so the descriptors would
   * silently be dropped. */
  if (nfds > 0 && len == 0)
    return throw_arg(env, true, "data", "must not be empty when passing descriptors");

  struct iovec iov = {.iov_base = data, .iov_len = len};
  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int) * SEND_MAX_FDS)];
  } control;
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
  if (nfds > 0) {
    memset(&control, 0, sizeof control);
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
  }
  /* MSG_NOSIGNAL: a vanished peer must surface as EPIPE, not kill the
   * process with SIGPIPE. */
  ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
  if (n < 0) return throw_errno(env, "sendmsg", errno);
  return make_number(env, (double)n);
}

static napi_value js_recvmsg(napi_env env, napi_callback_info info) {
  GET_ARGS(3);
  int fd;
  void *data;
  size_t len;
  int64_t max_fds;
  if (!arg_fd(env, argv[0], "fd", &fd) || !arg_bytes(env, argv[1], "buffer", &data, &len) ||
      !arg_int(env, argv[2], "maxFds", 0, RECV_MAX_FDS, &max_fds))
    return NULL;

  struct iovec iov = {.iov_base = data, .iov_len = len};
  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int) * RECV_MAX_FDS)];
  } control;
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
  if (max_fds > 0) {
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)max_fds);
  }
  /* MSG_CMSG_CLOEXEC: received descriptors must not leak into children
   * spawned before the wrapper takes ownership of them. */
  ssize_t n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
  if (n < 0) return throw_errno(env, "recvmsg", errno);

  /* CMSG_SPACE rounds up to pointer alignment, so the kernel may deliver
   * more descriptors than asked for (e.g. 2 into the space for 1).  Anything
   * beyond max_fds counts as truncation, exactly like MSG_CTRUNC. */
  int fds[RECV_MAX_FDS];
  size_t nfds = 0;
  bool truncated = (msg.msg_flags & MSG_CTRUNC) != 0;
  for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm != NULL; cm = CMSG_NXTHDR(&msg, cm)) {
    if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; i++) {
      int rfd;
      memcpy(&rfd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
      if (nfds < (size_t)max_fds) {
        fds[nfds++] = rfd;
      } else {
        close_quietly(rfd);
        truncated = true;
      }
    }
  }

  napi_value result, arr, bytes_v, v;
  if (truncated) {
    /* The kernel already closed the descriptors that did not fit; the ones
     * that did are useless without the rest, so close them too.  The data
     * bytes were consumed, so the count rides along on the error. */
    for (size_t i = 0; i < nfds; i++) close_quietly(fds[i]);
    napi_value err = make_sys_error(env, "recvmsg", CODE_CTRUNC, 0,
                                    "ancillary data truncated; descriptors were discarded");
    if (err != NULL) {
      set_named_property_int(env, err, "bytes", (int64_t)n);
      napi_throw(env, err);
    }
    return NULL;
  }
  NAPI_CALL_GOTO(env, napi_create_object(env, &result), fail);
  NAPI_CALL_GOTO(env, napi_create_double(env, (double)n, &bytes_v), fail);
  NAPI_CALL_GOTO(env, napi_set_named_property(env, result, "bytes", bytes_v), fail);
  NAPI_CALL_GOTO(env, napi_create_array_with_length(env, nfds, &arr), fail);
  for (size_t i = 0; i < nfds; i++) {
    NAPI_CALL_GOTO(env, napi_create_int32(env, fds[i], &v), fail);
    NAPI_CALL_GOTO(env, napi_set_element(env, arr, (uint32_t)i, v), fail);
  }
  NAPI_CALL_GOTO(env, napi_set_named_property(env, result, "fds", arr), fail);
  return result;
fail:
  for (size_t i = 0; i < nfds; i++) close_quietly(fds[i]);
  return NULL;
}

/* ------------------------------------------------------------------------ */
/* Asynchronous file I/O: io_uring, or a thread pool where it is missing     */
/* ------------------------------------------------------------------------ */

/* One submission/completion interface with two engines.  The caller prepares
 * operations in numbered slots (0..capacity-1, at most one operation per
 * slot in flight), submits them, and later reaps (slot, result) pairs, where
 * a result is a byte count or -errno.  Completions are announced on an
 * eventfd the caller owns (libuv watches it), or the caller simply reaps in
 * a polling loop.
 *
 *   io_uring  raw io_uring_setup/io_uring_enter on rings mapped here; no
 *             liburing, so the addon builds wherever the kernel UAPI headers
 *             are present and nothing new needs installing.
 *   threads   a fixed pool of pthreads running preadv/pwritev/fdatasync/
 *             fallocate, for kernels without io_uring or processes whose
 *             seccomp profile or io_uring_disabled sysctl forbids it.
 *
 * Buffers are caller memory (guest RAM views): the caller keeps them alive
 * until the slot's completion is reaped. */

#include <linux/io_uring.h>
#include <sys/syscall.h>
#include <sys/uio.h>

enum { AIO_READ = 0, AIO_WRITE = 1, AIO_FSYNC = 2, AIO_FALLOCATE = 3 };
#define AIO_INLINE_IOV 4
#define AIO_MAX_IOV 1024 /* IOV_MAX on Linux */
#define AIO_MAX_CAPACITY 4096
#define AIO_MAX_THREADS 64

typedef struct {
  uint8_t op;
  int fd;
  int mode;       /* fallocate mode; fsync: 1 = data only */
  uint64_t off;
  uint64_t len;   /* fallocate length */
  struct iovec inl[AIO_INLINE_IOV];
  struct iovec *iov; /* inl, or heap memory for longer vectors */
  int iovcnt;
  bool busy; /* prepared and not yet reaped: its iovecs may be in use */
} aio_slot_t;

typedef struct {
  bool uring;
  bool destroyed;
  unsigned capacity;
  int efd; /* completion eventfd (not owned), or -1 */
  aio_slot_t *slots;
  /* io_uring */
  int ring_fd;
  void *sq_map, *cq_map;
  size_t sq_map_len, cq_map_len;
  struct io_uring_sqe *sqes;
  size_t sqes_len;
  _Atomic unsigned *sq_tail;
  _Atomic unsigned *sq_flags;
  unsigned *sq_array, sq_mask, sq_tail_local, unsubmitted;
  _Atomic unsigned *cq_head, *cq_tail;
  unsigned cq_mask;
  struct io_uring_cqe *cqes;
  /* thread pool */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  uint32_t *staged, staged_n;      /* prepared, not yet submitted */
  uint32_t *todo, todo_head, todo_n; /* submitted, not yet picked up */
  int32_t *done;                    /* (slot, result) pairs */
  uint32_t done_head, done_n;
  pthread_t threads[AIO_MAX_THREADS];
  unsigned nthreads;
  bool stopping;
} aio_t;

static void aio_slot_clear(aio_slot_t *s) {
  if (s->iov != NULL && s->iov != s->inl) free(s->iov);
  s->iov = NULL;
  s->iovcnt = 0;
}

/* Runs one operation to the end in a pool thread: short transfers continue
 * (a read stops early only at end of file, like the kernel's own result). */
static int32_t aio_execute(aio_slot_t *s) {
  if (s->op == AIO_FSYNC) return (s->mode ? fdatasync(s->fd) : fsync(s->fd)) < 0 ? -errno : 0;
  if (s->op == AIO_FALLOCATE)
    return fallocate(s->fd, s->mode, (off_t)s->off, (off_t)s->len) < 0 ? -errno : 0;
  struct iovec *iov = s->iov;
  int cnt = s->iovcnt;
  uint64_t done = 0;
  while (cnt > 0) {
    ssize_t n = s->op == AIO_READ ? preadv(s->fd, iov, cnt, (off_t)(s->off + done))
                                  : pwritev(s->fd, iov, cnt, (off_t)(s->off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return done > 0 ? (int32_t)done : -errno;
    }
    if (n == 0) break;
    done += (uint64_t)n;
    while (cnt > 0 && (size_t)n >= iov->iov_len) {
      n -= (ssize_t)iov->iov_len;
      iov++;
      cnt--;
    }
    if (cnt > 0) {
      iov->iov_base = (char *)iov->iov_base + n;
      iov->iov_len -= (size_t)n;
    }
  }
  return (int32_t)done;
}

static void *aio_thread(void *arg) {
  aio_t *a = arg;
  pthread_mutex_lock(&a->mu);
  for (;;) {
    while (a->todo_n == 0 && !a->stopping) pthread_cond_wait(&a->cv, &a->mu);
    if (a->todo_n == 0) break;
    uint32_t slot = a->todo[a->todo_head];
    a->todo_head = (a->todo_head + 1) % a->capacity;
    a->todo_n--;
    pthread_mutex_unlock(&a->mu);
    int32_t res = aio_execute(&a->slots[slot]);
    pthread_mutex_lock(&a->mu);
    uint32_t at = (a->done_head + a->done_n) % a->capacity;
    a->done[2 * at] = (int32_t)slot;
    a->done[2 * at + 1] = res;
    a->done_n++;
    if (a->efd >= 0) {
      uint64_t one = 1;
      ssize_t w = write(a->efd, &one, sizeof one);
      (void)w; /* the counter cannot overflow with this few writes */
    }
  }
  pthread_mutex_unlock(&a->mu);
  return NULL;
}

static int aio_uring_setup(aio_t *a, unsigned entries) {
  struct io_uring_params p;
  memset(&p, 0, sizeof p);
  /* Twice as many completion entries as operations in flight: the
   * completion ring can never overflow. */
  /* COOP_TASKRUN: a completion does not interrupt the thread; it is posted
   * when the thread next enters the kernel.  TASKRUN_FLAG says when one is
   * waiting, so aioReap can enter the kernel for it: a polling loop that
   * makes no system calls would otherwise never see it. */
  p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
  p.cq_entries = entries * 2;
  int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
  if (fd < 0 && errno == EINVAL) {
    p.flags = IORING_SETUP_CQSIZE;
    fd = (int)syscall(__NR_io_uring_setup, entries, &p);
  }
  if (fd < 0) return errno;
  a->ring_fd = fd;
  a->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
  a->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
  bool single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
  if (single) {
    if (a->cq_map_len > a->sq_map_len) a->sq_map_len = a->cq_map_len;
    a->cq_map_len = a->sq_map_len;
  }
  a->sq_map = mmap(NULL, a->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
  if (a->sq_map == MAP_FAILED) goto fail;
  a->cq_map = single ? a->sq_map
                     : mmap(NULL, a->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
  if (a->cq_map == MAP_FAILED) goto fail;
  a->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
  a->sqes = mmap(NULL, a->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
  if (a->sqes == MAP_FAILED) goto fail;
  char *sq = a->sq_map, *cq = a->cq_map;
  a->sq_tail = (_Atomic unsigned *)(sq + p.sq_off.tail);
  a->sq_flags = (p.flags & IORING_SETUP_TASKRUN_FLAG) ? (_Atomic unsigned *)(sq + p.sq_off.flags) : NULL;
  a->sq_mask = *(unsigned *)(sq + p.sq_off.ring_mask);
  a->sq_array = (unsigned *)(sq + p.sq_off.array);
  a->sq_tail_local = atomic_load_explicit(a->sq_tail, memory_order_relaxed);
  a->cq_head = (_Atomic unsigned *)(cq + p.cq_off.head);
  a->cq_tail = (_Atomic unsigned *)(cq + p.cq_off.tail);
  a->cq_mask = *(unsigned *)(cq + p.cq_off.ring_mask);
  a->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
  if (a->efd >= 0 && syscall(__NR_io_uring_register, fd, IORING_REGISTER_EVENTFD, &a->efd, 1) < 0) goto fail;
  return 0;
fail: {
  int err = errno;
  if (a->sqes != NULL && a->sqes != MAP_FAILED) munmap(a->sqes, a->sqes_len);
  if (a->cq_map != NULL && a->cq_map != MAP_FAILED && a->cq_map != a->sq_map) munmap(a->cq_map, a->cq_map_len);
  if (a->sq_map != NULL && a->sq_map != MAP_FAILED) munmap(a->sq_map, a->sq_map_len);
  a->sqes = NULL;
  a->sq_map = a->cq_map = NULL;
  close(fd);
  a->ring_fd = -1;
  return err;
}
}

static int aio_pool_setup(aio_t *a, unsigned threads) {
  a->staged = calloc(a->capacity, sizeof *a->staged);
  a->todo = calloc(a->capacity, sizeof *a->todo);
  a->done = calloc(2 * (size_t)a->capacity, sizeof *a->done);
  if (a->staged == NULL || a->todo == NULL || a->done == NULL) return ENOMEM;
  pthread_mutex_init(&a->mu, NULL);
  pthread_cond_init(&a->cv, NULL);
  for (unsigned i = 0; i < threads; i++) {
    int err = pthread_create(&a->threads[i], NULL, aio_thread, a);
    if (err != 0) return a->nthreads > 0 ? 0 : err;
    a->nthreads++;
  }
  return 0;
}

/* Stops the engine.  io_uring: closing the ring cancels or finishes what is
 * in flight.  Pool: the threads finish the queue and exit. */
static void aio_destroy(aio_t *a) {
  if (a->destroyed) return;
  a->destroyed = true;
  if (a->uring) {
    if (a->sqes != NULL) munmap(a->sqes, a->sqes_len);
    if (a->cq_map != NULL && a->cq_map != a->sq_map) munmap(a->cq_map, a->cq_map_len);
    if (a->sq_map != NULL) munmap(a->sq_map, a->sq_map_len);
    if (a->ring_fd >= 0) close(a->ring_fd);
  } else if (a->nthreads > 0) {
    pthread_mutex_lock(&a->mu);
    a->stopping = true;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
    for (unsigned i = 0; i < a->nthreads; i++) pthread_join(a->threads[i], NULL);
  }
  for (unsigned i = 0; i < a->capacity; i++) aio_slot_clear(&a->slots[i]);
}

static void aio_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  aio_t *a = data;
  aio_destroy(a);
  free(a->slots);
  free(a->staged);
  free(a->todo);
  free(a->done);
  free(a);
}

/* aioCreate(entries, engine: "auto" | "io_uring" | "threads", eventfd | -1, threads)
 *   -> { handle, engine, uringError } */
static napi_value js_aio_create(napi_env env, napi_callback_info info) {
  GET_ARGS(4);
  int64_t entries, efd, threads;
  char engine[16];
  if (!arg_int(env, argv[0], "entries", 1, AIO_MAX_CAPACITY, &entries) ||
      !arg_cstring(env, argv[1], "engine", engine, sizeof engine) ||
      !arg_int(env, argv[2], "eventfd", -1, INT_MAX, &efd) ||
      !arg_int(env, argv[3], "threads", 1, AIO_MAX_THREADS, &threads))
    return NULL;
  bool want_uring = strcmp(engine, "auto") == 0 || strcmp(engine, "io_uring") == 0;
  bool want_pool = strcmp(engine, "auto") == 0 || strcmp(engine, "threads") == 0;
  if (!want_uring && !want_pool) return throw_arg(env, true, "engine", "must be 'auto', 'io_uring' or 'threads'");
  aio_t *a = calloc(1, sizeof *a);
  if (a == NULL) return throw_errno(env, "aioCreate", ENOMEM);
  a->ring_fd = -1;
  a->efd = (int)efd;
  /* io_uring rounds the ring up to a power of two; use exactly that many slots. */
  unsigned cap = 1;
  while (cap < (unsigned)entries) cap <<= 1;
  a->capacity = cap;
  a->slots = calloc(cap, sizeof *a->slots);
  if (a->slots == NULL) {
    free(a);
    return throw_errno(env, "aioCreate", ENOMEM);
  }
  int uring_err = ENOSYS;
  if (want_uring) {
    uring_err = aio_uring_setup(a, cap);
    a->uring = uring_err == 0;
  }
  if (!a->uring) {
    if (!want_pool) {
      aio_finalize(env, a, NULL);
      return throw_errno(env, "io_uring_setup", uring_err);
    }
    int err = aio_pool_setup(a, (unsigned)threads);
    if (err != 0) {
      aio_finalize(env, a, NULL);
      return throw_errno(env, "pthread_create", err);
    }
  }
  napi_value obj, handle;
  if (napi_create_external(env, a, aio_finalize, NULL, &handle) != napi_ok) {
    aio_finalize(env, a, NULL);
    throw_napi_failure(env, "napi_create_external");
    return NULL;
  }
  NAPI_CALL(env, napi_create_object(env, &obj));
  NAPI_CALL(env, napi_set_named_property(env, obj, "handle", handle));
  set_named_property_str(env, obj, "engine", a->uring ? "io_uring" : "threads");
  set_named_property_int(env, obj, "capacity", cap);
  if (!a->uring && want_uring) set_named_property_str(env, obj, "uringError", errno_name(uring_err));
  return obj;
}

static aio_t *aio_of(napi_env env, napi_value v) {
  void *p = NULL;
  if (!is_type(env, v, napi_external) || napi_get_value_external(env, v, &p) != napi_ok || p == NULL) {
    throw_arg(env, false, "handle", "must be a handle from aioCreate()");
    return NULL;
  }
  aio_t *a = p;
  if (a->destroyed) {
    napi_throw_error(env, "ERR_IOVIRT_AIO_CLOSED", "asynchronous I/O engine used after close");
    return NULL;
  }
  return a;
}

/* Collects the buffers of a read or write: one view or an array of views. */
static bool aio_buffers(napi_env env, napi_value v, aio_slot_t *s) {
  bool is_array = false;
  NAPI_CALL_BOOL(env, napi_is_array(env, v, &is_array));
  uint32_t n = 1;
  if (is_array) NAPI_CALL_BOOL(env, napi_get_array_length(env, v, &n));
  if (n == 0 || n > AIO_MAX_IOV) {
    throw_arg(env, true, "buffers", "must hold 1 to 1024 views");
    return false;
  }
  struct iovec *iov = n <= AIO_INLINE_IOV ? s->inl : malloc(n * sizeof *iov);
  if (iov == NULL) {
    throw_errno(env, "aioPrep", ENOMEM);
    return false;
  }
  for (uint32_t i = 0; i < n; i++) {
    napi_value item = v;
    if (is_array && napi_get_element(env, v, i, &item) != napi_ok) {
      if (iov != s->inl) free(iov);
      throw_napi_failure(env, "napi_get_element");
      return false;
    }
    void *data;
    size_t len;
    if (!arg_bytes(env, item, "buffers", &data, &len)) {
      if (iov != s->inl) free(iov);
      return false;
    }
    iov[i].iov_base = data;
    iov[i].iov_len = len;
  }
  s->iov = iov;
  s->iovcnt = (int)n;
  return true;
}

/* aioPrep(handle, slot, op, fd, offset, buffers | length, mode) */
static napi_value js_aio_prep(napi_env env, napi_callback_info info) {
  GET_ARGS(7);
  aio_t *a = aio_of(env, argv[0]);
  if (a == NULL) return NULL;
  int64_t slot, op, mode = 0;
  int fd;
  off_t off;
  if (!arg_int(env, argv[1], "slot", 0, a->capacity - 1, &slot) || !arg_int(env, argv[2], "op", 0, 3, &op) ||
      !arg_fd(env, argv[3], "fd", &fd) || !arg_off(env, argv[4], "offset", &off))
    return NULL;
  if (!is_type(env, argv[6], napi_undefined) && !arg_int(env, argv[6], "mode", 0, INT_MAX, &mode)) return NULL;
  aio_slot_t *s = &a->slots[slot];
  if (s->busy) return throw_arg(env, true, "slot", "is still in flight (reap its completion first)");
  aio_slot_clear(s);
  s->op = (uint8_t)op;
  s->fd = fd;
  s->off = (uint64_t)off;
  s->mode = (int)mode;
  s->len = 0;
  if (op == AIO_READ || op == AIO_WRITE) {
    if (!aio_buffers(env, argv[5], s)) return NULL;
  } else if (op == AIO_FALLOCATE) {
    off_t len;
    if (!arg_off(env, argv[5], "length", &len)) return NULL;
    s->len = (uint64_t)len;
  }
  if (a->uring) {
    unsigned idx = a->sq_tail_local & a->sq_mask;
    struct io_uring_sqe *sqe = &a->sqes[idx];
    memset(sqe, 0, sizeof *sqe);
    sqe->fd = fd;
    sqe->user_data = (uint64_t)slot;
    sqe->off = (uint64_t)off;
    switch (op) {
      case AIO_READ:
      case AIO_WRITE:
        sqe->opcode = op == AIO_READ ? IORING_OP_READV : IORING_OP_WRITEV;
        sqe->addr = (uint64_t)(uintptr_t)s->iov;
        sqe->len = (uint32_t)s->iovcnt;
        break;
      case AIO_FSYNC:
        sqe->opcode = IORING_OP_FSYNC;
        sqe->fsync_flags = mode ? IORING_FSYNC_DATASYNC : 0;
        break;
      default: /* fallocate: length travels in addr, mode in len */
        sqe->opcode = IORING_OP_FALLOCATE;
        sqe->addr = s->len;
        sqe->len = (uint32_t)mode;
        break;
    }
    a->sq_array[idx] = idx;
    a->sq_tail_local++;
    a->unsubmitted++;
  } else {
    a->staged[a->staged_n++] = (uint32_t)slot; /* busy slots bound staged_n by capacity */
  }
  s->busy = true;
  return make_undefined(env);
}

/* aioSubmit(handle) -> operations handed to the kernel or the pool. */
static napi_value js_aio_submit(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  aio_t *a = aio_of(env, argv[0]);
  if (a == NULL) return NULL;
  unsigned submitted = 0;
  if (a->uring) {
    atomic_store_explicit(a->sq_tail, a->sq_tail_local, memory_order_release);
    while (a->unsubmitted > 0) {
      int n = (int)syscall(__NR_io_uring_enter, a->ring_fd, a->unsubmitted, 0, 0, NULL, 0);
      if (n < 0) {
        if (errno == EINTR) continue;
        /* EAGAIN/EBUSY: the kernel keeps the rest queued; the next submit retries. */
        if (errno == EAGAIN || errno == EBUSY) break;
        return throw_errno(env, "io_uring_enter", errno);
      }
      a->unsubmitted -= (unsigned)n;
      submitted += (unsigned)n;
      if (n == 0) break;
    }
  } else if (a->staged_n > 0) {
    pthread_mutex_lock(&a->mu);
    for (uint32_t i = 0; i < a->staged_n; i++) {
      a->todo[(a->todo_head + a->todo_n) % a->capacity] = a->staged[i];
      a->todo_n++;
    }
    submitted = a->staged_n;
    a->staged_n = 0;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
  }
  return make_number(env, submitted);
}

/* aioReap(handle, Int32Array out) -> completions written as (slot, result) pairs. */
static napi_value js_aio_reap(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  aio_t *a = aio_of(env, argv[0]);
  if (a == NULL) return NULL;
  bool is_ta = false;
  napi_typedarray_type type;
  size_t count = 0;
  void *data = NULL;
  NAPI_CALL(env, napi_is_typedarray(env, argv[1], &is_ta));
  if (is_ta) NAPI_CALL(env, napi_get_typedarray_info(env, argv[1], &type, &count, &data, NULL, NULL));
  if (!is_ta || type != napi_int32_array) return throw_arg(env, false, "out", "must be an Int32Array");
  int32_t *out = data;
  size_t max = count / 2, n = 0;
  if (a->uring) {
    if (a->sq_flags != NULL && (atomic_load_explicit(a->sq_flags, memory_order_relaxed) & IORING_SQ_TASKRUN))
      syscall(__NR_io_uring_enter, a->ring_fd, 0, 0, IORING_ENTER_GETEVENTS, NULL, 0); /* post waiting completions */
    unsigned head = atomic_load_explicit(a->cq_head, memory_order_relaxed);
    unsigned tail = atomic_load_explicit(a->cq_tail, memory_order_acquire);
    while (head != tail && n < max) {
      struct io_uring_cqe *cqe = &a->cqes[head & a->cq_mask];
      uint32_t slot = (uint32_t)cqe->user_data;
      out[2 * n] = (int32_t)slot;
      out[2 * n + 1] = cqe->res;
      if (slot < a->capacity) {
        aio_slot_clear(&a->slots[slot]);
        a->slots[slot].busy = false;
      }
      head++;
      n++;
    }
    atomic_store_explicit(a->cq_head, head, memory_order_release);
  } else {
    pthread_mutex_lock(&a->mu);
    while (a->done_n > 0 && n < max) {
      out[2 * n] = a->done[2 * a->done_head];
      out[2 * n + 1] = a->done[2 * a->done_head + 1];
      aio_slot_clear(&a->slots[out[2 * n]]);
      a->slots[out[2 * n]].busy = false;
      a->done_head = (a->done_head + 1) % a->capacity;
      a->done_n--;
      n++;
    }
    pthread_mutex_unlock(&a->mu);
  }
  return make_number(env, (double)n);
}

static napi_value js_aio_close(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  void *p = NULL;
  if (!is_type(env, argv[0], napi_external) || napi_get_value_external(env, argv[0], &p) != napi_ok || p == NULL)
    return throw_arg(env, false, "handle", "must be a handle from aioCreate()");
  aio_destroy(p);
  return make_undefined(env);
}

/* tryRw(fd, buffers, offset, write) -> bytes, or -errno: preadv2/pwritev2 with
 * RWF_NOWAIT, the fast path for data already in the page cache.  -EAGAIN
 * means it would block; the caller then goes through aio.  Errors are
 * returned, not thrown: EAGAIN is the expected outcome on a cache miss. */
static napi_value js_try_rw(napi_env env, napi_callback_info info) {
  GET_ARGS(4);
  int fd;
  off_t off;
  bool write = false;
  aio_slot_t s;
  memset(&s, 0, sizeof s);
  if (!arg_fd(env, argv[0], "fd", &fd) || !arg_off(env, argv[2], "offset", &off)) return NULL;
  if (!is_type(env, argv[3], napi_boolean)) return throw_arg(env, false, "write", "must be a boolean");
  NAPI_CALL(env, napi_get_value_bool(env, argv[3], &write));
  if (!aio_buffers(env, argv[1], &s)) return NULL;
  ssize_t n;
  do {
    n = write ? pwritev2(fd, s.iov, s.iovcnt, off, RWF_NOWAIT) : preadv2(fd, s.iov, s.iovcnt, off, RWF_NOWAIT);
  } while (n < 0 && errno == EINTR);
  int err = errno;
  aio_slot_clear(&s);
  return make_number(env, n < 0 ? -(double)err : (double)n);
}

/* read(fd, buffer) / write(fd, buffer) / writev(fd, buffers) -> bytes, or
 * -errno.  For descriptors without a meaningful file position (tap devices,
 * sockets, pipes), where pread/pwrite fail with ESPIPE.  Like tryRw, errors
 * are returned rather than thrown: on a non-blocking descriptor every batch
 * of reads ends in EAGAIN, and a data path counts failures instead of
 * unwinding.  EINTR is retried here because it carries no information. */
static napi_value read_or_write(napi_env env, napi_callback_info info, int writing) {
  GET_ARGS(2);
  int fd;
  void *data;
  size_t len;
  if (!arg_fd(env, argv[0], "fd", &fd) || !arg_bytes(env, argv[1], "buffer", &data, &len)) return NULL;
  ssize_t n;
  do {
    n = writing ? write(fd, data, len) : read(fd, data, len);
  } while (n < 0 && errno == EINTR);
  return make_number(env, n < 0 ? -(double)errno : (double)n);
}

static napi_value js_read(napi_env env, napi_callback_info info) { return read_or_write(env, info, 0); }
static napi_value js_write(napi_env env, napi_callback_info info) { return read_or_write(env, info, 1); }

/* One system call for a header and a frame kept in separate buffers: a tap
 * device takes each write as exactly one packet. */
static napi_value js_writev(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  int fd;
  aio_slot_t s;
  memset(&s, 0, sizeof s);
  if (!arg_fd(env, argv[0], "fd", &fd) || !aio_buffers(env, argv[1], &s)) return NULL;
  ssize_t n;
  do {
    n = writev(fd, s.iov, s.iovcnt);
  } while (n < 0 && errno == EINTR);
  int err = errno;
  aio_slot_clear(&s);
  return make_number(env, n < 0 ? -(double)err : (double)n);
}

/* dioAlign(fd) -> { memory, offset }: O_DIRECT alignment (statx STATX_DIOALIGN,
 * Linux 6.1); zeroes when the file system does not say or does not support it. */
static napi_value js_dio_align(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int fd;
  if (!arg_fd(env, argv[0], "fd", &fd)) return NULL;
  struct statx stx;
  memset(&stx, 0, sizeof stx);
  unsigned mem = 0, off = 0;
#ifdef STATX_DIOALIGN
  if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) < 0) return throw_errno(env, "statx", errno);
  if (stx.stx_mask & STATX_DIOALIGN) {
    mem = stx.stx_dio_mem_align;
    off = stx.stx_dio_offset_align;
  }
#endif
  napi_value obj;
  NAPI_CALL(env, napi_create_object(env, &obj));
  set_named_property_int(env, obj, "memory", mem);
  set_named_property_int(env, obj, "offset", off);
  return obj;
}

/* ------------------------------------------------------------------------ */
/* Module registration                                                       */
/* ------------------------------------------------------------------------ */

static napi_value init(napi_env env, napi_value exports) {
  static const struct {
    const char *name;
    napi_callback fn;
  } fns[] = {
      {"getpagesize", js_getpagesize},
      {"close", js_close},
      {"memfdCreate", js_memfd_create},
      {"mlock", js_mlock},
      {"ftruncate", js_ftruncate},
      {"open", js_open},
      {"fstat", js_fstat},
      {"fdatasync", js_fdatasync},
      {"fallocate", js_fallocate},
      {"pread", js_pread},
      {"pwrite", js_pwrite},
      {"ioctl", js_ioctl},
      {"addressOf", js_address_of},
      {"mmap", js_mmap},
      {"munmap", js_munmap},
      {"mappingPoisoned", js_mapping_poisoned},
      {"guardEvents", js_guard_events},
      {"guardCounter", js_guard_counter},
      {"getSeals", js_get_seals},
      {"addSeals", js_add_seals},
      {"eventfd", js_eventfd},
      {"eventfdRead", js_eventfd_read},
      {"eventfdWrite", js_eventfd_write},
      {"watch", js_watch},
      {"unixSocket", js_unix_socket},
      {"unixBind", js_unix_bind},
      {"unixListen", js_unix_listen},
      {"unixAccept", js_unix_accept},
      {"unixConnect", js_unix_connect},
      {"socketpair", js_socketpair},
      {"sendmsg", js_sendmsg},
      {"recvmsg", js_recvmsg},
      {"aioCreate", js_aio_create},
      {"aioPrep", js_aio_prep},
      {"aioSubmit", js_aio_submit},
      {"aioReap", js_aio_reap},
      {"aioClose", js_aio_close},
      {"dioAlign", js_dio_align},
      {"tryRw", js_try_rw},
      {"read", js_read},
      {"write", js_write},
      {"writev", js_writev},
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    napi_value f;
    NAPI_CALL(env, napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &f));
    NAPI_CALL(env, napi_set_named_property(env, exports, fns[i].name, f));
  }
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
