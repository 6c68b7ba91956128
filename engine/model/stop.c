/* Stop conditions: see engine/model/stop.h. */
#include "engine/model/stop.h"

#include <errno.h>
#include <string.h>

#include "engine/model/eng_err.h"

/* ---- stop conditions ---------------------------------------------------- */

const char *eng_finish_name(enum eng_finish f)
{
    switch (f) {
    case ENG_FINISH_NONE:
        return "none";
    case ENG_FINISH_EOS:
        return "eos";
    case ENG_FINISH_STOP:
        return "stop";
    case ENG_FINISH_LENGTH:
        return "length";
    }
    return "?";
}

int eng_stop_init(eng_stop *st, const eng_stop_cfg *cfg)
{
    memset(st, 0, sizeof(*st));
    if (cfg->n_eos < 0 || cfg->n_eos > ENG_STOP_MAX_EOS)
        return eng_fail(-EINVAL, "stop: %d end tokens (at most %d)", cfg->n_eos,
                        ENG_STOP_MAX_EOS);
    if (cfg->n_stop < 0 || cfg->n_stop > ENG_STOP_MAX_STRINGS)
        return eng_fail(-EINVAL, "stop: %d stop strings (at most %d)", cfg->n_stop,
                        ENG_STOP_MAX_STRINGS);
    for (int i = 0; i < cfg->n_eos; i++)
        st->eos[i] = cfg->eos[i];
    st->n_eos = cfg->n_eos;
    for (int i = 0; i < cfg->n_stop; i++) {
        size_t l = cfg->stop[i] ? strlen(cfg->stop[i]) : 0;
        if (l == 0 || l >= ENG_STOP_MAX_LEN)
            return eng_fail(-EINVAL, "stop: stop string %d is empty or longer than %d bytes", i,
                            ENG_STOP_MAX_LEN - 1);
        memcpy(st->stop[i], cfg->stop[i], l);
        st->stop_len[i] = l;
    }
    st->n_stop = cfg->n_stop;
    st->max_tokens = cfg->max_tokens;
    return 0;
}

/* Length of the longest suffix of held[0..n) that is a proper prefix of some
 * stop string: those bytes must wait for the next token. */
static size_t partial_suffix(const eng_stop *st, const char *h, size_t n)
{
    size_t best = 0;
    for (int i = 0; i < st->n_stop; i++) {
        size_t maxl = st->stop_len[i] - 1 < n ? st->stop_len[i] - 1 : n;
        for (size_t l = maxl; l > best; l--)
            if (memcmp(h + n - l, st->stop[i], l) == 0) {
                best = l;
                break;
            }
    }
    return best;
}

int eng_stop_feed(eng_stop *st, int32_t token, const char *piece, size_t len, char *out,
                  size_t out_cap, size_t *n_out)
{
    *n_out = 0;
    if (st->finish != ENG_FINISH_NONE)
        return st->finish;
    if (out_cap < len + ENG_STOP_MAX_LEN)
        return -ENOBUFS;
    st->n_tokens++;
    for (int i = 0; i < st->n_eos; i++)
        if (token == st->eos[i]) {
            memcpy(out, st->held, st->n_held);
            *n_out = st->n_held;
            st->n_held = 0;
            return st->finish = ENG_FINISH_EOS;
        }

    /* Append byte by byte to the held text; out receives bytes that can no
     * longer be part of a stop string. held stays below ENG_STOP_MAX_LEN. */
    size_t o = 0;
    char *h = st->held;
    for (size_t b = 0; b < len; b++) {
        h[st->n_held++] = piece[b];
        for (int i = 0; i < st->n_stop; i++) {
            size_t l = st->stop_len[i];
            if (st->n_held >= l && memcmp(h + st->n_held - l, st->stop[i], l) == 0) {
                memcpy(out + o, h, st->n_held - l);
                o += st->n_held - l;
                st->n_held = 0;
                *n_out = o;
                return st->finish = ENG_FINISH_STOP;
            }
        }
        size_t keep = partial_suffix(st, h, st->n_held);
        size_t emit = st->n_held - keep;
        memcpy(out + o, h, emit);
        o += emit;
        memmove(h, h + emit, keep);
        st->n_held = keep;
    }
    if (st->max_tokens > 0 && st->n_tokens >= st->max_tokens) {
        memcpy(out + o, h, st->n_held);
        o += st->n_held;
        st->n_held = 0;
        st->finish = ENG_FINISH_LENGTH;
    }
    *n_out = o;
    return st->finish;
}

size_t eng_stop_flush(eng_stop *st, char *out, size_t out_cap)
{
    size_t n = st->n_held < out_cap ? st->n_held : out_cap;
    memcpy(out, st->held, n);
    st->n_held = 0;
    return n;
}
