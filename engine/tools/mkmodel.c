/* gorgon-mkmodel — write a Llama GGUF with random weights and a working
 * SentencePiece tokenizer, for benchmarks and tests that need a model of a
 * given shape but not a trained one.
 *
 *   gorgon-mkmodel --out m.gguf --preset 110m --dtype q8_0
 *   gorgon-mkmodel --out t.gguf --preset tiny --dim 128 --layers 3 --seed 7
 *
 * The model itself is built by eng_gguf_write_synth_llama() (gguf_write.h);
 * this file is only the command line.
 */
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cm_version.h"
#include "engine/model/eng_err.h"
#include "engine/model/gguf_write.h"

struct shape {
    int64_t dim, layers, heads, kv_heads, ffn, vocab, ctx;
};

static const struct {
    const char *name;
    struct shape s;
} k_presets[] = {
    {"110m", {768, 12, 12, 12, 2048, 32000, 1024}},
    {"stories260k-shape", {64, 5, 8, 4, 172, 512, 512}},
    {"tiny", {64, 2, 4, 2, 128, 512, 128}},
};

static void usage(FILE *f)
{
    fprintf(f,
            "usage: gorgon-mkmodel --out FILE [--preset 110m|stories260k-shape|tiny]\n"
            "         [--dim D --layers L --heads H --kv-heads K --ffn F --vocab V --ctx C]\n"
            "         [--dtype f32|f16|bf16|q8_0|q4_0] [--seed S] [--vocab-from FILE.gguf]\n"
            "         [--chat-template FILE]   (its text becomes tokenizer.chat_template)\n"
            "Writes a Llama GGUF with random N(0, 0.02) weights (norms 1, kept f32).\n"
            "The tokenizer is copied from --vocab-from or synthesised; preset 110m uses\n"
            "llama2-vocab/ggml-vocab-llama-spm.gguf from $GORGON_TEST_MODELS or\n"
            "../shared/models when it exists (vocab 32000). Default preset: tiny.\n");
}

static int parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out, const char *what)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) {
        fprintf(stderr, "gorgon-mkmodel: %s must be an integer in [%lld, %lld], got '%s'\n", what,
                (long long)lo, (long long)hi, s);
        return -EINVAL;
    }
    *out = v;
    return 0;
}

/* The whole of a text file, NUL-terminated (malloc'd), or NULL with the
 * reason printed. */
static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "gorgon-mkmodel: --chat-template %s: %s\n", path, strerror(errno));
        return NULL;
    }
    char *buf = NULL;
    size_t n = 0, cap = 0;
    bool oom = false;
    for (;;) {
        if (n + 4096 + 1 > cap) {
            cap = cap ? 2 * cap : 8192;
            char *nb = realloc(buf, cap);
            if (!nb) {
                oom = true;
                break;
            }
            buf = nb;
        }
        size_t k = fread(buf + n, 1, cap - n - 1, f);
        n += k;
        if (k == 0)
            break;
    }
    bool bad = oom || ferror(f) || !buf || memchr(buf, '\0', n);
    fclose(f);
    if (bad) {
        fprintf(stderr, "gorgon-mkmodel: --chat-template %s: cannot read it as text\n", path);
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    return buf;
}

static const char *default_vocab_path(char *buf, size_t n)
{
    const char *dir = getenv("GORGON_TEST_MODELS");
    snprintf(buf, n, "%s/llama2-vocab/ggml-vocab-llama-spm.gguf", dir ? dir : "../shared/models");
    return access(buf, R_OK) == 0 ? buf : NULL;
}

int main(int argc, char **argv)
{
    if (cm_version_requested(argc, argv, "gorgon-mkmodel"))
        return 0;
    static const struct option lo[] = {
        {"out", required_argument, 0, 'o'},    {"preset", required_argument, 0, 'p'},
        {"dim", required_argument, 0, 'd'},    {"layers", required_argument, 0, 'l'},
        {"heads", required_argument, 0, 'H'},  {"kv-heads", required_argument, 0, 'K'},
        {"ffn", required_argument, 0, 'f'},    {"vocab", required_argument, 0, 'v'},
        {"ctx", required_argument, 0, 'c'},    {"dtype", required_argument, 0, 't'},
        {"seed", required_argument, 0, 's'},   {"vocab-from", required_argument, 0, 'V'},
        {"chat-template", required_argument, 0, 'T'},
        {"help", no_argument, 0, 'h'},         {0, 0, 0, 0},
    };
    const char *out = NULL, *preset = "tiny", *vocab_from = NULL, *template_file = NULL;
    enum kn_dtype dtype = KN_F32;
    uint64_t seed = 1;
    struct shape set = {0}; /* explicit overrides, applied over the preset */
    int c;
    while ((c = getopt_long(argc, argv, "o:h", lo, NULL)) != -1) {
        int64_t v = 0;
        int rc = 0;
        switch (c) {
        case 'o':
            out = optarg;
            break;
        case 'p':
            preset = optarg;
            break;
        case 'V':
            vocab_from = optarg;
            break;
        case 'T':
            template_file = optarg;
            break;
        case 'd':
            rc = parse_i64(optarg, 2, 1 << 20, &set.dim, "--dim");
            break;
        case 'l':
            rc = parse_i64(optarg, 1, 4096, &set.layers, "--layers");
            break;
        case 'H':
            rc = parse_i64(optarg, 1, 4096, &set.heads, "--heads");
            break;
        case 'K':
            rc = parse_i64(optarg, 1, 4096, &set.kv_heads, "--kv-heads");
            break;
        case 'f':
            rc = parse_i64(optarg, 1, 1 << 22, &set.ffn, "--ffn");
            break;
        case 'v':
            rc = parse_i64(optarg, 1, 1 << 24, &set.vocab, "--vocab");
            break;
        case 'c':
            rc = parse_i64(optarg, 1, 1 << 24, &set.ctx, "--ctx");
            break;
        case 's':
            rc = parse_i64(optarg, 0, INT64_MAX, &v, "--seed");
            seed = (uint64_t)v;
            break;
        case 't':
            if (!strcmp(optarg, "f32"))
                dtype = KN_F32;
            else if (!strcmp(optarg, "f16"))
                dtype = KN_F16;
            else if (!strcmp(optarg, "bf16"))
                dtype = KN_BF16;
            else if (!strcmp(optarg, "q8_0"))
                dtype = KN_Q8_0;
            else if (!strcmp(optarg, "q4_0"))
                dtype = KN_Q4_0;
            else {
                fprintf(stderr, "gorgon-mkmodel: unknown --dtype '%s'\n", optarg);
                rc = -EINVAL;
            }
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
        if (rc < 0)
            return 2;
    }
    if (!out || optind != argc) {
        usage(stderr);
        return 2;
    }
    size_t pi;
    for (pi = 0; pi < sizeof(k_presets) / sizeof(k_presets[0]); pi++)
        if (!strcmp(k_presets[pi].name, preset))
            break;
    if (pi == sizeof(k_presets) / sizeof(k_presets[0])) {
        fprintf(stderr, "gorgon-mkmodel: unknown --preset '%s'\n", preset);
        return 2;
    }
    struct shape s = k_presets[pi].s;
    char vbuf[4096];
    if (!strcmp(preset, "110m") && !vocab_from && !set.vocab)
        vocab_from = default_vocab_path(vbuf, sizeof(vbuf));
    int64_t *dst[] = {&s.dim, &s.layers, &s.heads, &s.kv_heads, &s.ffn, &s.vocab, &s.ctx};
    const int64_t src[] = {set.dim, set.layers, set.heads, set.kv_heads, set.ffn, set.vocab, set.ctx};
    for (size_t i = 0; i < sizeof(src) / sizeof(src[0]); i++)
        if (src[i])
            *dst[i] = src[i];

    char *chat_template = NULL;
    if (template_file && !(chat_template = read_text(template_file)))
        return 1;
    char name[128];
    snprintf(name, sizeof(name), "gorgon-mkmodel %s %s", preset, eng_gguf_ggml_type_name(dtype));
    eng_synth_llama_cfg cfg = {
        .dim = s.dim, .n_layer = s.layers, .n_head = s.heads, .n_head_kv = s.kv_heads,
        .ffn = s.ffn, .n_ctx = s.ctx, .n_vocab = s.vocab, .dtype = dtype, .seed = seed,
        .vocab_from = vocab_from, .name = name, .chat_template = chat_template,
    };
    int rc = eng_gguf_write_synth_llama(out, &cfg);
    free(chat_template);
    if (rc < 0) {
        fprintf(stderr, "gorgon-mkmodel: %s\n", eng_error());
        return 1;
    }
    return 0;
}
