/* SentencePiece-style tokenizer (llama.cpp's llm_tokenizer_spm semantics).
 *
 * Encode: symbols are one UTF-8 character each, kept in a doubly linked list
 * over the working text; every adjacent pair whose concatenation is a piece
 * goes on a max-heap keyed by (score desc, left position asc). Popping the
 * best pair merges it (if both halves are still exactly as when the pair was
 * pushed) and pushes the two new pairs it forms with its neighbours, so the
 * whole encode is O(n log n). A pushed pair can go stale (one half merged
 * elsewhere first): that is detected by comparing lengths, as llama.cpp does.
 * When no piece has a ▁ after other text (true of SentencePiece vocabularies)
 * no merge can cross the start of a word, so words are merged one at a time:
 * same result, but small heaps that stay in cache (~18x faster on 1 MiB).
 */
#include "engine/model/tokenizer.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "engine/model/eng_err.h"

struct eng_tok {
    int32_t n;
    char *text;       /* all pieces back to back */
    size_t *off;      /* n + 1 offsets into text */
    float *score;
    uint8_t *type;
    uint8_t *byte_val; /* BYTE tokens: the byte they stand for */
    uint32_t *slot;   /* piece hash: id + 1, 0 = empty */
    size_t mask;
    int32_t byte_tok[256]; /* byte fallback: token of byte b, -1 if none */
    bool split_words;      /* no piece has ▁ after other text: words encode independently */
    int32_t bos, eos, unk;
    bool add_bos, add_space_prefix;
    size_t max_piece;
};

static const char k_space[] = "\xe2\x96\x81"; /* U+2581 ▁ */
static const char k_unk_glyph[] = "\xe2\x96\x85"; /* U+2585 ▅, what llama.cpp prints for UNK */
static const char k_fffd[] = "\xef\xbf\xbd";

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)s[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static size_t piece_len(const eng_tok *t, int32_t id)
{
    return t->off[id + 1] - t->off[id];
}

int32_t eng_tok_find(const eng_tok *t, const char *s, size_t n)
{
    size_t i = (size_t)hash_bytes(s, n) & t->mask;
    for (;;) {
        uint32_t v = t->slot[i];
        if (!v)
            return -1;
        int32_t id = (int32_t)(v - 1);
        if (piece_len(t, id) == n && memcmp(t->text + t->off[id], s, n) == 0)
            return id;
        i = (i + 1) & t->mask;
    }
}

/* Later duplicates replace earlier ones, like llama.cpp's token_to_id map. */
static void hash_put(eng_tok *t, int32_t id)
{
    const char *s = t->text + t->off[id];
    size_t n = piece_len(t, id);
    size_t i = (size_t)hash_bytes(s, n) & t->mask;
    for (;;) {
        uint32_t v = t->slot[i];
        if (!v) {
            t->slot[i] = (uint32_t)id + 1;
            return;
        }
        int32_t o = (int32_t)(v - 1);
        if (piece_len(t, o) == n && memcmp(t->text + t->off[o], s, n) == 0) {
            t->slot[i] = (uint32_t)id + 1;
            return;
        }
        i = (i + 1) & t->mask;
    }
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* "<0xXX>" → byte value, else -1. */
static int parse_byte_piece(const char *s, size_t n)
{
    if (n != 6 || s[0] != '<' || s[1] != '0' || s[2] != 'x' || s[5] != '>')
        return -1;
    int hi = hexval(s[3]), lo = hexval(s[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

/* Optional special id: absent → default (if in range, else -1); present →
 * must be in range, except the conventional "none" values -1 / UINT32_MAX. */
static int special_id(const eng_gguf *g, const char *key, int32_t def, int32_t n, int32_t *out)
{
    int64_t v;
    int rc = eng_gguf_get_i64(g, key, &v);
    if (rc == -ENOENT) {
        *out = def < n ? def : -1;
        return 0;
    }
    if (rc < 0)
        return eng_fail(-EBADMSG, "tokenizer: %s must be an integer", key);
    if (v == -1 || v == (int64_t)UINT32_MAX) {
        *out = -1;
        return 0;
    }
    if (v < 0 || v >= n)
        return eng_fail(-EBADMSG, "tokenizer: %s = %lld is outside the vocabulary (%d tokens)", key,
                        (long long)v, n);
    *out = (int32_t)v;
    return 0;
}

static int opt_bool(const eng_gguf *g, const char *key, bool def, bool *out)
{
    int rc = eng_gguf_get_bool(g, key, out);
    if (rc == -ENOENT) {
        *out = def;
        return 0;
    }
    if (rc < 0)
        return eng_fail(-EBADMSG, "tokenizer: %s must be a bool", key);
    return 0;
}

static int load(eng_tok *t, const eng_gguf *g)
{
    const char *model;
    int rc = eng_gguf_get_str(g, "tokenizer.ggml.model", &model, NULL);
    if (rc == -ENOENT)
        return eng_fail(-ENOENT, "tokenizer: the file has no tokenizer (tokenizer.ggml.model missing)");
    if (rc < 0)
        return eng_fail(-EBADMSG, "tokenizer: tokenizer.ggml.model must be a string");
    if (strcmp(model, "llama") != 0)
        return eng_fail(-EBADMSG,
                        "tokenizer: model '%.64s' is not supported (only 'llama', SentencePiece)",
                        model);

    eng_gguf_arr toks, scores = {0}, types = {0};
    rc = eng_gguf_get_arr(g, "tokenizer.ggml.tokens", &toks);
    if (rc == -ENOENT)
        return eng_fail(-EBADMSG, "tokenizer: tokenizer.ggml.tokens missing");
    if (rc < 0 || toks.type != ENG_GGUF_STR)
        return eng_fail(-EBADMSG, "tokenizer: tokenizer.ggml.tokens must be an array of strings");
    if (toks.n == 0 || toks.n >= INT32_MAX)
        return eng_fail(-EBADMSG, "tokenizer: vocabulary size %llu is out of range",
                        (unsigned long long)toks.n);
    int32_t n = (int32_t)toks.n;
    t->n = n;

    bool have_scores = false, have_types = false;
    rc = eng_gguf_get_arr(g, "tokenizer.ggml.scores", &scores);
    if (rc == 0) {
        if (scores.n != toks.n || scores.type == ENG_GGUF_STR || scores.type == ENG_GGUF_BOOL)
            return eng_fail(-EBADMSG,
                            "tokenizer: tokenizer.ggml.scores must be %d numbers (got %llu of type %s)",
                            n, (unsigned long long)scores.n, eng_gguf_type_name(scores.type));
        have_scores = true;
    } else if (rc != -ENOENT) {
        return eng_fail(-EBADMSG, "tokenizer: tokenizer.ggml.scores must be an array");
    }
    rc = eng_gguf_get_arr(g, "tokenizer.ggml.token_type", &types);
    if (rc == 0) {
        if (types.n != toks.n || types.type == ENG_GGUF_STR || types.type == ENG_GGUF_BOOL ||
            types.type == ENG_GGUF_F32 || types.type == ENG_GGUF_F64)
            return eng_fail(-EBADMSG,
                            "tokenizer: tokenizer.ggml.token_type must be %d integers (got %llu of type %s)",
                            n, (unsigned long long)types.n, eng_gguf_type_name(types.type));
        have_types = true;
    } else if (rc != -ENOENT) {
        return eng_fail(-EBADMSG, "tokenizer: tokenizer.ggml.token_type must be an array");
    }

    if ((rc = special_id(g, "tokenizer.ggml.bos_token_id", 1, n, &t->bos)) < 0 ||
        (rc = special_id(g, "tokenizer.ggml.eos_token_id", 2, n, &t->eos)) < 0 ||
        (rc = special_id(g, "tokenizer.ggml.unknown_token_id", 0, n, &t->unk)) < 0 ||
        (rc = opt_bool(g, "tokenizer.ggml.add_bos_token", true, &t->add_bos)) < 0 ||
        (rc = opt_bool(g, "tokenizer.ggml.add_space_prefix", true, &t->add_space_prefix)) < 0)
        return rc;

    /* Pieces: sizes first so the text is one allocation bounded by the file. */
    size_t total = 0;
    for (int32_t i = 0; i < n; i++) {
        const char *s;
        size_t l;
        eng_gguf_arr_str(g, &toks, (uint64_t)i, &s, &l);
        total += l; /* each piece lies inside the file: no overflow */
    }
    t->text = malloc(total ? total : 1);
    t->off = malloc(((size_t)n + 1) * sizeof(*t->off));
    t->score = malloc((size_t)n * sizeof(*t->score));
    t->type = malloc((size_t)n);
    t->byte_val = malloc((size_t)n);
    size_t cap = 16;
    while (cap < (size_t)n * 2)
        cap <<= 1;
    t->slot = calloc(cap, sizeof(*t->slot));
    t->mask = cap - 1;
    if (!t->text || !t->off || !t->score || !t->type || !t->byte_val || !t->slot)
        return eng_fail(-ENOMEM, "tokenizer: out of memory");

    size_t pos = 0;
    t->max_piece = sizeof(k_unk_glyph) - 1;
    for (int32_t i = 0; i < n; i++) {
        const char *s;
        size_t l;
        eng_gguf_arr_str(g, &toks, (uint64_t)i, &s, &l);
        t->off[i] = pos;
        memcpy(t->text + pos, s, l);
        pos += l;
        if (l > t->max_piece)
            t->max_piece = l;
        float sc = 0.0f;
        if (have_scores && eng_gguf_arr_f32(&scores, (uint64_t)i, &sc) < 0)
            return eng_fail(-EBADMSG, "tokenizer: score of token %d is out of range", i);
        t->score[i] = sc;
        int bv = parse_byte_piece(s, l);
        t->byte_val[i] = bv < 0 ? 0 : (uint8_t)bv;
        int64_t ty;
        if (have_types) {
            if (eng_gguf_arr_i64(&types, (uint64_t)i, &ty) < 0 || ty < ENG_TOK_UNDEFINED ||
                ty > ENG_TOK_BYTE)
                return eng_fail(-EBADMSG, "tokenizer: token %d has an invalid token_type", i);
            if (ty == ENG_TOK_BYTE && bv < 0)
                return eng_fail(-EBADMSG, "tokenizer: byte token %d is not of the form <0xXX>", i);
        } else if (i == t->unk) {
            ty = ENG_TOK_UNKNOWN;
        } else if (i == t->bos || i == t->eos) {
            ty = ENG_TOK_CONTROL;
        } else if (bv >= 0) {
            ty = ENG_TOK_BYTE;
        } else {
            ty = ENG_TOK_NORMAL;
        }
        t->type[i] = (uint8_t)ty;
    }
    t->off[n] = pos;
    for (int32_t i = 0; i < n; i++)
        hash_put(t, i);

    /* If every piece is (▁*)(text without ▁), no merge can join a symbol
     * with a following ▁, so each "word" can be merged on its own. */
    t->split_words = true;
    for (int32_t i = 0; i < n && t->split_words; i++) {
        const char *p = t->text + t->off[i];
        size_t l = piece_len(t, i), j = 0;
        while (j + 3 <= l && memcmp(p + j, k_space, 3) == 0)
            j += 3;
        for (; j + 3 <= l; j++)
            if (memcmp(p + j, k_space, 3) == 0) {
                t->split_words = false;
                break;
            }
    }

    /* Byte fallback as llama.cpp: the <0xXX> piece, else the raw one-byte piece. */
    for (int b = 0; b < 256; b++) {
        static const char hex[] = "0123456789ABCDEF";
        char buf[6] = {'<', '0', 'x', hex[b >> 4], hex[b & 15], '>'};
        int32_t id = eng_tok_find(t, buf, 6);
        if (id < 0) {
            char c = (char)b;
            id = eng_tok_find(t, &c, 1);
        }
        t->byte_tok[b] = id;
    }
    return 0;
}

int eng_tok_create(eng_tok **out, const eng_gguf *g)
{
    if (!out || !g)
        return eng_fail(-EINVAL, "tokenizer: invalid arguments");
    eng_tok *t = calloc(1, sizeof(*t));
    if (!t)
        return eng_fail(-ENOMEM, "tokenizer: out of memory");
    int rc = load(t, g);
    if (rc < 0) {
        eng_tok_destroy(t);
        return rc;
    }
    *out = t;
    return 0;
}

void eng_tok_destroy(eng_tok *t)
{
    if (!t)
        return;
    free(t->text);
    free(t->off);
    free(t->score);
    free(t->type);
    free(t->byte_val);
    free(t->slot);
    free(t);
}

int32_t eng_tok_n_vocab(const eng_tok *t)
{
    return t->n;
}

int32_t eng_tok_bos(const eng_tok *t)
{
    return t->bos;
}

int32_t eng_tok_eos(const eng_tok *t)
{
    return t->eos;
}

int32_t eng_tok_unk(const eng_tok *t)
{
    return t->unk;
}

bool eng_tok_add_bos(const eng_tok *t)
{
    return t->add_bos;
}

bool eng_tok_add_space_prefix(const eng_tok *t)
{
    return t->add_space_prefix;
}

bool eng_tok_is_eog(const eng_tok *t, int32_t id)
{
    if (id < 0 || id >= t->n)
        return false;
    return id == t->eos || (t->type[id] == ENG_TOK_CONTROL && id != t->bos);
}

const char *eng_tok_piece(const eng_tok *t, int32_t id, size_t *len)
{
    if (id < 0 || id >= t->n)
        return NULL;
    if (len)
        *len = piece_len(t, id);
    return t->text + t->off[id];
}

float eng_tok_score(const eng_tok *t, int32_t id)
{
    return id >= 0 && id < t->n ? t->score[id] : 0.0f;
}

enum eng_tok_type eng_tok_type(const eng_tok *t, int32_t id)
{
    return id >= 0 && id < t->n ? (enum eng_tok_type)t->type[id] : ENG_TOK_UNDEFINED;
}

size_t eng_tok_max_piece_bytes(const eng_tok *t)
{
    return t->max_piece;
}

/* ---- encode ------------------------------------------------------------ */

struct sym {
    int32_t prev, next;
    uint32_t start, n; /* bytes in the working text; n == 0: merged away */
};

struct bigram {
    float score;
    int32_t left, right;
    uint32_t size;
};

/* Heap order: higher score first, then smaller left (leftmost wins ties). */
static bool bg_before(const struct bigram *a, const struct bigram *b)
{
    if (a->score != b->score)
        return a->score > b->score;
    return a->left < b->left;
}

struct enc {
    const eng_tok *t;
    const char *w;
    struct sym *sym;
    struct bigram *heap;
    size_t n_heap;
};

static void heap_push(struct enc *e, struct bigram b)
{
    size_t i = e->n_heap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!bg_before(&b, &e->heap[p]))
            break;
        e->heap[i] = e->heap[p];
        i = p;
    }
    e->heap[i] = b;
}

static struct bigram heap_pop(struct enc *e)
{
    struct bigram top = e->heap[0];
    struct bigram last = e->heap[--e->n_heap];
    size_t n = e->n_heap, i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && bg_before(&e->heap[c + 1], &e->heap[c]))
            c++;
        if (!bg_before(&e->heap[c], &last))
            break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n)
        e->heap[i] = last;
    return top;
}

static void try_bigram(struct enc *e, int32_t l, int32_t r)
{
    if (l < 0 || r < 0)
        return;
    const struct sym *a = &e->sym[l], *b = &e->sym[r];
    uint32_t size = a->n + b->n;
    int32_t id = eng_tok_find(e->t, e->w + a->start, size);
    if (id < 0)
        return;
    heap_push(e, (struct bigram){.score = e->t->score[id], .left = l, .right = r, .size = size});
}

/* Length of the UTF-8 character starting with byte c, as llama.cpp's
 * unicode_len_utf8 (continuation/invalid lead bytes count as 1). */
static uint32_t utf8_len(uint8_t c)
{
    static const uint8_t lookup[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return lookup[c >> 4];
}

static int64_t emit(int32_t *out, size_t cap, int64_t count, int32_t id)
{
    if (out) {
        if ((size_t)count >= cap)
            return -ENOSPC;
        out[count] = id;
    }
    return count + 1;
}

/* BPE over symbols [a, b) (already split into characters), then append
 * their tokens. Returns the new count or a negative error. */
static int64_t encode_segment(const eng_tok *t, const char *w, struct sym *sym, int32_t a,
                              int32_t b, struct bigram *heap, int32_t *out, size_t cap,
                              int64_t count)
{
    sym[a].prev = -1;
    sym[b - 1].next = -1;
    struct enc e = {.t = t, .w = w, .sym = sym, .heap = heap, .n_heap = 0};
    for (int32_t i = a + 1; i < b; i++)
        try_bigram(&e, i - 1, i);
    while (e.n_heap > 0) {
        struct bigram bg = heap_pop(&e);
        struct sym *l = &sym[bg.left], *r = &sym[bg.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != bg.size)
            continue; /* stale: one side changed since the pair was pushed */
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0)
            sym[r->next].prev = bg.left;
        try_bigram(&e, l->prev, bg.left);
        try_bigram(&e, bg.left, l->next);
    }

    for (int32_t i = a; i != -1; i = sym[i].next) {
        const struct sym *sy = &sym[i];
        int32_t id = eng_tok_find(t, w + sy->start, sy->n);
        if (id >= 0) {
            if ((count = emit(out, cap, count, id)) < 0)
                return count;
            continue;
        }
        bool bytes_ok = true;
        for (uint32_t j = 0; j < sy->n; j++)
            if (t->byte_tok[(uint8_t)w[sy->start + j]] < 0)
                bytes_ok = false;
        if (!bytes_ok) {
            if (t->unk < 0)
                return eng_fail(-EILSEQ, "tokenizer: text has a character the vocabulary cannot "
                                         "represent (no byte tokens, no UNK)");
            if ((count = emit(out, cap, count, t->unk)) < 0)
                return count;
            continue;
        }
        for (uint32_t j = 0; j < sy->n; j++)
            if ((count = emit(out, cap, count, t->byte_tok[(uint8_t)w[sy->start + j]])) < 0)
                return count;
    }
    return count;
}

int64_t eng_tok_encode(const eng_tok *t, const char *text, size_t len, bool add_bos,
                       int32_t *out, size_t cap)
{
    if (!t || (!text && len))
        return eng_fail(-EINVAL, "tokenizer: invalid arguments");
    int64_t count = 0;
    if (add_bos && t->bos >= 0 && (count = emit(out, cap, count, t->bos)) < 0)
        return eng_fail(-ENOSPC, "tokenizer: output buffer too small");
    if (len == 0)
        return count; /* like SentencePiece: no prefix for empty text */
    if (len > (UINT32_MAX / 2 - 3) / 3)
        return eng_fail(-EINVAL, "tokenizer: text too long (%zu bytes)", len);

    size_t wl = t->add_space_prefix ? 3 : 0;
    for (size_t i = 0; i < len; i++)
        wl += text[i] == ' ' ? 3 : 1;
    char *w = malloc(wl);
    struct sym *sym = NULL;
    struct bigram *heap = NULL;
    size_t sym_cap = 0, heap_cap = 0;
    int64_t rc = 0;
    if (!w) {
        rc = eng_fail(-ENOMEM, "tokenizer: out of memory");
        goto done;
    }
    size_t o = 0;
    if (t->add_space_prefix) {
        memcpy(w, k_space, 3);
        o = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(w + o, k_space, 3);
            o += 3;
        } else {
            w[o++] = text[i];
        }
    }

    /* One symbol per character. With a word-safe vocabulary a segment ends
     * before every ▁ that follows something else (no merge can cross there),
     * so segments are merged one at a time in small, cache-resident buffers
     * instead of one heap over the whole text. */
    for (size_t off = 0; off < wl && count >= 0;) {
        int32_t ns = 0;
        bool prev_space = false;
        size_t e = off;
        while (e < wl) {
            uint32_t l = utf8_len((uint8_t)w[e]);
            if (l > wl - e)
                l = (uint32_t)(wl - e);
            bool sp = l == 3 && memcmp(w + e, k_space, 3) == 0;
            if (ns > 0 && t->split_words && sp && !prev_space)
                break;
            if ((size_t)ns == sym_cap) {
                size_t nc = sym_cap ? 2 * sym_cap : 256;
                struct sym *ns_ = realloc(sym, nc * sizeof(*sym));
                if (!ns_) {
                    rc = eng_fail(-ENOMEM, "tokenizer: out of memory");
                    goto done;
                }
                sym = ns_;
                sym_cap = nc;
            }
            sym[ns] = (struct sym){.prev = ns - 1, .next = ns + 1, .start = (uint32_t)e, .n = l};
            ns++;
            prev_space = sp;
            e += l;
        }
        /* Every push is one of the ns - 1 seeds or one of at most two per
         * merge (< ns merges): the heap never exceeds 3 * ns. */
        if (3 * (size_t)ns > heap_cap) {
            size_t nc = 3 * (size_t)ns;
            free(heap);
            heap = malloc(nc * sizeof(*heap));
            if (!heap) {
                rc = eng_fail(-ENOMEM, "tokenizer: out of memory");
                goto done;
            }
            heap_cap = nc;
        }
        count = encode_segment(t, w, sym, 0, ns, heap, out, cap, count);
        off = e;
    }
    if (count == -ENOSPC)
        rc = eng_fail(-ENOSPC, "tokenizer: output buffer too small (%zu tokens)", cap);
    else
        rc = count;
done:
    free(w);
    free(sym);
    free(heap);
    return rc;
}

/* ---- decode ------------------------------------------------------------ */

struct sink {
    char *out;
    size_t cap, n;
    bool full;
};

static void put(struct sink *k, const void *p, size_t n)
{
    if (k->full || n > k->cap - k->n) {
        k->full = true;
        return;
    }
    memcpy(k->out + k->n, p, n);
    k->n += n;
}

/* Feed one byte through the UTF-8 validator (Unicode "maximal subpart"
 * substitution, as WHATWG's decoder): complete characters are written,
 * a prefix is kept in st->pend. */
static void utf8_feed(eng_tok_stream *st, struct sink *k, uint8_t b)
{
    for (;;) {
        if (st->n_pend == 0) {
            if (b < 0x80) {
                put(k, &b, 1);
            } else if ((b >= 0xC2 && b <= 0xDF) || (b >= 0xE0 && b <= 0xEF) ||
                       (b >= 0xF0 && b <= 0xF4)) {
                st->pend[st->n_pend++] = b;
            } else {
                put(k, k_fffd, 3);
            }
            return;
        }
        uint8_t lead = st->pend[0];
        uint8_t lo = 0x80, hi = 0xBF;
        if (st->n_pend == 1) {
            if (lead == 0xE0)
                lo = 0xA0;
            else if (lead == 0xED)
                hi = 0x9F;
            else if (lead == 0xF0)
                lo = 0x90;
            else if (lead == 0xF4)
                hi = 0x8F;
        }
        if (b < lo || b > hi) {
            /* The pending prefix is ill-formed: replace it, then retry b fresh. */
            put(k, k_fffd, 3);
            st->n_pend = 0;
            continue;
        }
        st->pend[st->n_pend++] = b;
        uint8_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : 2;
        if (st->n_pend == need) {
            put(k, st->pend, need);
            st->n_pend = 0;
        }
        return;
    }
}

static void feed(eng_tok_stream *st, struct sink *k, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        utf8_feed(st, k, (uint8_t)s[i]);
}

void eng_tok_stream_init(eng_tok_stream *st, int32_t prev_token)
{
    memset(st, 0, sizeof(*st));
    st->prev = prev_token;
}

int64_t eng_tok_stream_push(const eng_tok *t, eng_tok_stream *st, int32_t token, char *out,
                            size_t cap)
{
    if (token < 0 || token >= t->n)
        return -EINVAL;
    if (!out)
        cap = 0;
    eng_tok_stream s = *st;
    struct sink k = {.out = out, .cap = cap};
    const char *p = t->text + t->off[token];
    size_t n = piece_len(t, token);
    switch (t->type[token]) {
    case ENG_TOK_CONTROL:
    case ENG_TOK_UNUSED:
        break;
    case ENG_TOK_UNKNOWN:
        feed(&s, &k, k_unk_glyph, 3);
        break;
    case ENG_TOK_BYTE: {
        uint8_t b = t->byte_val[token];
        utf8_feed(&s, &k, b);
        break;
    }
    case ENG_TOK_USER_DEFINED:
        feed(&s, &k, p, n);
        break;
    default: {
        /* Normal piece: ▁ is a space; the space the encoder prefixed to the
         * text is dropped from the first piece after BOS. */
        size_t i = 0;
        if (t->bos >= 0 && st->prev == t->bos && n >= 3 && memcmp(p, k_space, 3) == 0)
            i = 3;
        while (i < n) {
            if (n - i >= 3 && memcmp(p + i, k_space, 3) == 0) {
                utf8_feed(&s, &k, ' ');
                i += 3;
            } else {
                utf8_feed(&s, &k, (uint8_t)p[i++]);
            }
        }
        break;
    }
    }
    if (k.full)
        return -ENOSPC;
    s.prev = token;
    *st = s;
    return (int64_t)k.n;
}

int64_t eng_tok_stream_flush(const eng_tok *t, eng_tok_stream *st, char *out, size_t cap)
{
    (void)t;
    if (st->n_pend == 0)
        return 0;
    if (!out || cap < 3)
        return -ENOSPC;
    memcpy(out, k_fffd, 3);
    st->n_pend = 0;
    return 3;
}

int64_t eng_tok_decode(const eng_tok *t, const int32_t *tokens, size_t n, int32_t prev_token,
                       char *out, size_t cap)
{
    eng_tok_stream st;
    eng_tok_stream_init(&st, prev_token);
    size_t tmp_cap = 3 * t->max_piece + ENG_TOK_STREAM_SLACK;
    char *tmp = NULL;
    if (!out) {
        tmp = malloc(tmp_cap);
        if (!tmp)
            return -ENOMEM;
    }
    int64_t total = 0;
    for (size_t i = 0; i <= n; i++) {
        char *dst = out ? out + total : tmp;
        size_t room = out ? cap - (size_t)total : tmp_cap;
        int64_t r = i < n ? eng_tok_stream_push(t, &st, tokens[i], dst, room)
                          : eng_tok_stream_flush(t, &st, dst, room);
        if (r < 0) {
            free(tmp);
            return r;
        }
        total += r;
    }
    free(tmp);
    return total;
}
