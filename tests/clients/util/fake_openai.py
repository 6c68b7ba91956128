#!/usr/bin/env python3
"""A fake OpenAI-compatible server for the `gorgon-bench serve --base-url`
tests (standard library only).

POST /v1/completions and /v1/chat/completions answer with a Server-Sent
Events stream of --chunks chunks: the first after --first-delay-ms, each
next one --gap-ms later. Chunk i carries the text "t<i> " (completions:
choices[0].text, chat: choices[0].delta.content), then an empty chunk
with finish_reason "length", then (unless --no-usage) a usage chunk with
completion_tokens = chunks * --tokens-per-chunk and prompt_tokens = the
number of prompt token ids (or words of a text prompt), then
`data: [DONE]`. Bodies go out with chunked transfer encoding on a
keep-alive HTTP/1.1 connection.

--fail-every N: every Nth POST (1-based, counting every POST) fails with
a message naming the request number, as --fail-kind says: "status" (the
default) answers --fail-status (default 500) with an OpenAI-style error
body; "event" streams one chunk, then `data: {"error": {...}}` (vLLM);
"line" streams one chunk, then an `error: {...}` line (llama-server). --api-key K: a POST without "Authorization:
Bearer K" gets 401.

GET /v1/models lists the model "fake-model"; GET /log returns one JSON
line per POST seen: {"n": N, "auth": header or null, "body": request}.
Prints the port on stdout, then serves until killed.
"""
import argparse
import http.server
import json
import socket
import sys
import threading
import time

ap = argparse.ArgumentParser()
ap.add_argument("--chunks", type=int, default=4)
ap.add_argument("--first-delay-ms", type=float, default=0.0)
ap.add_argument("--gap-ms", type=float, default=0.0)
ap.add_argument("--tokens-per-chunk", type=int, default=1)
ap.add_argument("--no-usage", action="store_true")
ap.add_argument("--fail-every", type=int, default=0)
ap.add_argument("--fail-status", type=int, default=500)
ap.add_argument("--fail-kind", choices=("status", "event", "line"), default="status")
ap.add_argument("--api-key", default=None)
args = ap.parse_args()

lock = threading.Lock()
log = []
posts = 0


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        # as real servers do: a small SSE chunk must not wait for the
        # client's delayed ACK (Nagle)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *a):
        pass

    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def event(self, obj):
        self.chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    def do_GET(self):
        if self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        elif self.path == "/log":
            with lock:
                data = "".join(json.dumps(e) + "\n" for e in log).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_json(404, {"error": {"message": "no such path", "type": "not_found"}})

    def do_POST(self):
        global posts
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        auth = self.headers.get("Authorization")
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with lock:
            posts += 1
            n = posts
            log.append({"n": n, "auth": auth, "body": body})
        chat = self.path == "/v1/chat/completions"
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            self.send_json(404, {"error": {"message": "no such path " + self.path}})
            return
        if args.api_key is not None and auth != "Bearer " + args.api_key:
            self.send_json(401, {"error": {"message": "bad API key", "type": "auth"}})
            return
        if body is None:
            self.send_json(400, {"error": {"message": "body is not JSON"}})
            return
        fail = args.fail_every and n % args.fail_every == 0
        if fail and args.fail_kind == "status":
            self.send_json(args.fail_status, {"error": {
                "message": "fake failure of request %d" % n, "type": "server_error",
                "param": None, "code": args.fail_status}})
            return
        prompt = body.get("prompt") if not chat else body["messages"][-1]["content"]
        n_prompt = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        obj = "chat.completion.chunk" if chat else "text_completion"
        t = time.monotonic()
        for i in range(args.chunks):
            t += (args.first_delay_ms if i == 0 else args.gap_ms) / 1000.0
            wait = t - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            text = "t%d " % i
            choice = {"index": 0, "finish_reason": None}
            if chat:
                choice["delta"] = {"content": text} if i else {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            self.event({"id": "x%d" % n, "object": obj, "model": "fake-model", "choices": [choice]})
            if fail:
                err = {"message": "fake failure of request %d" % n, "type": "server_error"}
                if args.fail_kind == "event":
                    self.event({"error": err})
                else:
                    self.chunk(b"error: " + json.dumps(err).encode() + b"\n\n")
                self.chunk(b"")
                return
        last = {"index": 0, "finish_reason": "length"}
        if chat:
            last["delta"] = {}
        else:
            last["text"] = ""
        self.event({"id": "x%d" % n, "object": obj, "model": "fake-model", "choices": [last]})
        if not args.no_usage:
            comp = args.chunks * args.tokens_per_chunk
            self.event({"id": "x%d" % n, "object": obj, "model": "fake-model", "choices": [],
                        "usage": {"prompt_tokens": n_prompt, "completion_tokens": comp,
                                  "total_tokens": n_prompt + comp}})
        self.event(b"[DONE]")
        self.chunk(b"")


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


srv = Server(("127.0.0.1", 0), Handler)
print(srv.server_address[1], flush=True)
srv.serve_forever()
