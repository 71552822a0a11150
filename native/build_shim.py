"""Build the shim's pure helpers as a cffi module (offload._native._shim).

The same source as libudsproxy.so, compiled with SHIM_NO_HOOKS so that the
Python process importing it is not itself hooked.  The preload library is
plain C (see the Makefile): a cffi module is a CPython extension and would
not preload under -z now.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int shim_path_allowed(const char *path, const char *prefixes);
    int shim_encode_request(unsigned char *buf, size_t cap, int socket_type, const char *path);
    int shim_decode_reply(const unsigned char *buf, size_t len);
    int shim_decode_answer(const unsigned char *buf, size_t len, int type);
    enum shim_status { SHIM_CARRIED, SHIM_FAILED, SHIM_NOT_CARRIED };
    enum shim_status shim_answer_status(int answer);
    void shim_encode_send_header(unsigned char *buf, size_t length);
    long shim_proc_pid(const char *path, const char **rest);
    long shim_proc_cgroup_pid(const char *path);
    int shim_rewrite_cgroup(const char *text, const char *map, char *out, size_t cap);
    int shim_parse_cpumask(const char *hex, unsigned char *bits, size_t cap);
    int shim_parse_config(const char *text, char *socket_out, size_t socket_cap, char *prefixes_out,
                          size_t prefixes_cap);
    """
)
ffibuilder.set_source(
    "offload._native._shim",
    '#define SHIM_NO_HOOKS 1\n#include "qtfs_shim.c"\n',
    include_dirs=[str(HERE)],
    extra_compile_args=["-Wall", "-Wextra"],
)

if __name__ == "__main__":
    import shutil

    built = Path(ffibuilder.compile(tmpdir=str(HERE.parent / "build" / "cffi"), verbose=False))
    shutil.copy2(built, HERE.parent / "offload" / "_native" / built.name)
