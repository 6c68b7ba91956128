/* Helpers shared by the engine suites (tests/engine/util/, linked into each
 * of them): generated text against a golden file, and copying a model's
 * hyperparameters into a GGUF being rebuilt. Failures fail the calling
 * test. */
#ifndef GORGON_TESTS_ENG_TEST_H
#define GORGON_TESTS_ENG_TEST_H

#include <stddef.h>
#include <stdint.h>

#include "engine/engine.h"
#include "engine/model/gguf_write.h"

/* Text gathered from eng_generate's on_token (et_collect, arg = the et_text). */
typedef struct et_text {
    char s[1 << 16];
    size_t n;
} et_text;

int et_collect(void *arg, int32_t token, const char *s, size_t n);

/* got equals the file `golden` (relative to the models directory) byte for
 * byte; otherwise the test fails showing where they first differ. */
void et_expect_golden(const char *golden, const et_text *got);

/* Copy src's llama.* keys and general.architecture (U32, F32 and string
 * values) into w, but for drop_key (NULL: none). */
void et_copy_llama_keys(const eng_gguf *src, eng_gguf_writer *w, const char *drop_key);

#endif
