/* The sidecar's chat templates: each family's renderer against the string
 * its Jinja definition produces (derived by hand from the reference models'
 * tokenizer_config.json templates, quoted in clients/sidecar/sc_chat.c),
 * detection from real template texts, the refusals the templates raise, and
 * the UTF-8 hold-back used for streaming. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "clients/sidecar/sidecar.h"

static const sc_msg conv[] = {
    {"system", "You are helpful.", 16},
    {"user", "Hello", 5},
    {"assistant", "Hi there", 8},
    {"user", "How are you?", 12},
};

static void expect(enum sc_chat_kind k, const sc_msg *m, size_t n, const char *want)
{
    char err[256] = "";
    size_t len = 0;
    char *got = sc_chat_render(k, m, n, &len, err, sizeof(err));
    cr_assert_not_null(got, "%s: %s", sc_chat_name(k), err);
    cr_assert_eq(len, strlen(got));
    cr_assert_str_eq(got, want, "%s:\n got: [%s]\nwant: [%s]", sc_chat_name(k), got, want);
    free(got);
}

static void refuse(enum sc_chat_kind k, const sc_msg *m, size_t n, const char *why)
{
    char err[256] = "";
    size_t len;
    char *got = sc_chat_render(k, m, n, &len, err, sizeof(err));
    cr_assert_null(got, "%s rendered [%s]", sc_chat_name(k), got ? got : "");
    cr_assert(strstr(err, why), "%s: error [%s] does not say '%s'", sc_chat_name(k), err, why);
}

Test(sidecar_chat, llama2_folds_the_system_prompt_into_the_first_turn)
{
    expect(SC_CHAT_LLAMA2, conv, 4,
           "<s>[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nHello [/INST] Hi there </s>"
           "<s>[INST] How are you? [/INST]");
    expect(SC_CHAT_LLAMA2, conv + 1, 1, "<s>[INST] Hello [/INST]");
    /* content.strip() */
    expect(SC_CHAT_LLAMA2, (sc_msg[]){{"user", "  Hi\n ", 6}}, 1, "<s>[INST] Hi [/INST]");
    refuse(SC_CHAT_LLAMA2, (sc_msg[]){{"user", "a", 1}, {"user", "b", 1}}, 2, "alternate");
}

Test(sidecar_chat, llama3_headers_and_trimmed_contents)
{
    expect(SC_CHAT_LLAMA3, conv, 4,
           "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
           "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
           "<|start_header_id|>user<|end_header_id|>\n\nHow are you?<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\n");
    expect(SC_CHAT_LLAMA3, (sc_msg[]){{"user", " x \n", 4}}, 1,
           "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

Test(sidecar_chat, chatml_keeps_contents_verbatim)
{
    expect(SC_CHAT_CHATML, conv, 4,
           "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
           "<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n"
           "<|im_start|>assistant\n");
    expect(SC_CHAT_CHATML, (sc_msg[]){{"user", " x \n", 4}}, 1,
           "<|im_start|>user\n x \n<|im_end|>\n<|im_start|>assistant\n");
}

Test(sidecar_chat, zephyr_turns_end_with_eos_and_a_newline)
{
    expect(SC_CHAT_ZEPHYR, conv, 4,
           "<|system|>\nYou are helpful.</s>\n<|user|>\nHello</s>\n<|assistant|>\nHi there</s>\n"
           "<|user|>\nHow are you?</s>\n<|assistant|>\n");
}

Test(sidecar_chat, mistral_has_no_system_role)
{
    expect(SC_CHAT_MISTRAL, conv + 1, 3,
           "<s>[INST] Hello [/INST]Hi there</s>[INST] How are you? [/INST]");
    refuse(SC_CHAT_MISTRAL, conv, 4, "alternate");
    refuse(SC_CHAT_MISTRAL, (sc_msg[]){{"assistant", "a", 1}}, 1, "alternate");
}

Test(sidecar_chat, gemma_calls_the_assistant_model)
{
    expect(SC_CHAT_GEMMA, conv + 1, 3,
           "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi there"
           "<end_of_turn>\n<start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\n");
    refuse(SC_CHAT_GEMMA, conv, 4, "system");
}

Test(sidecar_chat, plain_fallback_lists_role_lines)
{
    expect(SC_CHAT_PLAIN, conv, 4,
           "system: You are helpful.\nuser: Hello\nassistant: Hi there\nuser: How are you?\n"
           "assistant:");
}

Test(sidecar_chat, bos_prefixes_match_the_renderings)
{
    for (int k = SC_CHAT_PLAIN; k <= SC_CHAT_GEMMA; k++) {
        char err[256];
        size_t len;
        char *s = sc_chat_render((enum sc_chat_kind)k, conv + 1, 1, &len, err, sizeof(err));
        cr_assert_not_null(s, "%s: %s", sc_chat_name((enum sc_chat_kind)k), err);
        const char *bos = sc_chat_bos((enum sc_chat_kind)k);
        cr_assert_eq(strncmp(s, bos, strlen(bos)), 0, "%s starts with [%.20s], not [%s]",
                     sc_chat_name((enum sc_chat_kind)k), s, bos);
        free(s);
    }
}

/* Excerpts of the templates as they appear in the GGUFs' tokenizer.chat_template. */
Test(sidecar_chat, detects_the_families_from_their_templates)
{
    static const struct {
        const char *tmpl;
        enum sc_chat_kind want;
    } cases[] = {
        {"{% if messages[0]['role'] == 'system' %}...{% set content = '<<SYS>>\\n' + system_message"
         " + '\\n<</SYS>>\\n\\n' + message['content'] %}...{{ bos_token + '[INST] ' + "
         "content.strip() + ' [/INST]' }}", SC_CHAT_LLAMA2},
        {"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
         "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] "
         "| trim + '<|eot_id|>' %}", SC_CHAT_LLAMA3},
        {"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
         "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}", SC_CHAT_CHATML},
        {"{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + "
         "message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ "
         "'<|assistant|>\\n'  + message['content'] + eos_token }}", SC_CHAT_ZEPHYR},
        {"{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] '"
         " + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ "
         "message['content'] + eos_token}}", SC_CHAT_MISTRAL},
        {"{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + role + '\\n' + "
         "message['content'] | trim + '<end_of_turn>\\n' }}", SC_CHAT_GEMMA},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        bool known = false;
        enum sc_chat_kind k = sc_chat_detect(cases[i].tmpl, &known);
        cr_assert(known, "case %zu not recognised", i);
        cr_assert_eq(k, cases[i].want, "case %zu: %s, want %s", i, sc_chat_name(k),
                     sc_chat_name(cases[i].want));
    }
    bool known = true;
    /* Phi-3 uses <|user|> with <|end|>: not Zephyr, an unknown template */
    cr_assert_eq(sc_chat_detect("{{'<|user|>' + '\\n' + message['content'] + '<|end|>'}}"
                                "<|assistant|>", &known), SC_CHAT_CHATML);
    cr_assert_not(known);
    cr_assert_eq(sc_chat_detect("", &known), SC_CHAT_PLAIN);
    cr_assert_not(known);
}

Test(sidecar_chat, utf8_holds_back_a_cut_sequence_and_replaces_invalid_bytes)
{
    const char *s = "caf\xc3\xa9 \xe2\x82"; /* "café " then 2 of the 3 bytes of U+20AC */
    cr_assert_eq(sc_utf8_complete(s, strlen(s), false), 6);
    cr_assert_eq(sc_utf8_complete(s, strlen(s), true), strlen(s));
    cr_assert_eq(sc_utf8_complete("ab", 2, false), 2);
    size_t n;
    char *c = sc_utf8_clean("a\xff" "b\xc3", 4, &n);
    cr_assert_str_eq(c, "a\xef\xbf\xbd" "b\xef\xbf\xbd");
    cr_assert_eq(n, strlen(c));
    free(c);
    c = sc_utf8_clean("\xed\xa0\x80", 3, &n); /* a surrogate is not UTF-8 */
    cr_assert_str_eq(c, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
    free(c);
}
