// The official openai client against gorgon-sidecar, one scenario per run:
//   node openai_client.mjs SCENARIO
// with SIDECAR_URL (http://HOST:PORT), PROMPT, MAX_TOKENS and STOP (one stop
// string) in the environment. Prints one JSON object with what the client
// saw; tests/sidecar/test_openai.c checks it against gorgon's own output.
import OpenAI from 'openai';

const client = new OpenAI({
  baseURL: `${process.env.SIDECAR_URL}/v1`,
  apiKey: process.env.SIDECAR_KEY || 'none',
  maxRetries: 0,
  timeout: 30000,
});
const model = 'stories260K';
const prompt = process.env.PROMPT || 'Once upon a time';
const maxTokens = Number(process.env.MAX_TOKENS || 32);
const messages = [{ role: 'user', content: prompt }];

async function collect(stream, chat) {
  let text = '', finish = null, usage = null, chunks = 0, role = null, id = null;
  for await (const c of stream) {
    chunks++;
    id = c.id;
    if (c.usage) usage = c.usage;
    for (const ch of c.choices) {
      if (chat) {
        if (ch.delta.role) role = ch.delta.role;
        text += ch.delta.content ?? '';
      } else {
        text += ch.text;
      }
      if (ch.finish_reason) finish = ch.finish_reason;
    }
  }
  return { id, text, finish_reason: finish, usage, chunks, role };
}

const scenarios = {
  async complete() {
    const r = await client.completions.create({ model, prompt, max_tokens: maxTokens, temperature: 0 });
    return { id: r.id, object: r.object, text: r.choices[0].text, finish_reason: r.choices[0].finish_reason, usage: r.usage };
  },
  async 'complete-stream'() {
    const s = await client.completions.create({
      model, prompt, max_tokens: maxTokens, temperature: 0, stream: true,
      stream_options: { include_usage: true },
    });
    return collect(s, false);
  },
  async chat() {
    const r = await client.chat.completions.create({ model, messages, max_tokens: maxTokens, temperature: 0 });
    const c = r.choices[0];
    return { id: r.id, object: r.object, role: c.message.role, text: c.message.content, finish_reason: c.finish_reason, usage: r.usage };
  },
  async 'chat-stream'() {
    const s = await client.chat.completions.create({
      model, messages, max_completion_tokens: maxTokens, temperature: 0, stream: true,
      stream_options: { include_usage: true },
    });
    return collect(s, true);
  },
  async stop() {
    const r = await client.completions.create({
      model, prompt, max_tokens: maxTokens, temperature: 0, stop: [process.env.STOP],
    });
    return { text: r.choices[0].text, finish_reason: r.choices[0].finish_reason, usage: r.usage };
  },
  async bad() {
    try {
      await client.completions.create({ model, prompt, max_tokens: maxTokens, n: 2 });
      return { error: null };
    } catch (e) {
      return { class: e.constructor.name, status: e.status, param: e.param, code: e.code, type: e.type, message: e.message };
    }
  },
  async models() {
    const list = await client.models.list();
    return { data: list.data };
  },
  async abort() {
    const controller = new AbortController();
    const s = await client.completions.create(
      // repeat_penalty < 1 (a llama.cpp extension the sidecar passes on) makes
      // stories260K repeat itself instead of ending: the stream runs its full
      // length (seconds), so the abort always lands mid-stream
      { model, prompt, max_tokens: maxTokens, temperature: 0, stream: true, repeat_penalty: 0.5 },
      { signal: controller.signal },
    );
    let chunks = 0, text = '';
    try {
      for await (const c of s) {
        chunks++;
        text += c.choices[0]?.text ?? '';
        if (text.length > 0) controller.abort();
      }
      return { aborted: controller.signal.aborted, chunks, text };
    } catch (e) {
      return { aborted: controller.signal.aborted, error: e.name, chunks, text };
    }
  },
};

const name = process.argv[2];
if (!scenarios[name]) {
  console.error(`usage: node openai_client.mjs ${Object.keys(scenarios).join('|')}`);
  process.exit(2);
}
try {
  console.log(JSON.stringify(await scenarios[name]()));
} catch (e) {
  console.error(`${name}: ${e.constructor.name}: ${e.message}`);
  process.exit(1);
}
