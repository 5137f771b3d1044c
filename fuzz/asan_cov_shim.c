/*
 * asan_cov_shim.c -- lets atheris' coverage guidance work under gcc's ASan.
 *
 * Under tools/sanitize.sh the interpreter runs with gcc's libasan.so
 * preloaded.  libasan exports (weak, do-nothing) definitions of the
 * SanitizerCoverage callbacks -- __sanitizer_cov_8bit_counters_init and
 * friends -- and, being first in the global lookup scope, it wins over the
 * real ones inside atheris' bundled libFuzzer.  atheris then registers its
 * Python coverage counters with libasan instead of libFuzzer, and the fuzzer
 * runs blind ("corp: 1/1b" forever).
 *
 * Preloaded before libasan (fuzz/run.sh builds it and sets LD_PRELOAD and
 * ASAN_OPTIONS=verify_asan_link_order=0), this shim defines the same names
 * and forwards each call to the definition in the library named by
 * $PTEMU_ATHERIS_CORE (atheris' core_with_libfuzzer*.so), looked up on first
 * use.  Nothing here is part of ptemu; it is fuzzing plumbing only.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static void *core(void)
{
    static void *h;
    if (!h) {
        const char *path = getenv("PTEMU_ATHERIS_CORE");
        if (!path || !(h = dlopen(path, RTLD_LAZY | RTLD_NOLOAD)))
            h = path ? dlopen(path, RTLD_LAZY | RTLD_GLOBAL) : NULL;
        if (!h) {
            fprintf(stderr, "asan_cov_shim: cannot open $PTEMU_ATHERIS_CORE (%s)\n",
                    path ? path : "unset");
            abort();
        }
    }
    return h;
}

static void *sym(const char *name)
{
    void *p = dlsym(core(), name);
    if (!p) {
        fprintf(stderr, "asan_cov_shim: %s not in the atheris core\n", name);
        abort();
    }
    return p;
}

#define FWD(ret, name, params, args)                                     \
    ret name params                                                      \
    {                                                                    \
        static ret (*real) params;                                       \
        if (!real)                                                       \
            real = (ret (*) params)sym(#name);                           \
        return real args;                                                \
    }

FWD(void, __sanitizer_cov_8bit_counters_init, (uint8_t *a, uint8_t *b), (a, b))
FWD(void, __sanitizer_cov_pcs_init, (const uintptr_t *a, const uintptr_t *b), (a, b))
FWD(void, __sanitizer_cov_trace_cmp1, (uint8_t a, uint8_t b), (a, b))
FWD(void, __sanitizer_cov_trace_cmp2, (uint16_t a, uint16_t b), (a, b))
FWD(void, __sanitizer_cov_trace_cmp4, (uint32_t a, uint32_t b), (a, b))
FWD(void, __sanitizer_cov_trace_cmp8, (uint64_t a, uint64_t b), (a, b))
FWD(void, __sanitizer_cov_trace_const_cmp1, (uint8_t a, uint8_t b), (a, b))
FWD(void, __sanitizer_cov_trace_const_cmp2, (uint16_t a, uint16_t b), (a, b))
FWD(void, __sanitizer_cov_trace_const_cmp4, (uint32_t a, uint32_t b), (a, b))
FWD(void, __sanitizer_cov_trace_const_cmp8, (uint64_t a, uint64_t b), (a, b))
FWD(void, __sanitizer_cov_trace_div4, (uint32_t a), (a))
FWD(void, __sanitizer_cov_trace_div8, (uint64_t a), (a))
FWD(void, __sanitizer_cov_trace_gep, (uintptr_t a), (a))
FWD(void, __sanitizer_cov_trace_pc_indir, (uintptr_t a), (a))
FWD(void, __sanitizer_cov_trace_switch, (uint64_t a, uint64_t *b), (a, b))
