/* Chat templates: the families a GGUF's tokenizer.chat_template names,
 * rendered as their Jinja definitions render them with
 * add_generation_prompt=true (Hugging Face's trim_blocks/lstrip_blocks
 * environment). No Jinja engine: each family is a short C renderer, checked
 * against strings derived from its template in tests/sidecar/test_chat.c.
 *
 * The definitions followed (the reference models' tokenizer_config.json):
 *   Llama 2  meta-llama/Llama-2-7b-chat-hf: optional leading system folded into
 *            the first user turn as <<SYS>>..<</SYS>>, "<s>[INST] u [/INST]",
 *            " a </s>", contents strip()ped, user/assistant must alternate.
 *   Llama 3  meta-llama/Meta-Llama-3-8B-Instruct: <|begin_of_text|> once,
 *            "<|start_header_id|>ROLE<|end_header_id|>\n\n" + trim(content) +
 *            "<|eot_id|>", then the assistant header.
 *   ChatML   "<|im_start|>ROLE\ncontent<|im_end|>\n", then "<|im_start|>assistant\n".
 *   Zephyr   HuggingFaceH4/zephyr-7b-beta: "<|ROLE|>\ncontent</s>\n" for
 *            user/system/assistant, then "<|assistant|>\n".
 *   Mistral  mistralai/Mistral-7B-Instruct-v0.2: "<s>" once, "[INST] u [/INST]",
 *            "a</s>"; only user/assistant, alternating.
 *   Gemma    google/gemma-7b-it: "<bos>", "<start_of_turn>ROLE\n" + trim(content)
 *            + "<end_of_turn>\n" (assistant is "model"), no system role,
 *            alternating, then "<start_of_turn>model\n".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clients/sidecar/sidecar.h"

static const struct {
    const char *name, *bos;
} families[] = {
    [SC_CHAT_PLAIN] = {"plain 'role: content'", ""},
    [SC_CHAT_LLAMA2] = {"Llama 2", "<s>"},
    [SC_CHAT_LLAMA3] = {"Llama 3", "<|begin_of_text|>"},
    [SC_CHAT_CHATML] = {"ChatML", ""},
    [SC_CHAT_ZEPHYR] = {"Zephyr", ""},
    [SC_CHAT_MISTRAL] = {"Mistral", "<s>"},
    [SC_CHAT_GEMMA] = {"Gemma", "<bos>"},
};

const char *sc_chat_name(enum sc_chat_kind k)
{
    return families[k].name;
}

const char *sc_chat_bos(enum sc_chat_kind k)
{
    return families[k].bos;
}

enum sc_chat_kind sc_chat_detect(const char *t, bool *known)
{
    *known = true;
    if (!t || !*t) {
        *known = false;
        return SC_CHAT_PLAIN;
    }
    if (strstr(t, "<|im_start|>"))
        return SC_CHAT_CHATML;
    if (strstr(t, "<|start_header_id|>") && strstr(t, "<|end_header_id|>"))
        return SC_CHAT_LLAMA3;
    if (strstr(t, "<start_of_turn>"))
        return SC_CHAT_GEMMA;
    if (strstr(t, "<|user|>") && strstr(t, "<|assistant|>") && !strstr(t, "<|end|>"))
        return SC_CHAT_ZEPHYR;
    if (strstr(t, "[INST]"))
        return strstr(t, "<<SYS>>") ? SC_CHAT_LLAMA2 : SC_CHAT_MISTRAL;
    *known = false;
    return SC_CHAT_CHATML;
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* Python's str.strip() / Jinja's trim (ASCII whitespace). */
static void add_trimmed(sc_buf *b, const char *s, size_t n)
{
    while (n && is_space(*s)) {
        s++;
        n--;
    }
    while (n && is_space(s[n - 1]))
        n--;
    sc_buf_add(b, s, n);
}

static bool role_is(const sc_msg *m, const char *r)
{
    return !strcmp(m->role, r);
}

/* The alternation check of Llama 2, Mistral and Gemma: message i (counting
 * from the first non-system one) must be a user turn exactly when i is even. */
static bool alternates(const sc_msg *m, size_t n, char *err, size_t cap)
{
    for (size_t i = 0; i < n; i++)
        if (role_is(&m[i], "user") != (i % 2 == 0)) {
            snprintf(err, cap, "messages: this model's chat template requires the roles to "
                               "alternate user/assistant/user/... (message %zu is '%s')",
                     i, m[i].role);
            return false;
        }
    return true;
}

static void llama2(sc_buf *b, const sc_msg *m, size_t n)
{
    const sc_msg *sys = NULL;
    if (n && role_is(&m[0], "system")) {
        sys = &m[0];
        m++;
        n--;
    }
    for (size_t i = 0; i < n; i++) {
        sc_buf c = {0};
        if (i == 0 && sys) {
            sc_buf_adds(&c, "<<SYS>>\n");
            sc_buf_add(&c, sys->content, sys->content_len);
            sc_buf_adds(&c, "\n<</SYS>>\n\n");
        }
        sc_buf_add(&c, m[i].content, m[i].content_len);
        if (c.oom) {
            b->oom = true;
            return;
        }
        if (role_is(&m[i], "user")) {
            sc_buf_adds(b, "<s>[INST] ");
            add_trimmed(b, c.p, c.len);
            sc_buf_adds(b, " [/INST]");
        } else if (role_is(&m[i], "assistant")) {
            sc_buf_adds(b, " ");
            add_trimmed(b, c.p, c.len);
            sc_buf_adds(b, " </s>");
        }
        free(c.p);
    }
}

char *sc_chat_render(enum sc_chat_kind k, const sc_msg *m, size_t n, size_t *len, char *err,
                     size_t cap)
{
    sc_buf b = {0};
    switch (k) {
    case SC_CHAT_PLAIN:
        for (size_t i = 0; i < n; i++) {
            sc_buf_addf(&b, "%s: ", m[i].role);
            sc_buf_add(&b, m[i].content, m[i].content_len);
            sc_buf_adds(&b, "\n");
        }
        sc_buf_adds(&b, "assistant:");
        break;
    case SC_CHAT_LLAMA2: {
        size_t skip = n && role_is(&m[0], "system") ? 1 : 0;
        if (!alternates(m + skip, n - skip, err, cap))
            return NULL;
        llama2(&b, m, n);
        break;
    }
    case SC_CHAT_LLAMA3:
        for (size_t i = 0; i < n; i++) {
            if (i == 0)
                sc_buf_adds(&b, "<|begin_of_text|>");
            sc_buf_addf(&b, "<|start_header_id|>%s<|end_header_id|>\n\n", m[i].role);
            add_trimmed(&b, m[i].content, m[i].content_len);
            sc_buf_adds(&b, "<|eot_id|>");
        }
        sc_buf_adds(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
    case SC_CHAT_CHATML:
        for (size_t i = 0; i < n; i++) {
            sc_buf_addf(&b, "<|im_start|>%s\n", m[i].role);
            sc_buf_add(&b, m[i].content, m[i].content_len);
            sc_buf_adds(&b, "<|im_end|>\n");
        }
        sc_buf_adds(&b, "<|im_start|>assistant\n");
        break;
    case SC_CHAT_ZEPHYR:
        for (size_t i = 0; i < n; i++) {
            if (role_is(&m[i], "user") || role_is(&m[i], "system") ||
                role_is(&m[i], "assistant")) {
                sc_buf_addf(&b, "<|%s|>\n", m[i].role);
                sc_buf_add(&b, m[i].content, m[i].content_len);
                sc_buf_adds(&b, "</s>\n");
            }
            if (i == n - 1)
                sc_buf_adds(&b, "<|assistant|>\n");
        }
        break;
    case SC_CHAT_MISTRAL:
        if (!alternates(m, n, err, cap))
            return NULL;
        sc_buf_adds(&b, "<s>");
        for (size_t i = 0; i < n; i++) {
            if (role_is(&m[i], "user")) {
                sc_buf_adds(&b, "[INST] ");
                sc_buf_add(&b, m[i].content, m[i].content_len);
                sc_buf_adds(&b, " [/INST]");
            } else if (role_is(&m[i], "assistant")) {
                sc_buf_add(&b, m[i].content, m[i].content_len);
                sc_buf_adds(&b, "</s>");
            } else {
                free(b.p);
                snprintf(err, cap, "messages: this model's chat template (Mistral) supports only "
                                   "the user and assistant roles (message %zu is '%s')",
                         i, m[i].role);
                return NULL;
            }
        }
        break;
    case SC_CHAT_GEMMA:
        if (n && role_is(&m[0], "system")) {
            snprintf(err, cap, "messages: this model's chat template (Gemma) does not support "
                               "the system role");
            return NULL;
        }
        if (!alternates(m, n, err, cap))
            return NULL;
        sc_buf_adds(&b, "<bos>");
        for (size_t i = 0; i < n; i++) {
            sc_buf_addf(&b, "<start_of_turn>%s\n",
                        role_is(&m[i], "assistant") ? "model" : m[i].role);
            add_trimmed(&b, m[i].content, m[i].content_len);
            sc_buf_adds(&b, "<end_of_turn>\n");
        }
        sc_buf_adds(&b, "<start_of_turn>model\n");
        break;
    }
    char *out = sc_buf_take(&b, len);
    if (!out)
        snprintf(err, cap, "out of memory rendering the chat template");
    return out;
}
