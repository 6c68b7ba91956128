#!/usr/bin/env python3
"""Local HTTP server for the `gorgon pull` tests (standard library only).

Serves one deterministic 1 MiB body under several behaviours:
  /file.bin        Range support (206), ETag = its SHA-256
  /badsum.bin      ETag = a SHA-256 that is not the body's
  /truncated.bin   a request without Range gets half the body, then the
                   connection closes (Content-Length promised all of it);
                   a Range request is served properly
  /norange.bin     ignores Range: always 200 with the whole body
  /OWNER/REPO/resolve/REV/FILE   302 to /FILE with X-Linked-Etag (as
                   Hugging Face answers for LFS files)
  /log             the Range headers seen so far, one per line ("-": none)
anything else: 404. Prints the port on stdout, then serves until killed.
"""
import hashlib
import http.server
import re
import sys

SIZE = 1 << 20
BODY = bytes(((i * 31) + (i // 7)) & 0xFF for i in range(SIZE))
SHA = hashlib.sha256(BODY).hexdigest()
ranges = []


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_body(self, etag, honour_range=True, truncate=False):
        rng = self.headers.get("Range")
        ranges.append(rng or "-")
        start = 0
        if rng and honour_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(m.group(1)) if m else 0
            if start >= SIZE:
                self.send_response(416)
                self.send_header("Content-Range", "bytes */%d" % SIZE)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, SIZE - 1, SIZE))
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(SIZE - start))
        self.send_header("ETag", '"%s"' % etag)
        self.end_headers()
        if truncate and not rng:
            self.wfile.write(BODY[: SIZE // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(BODY[start:])

    def do_GET(self):
        p = self.path
        m = re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", p)
        if m:
            self.send_response(302)
            self.send_header("Location", "/" + m.group(1))
            self.send_header("X-Linked-Etag", '"%s"' % SHA)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif p == "/file.bin":
            self.send_body(SHA)
        elif p == "/badsum.bin":
            self.send_body("0" * 64)
        elif p == "/truncated.bin":
            self.send_body(SHA, truncate=True)
        elif p == "/norange.bin":
            self.send_body(SHA, honour_range=False)
        elif p == "/log":
            data = ("\n".join(ranges) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
sys.stdout.write("%d\n" % srv.server_address[1])  # one write: the reader stops at the newline
sys.stdout.flush()
sys.stdout.close()
srv.serve_forever()
