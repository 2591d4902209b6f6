#!/usr/bin/env python3
"""A fake model provider for the broker's tests, over TLS with a private CA.

    fake_provider.py STATE_DIR CERT KEY

Writes its port to STATE_DIR/port. Before each request it reads STATE_DIR/keys.json, a map of
accepted keys to what to do with them: "ok", "429", "500", "redirect" (307 elsewhere), "stall" (no answer until
STATE_DIR/release exists) or "hold" (stream the first event,
then wait until STATE_DIR/release exists before finishing); a request's body may say the same
with `"hold": true`, or `"hold": N` to wait after event N, and an Anthropic stream sends
`"deltas": N` text events (default 1). It checks the injected key in the
header of the API called (OpenAI: `Authorization: Bearer`, Anthropic: `x-api-key`, Gemini:
`x-goog-api-key`, Azure OpenAI: `api-key`) and answers 401 to any other. It answers OpenAI chat
completions (also under Azure's `/openai/deployments/NAME/`), Anthropic messages and Gemini's
`generateContent` / `streamGenerateContent`, as JSON or as SSE streams with usage (an OpenAI chat
stream only when `stream_options.include_usage` asks, as OpenAI does), and
`GET /v1/models`. Each request is appended to STATE_DIR/seen.jsonl: the
method, path, the key it carried, and every header name and value the agent could have set.
"""

import json
import os
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE, CERT, KEY = sys.argv[1], sys.argv[2], sys.argv[3]
LOCK = threading.Lock()
USAGE = {"prompt_tokens": 11, "completion_tokens": 7}


def accepted(key):
    """What to do with `key`: keys.json says, else the example plugin's upstream database
    (keys.json's "__db__") accepts its active keys."""
    try:
        with open(os.path.join(STATE, "keys.json")) as f:
            keys = json.load(f)
    except FileNotFoundError:
        keys = {}
    if key in keys:
        return keys[key]
    if key and "__db__" in keys:
        import sqlite3
        with sqlite3.connect(keys["__db__"]) as db:
            row = db.execute("SELECT 1 FROM creds WHERE value = ? AND status = 'active'",
                             (key,)).fetchone()
        return "ok" if row else None
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def key_header(self):
        """The header that carried the key, and the key."""
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return "authorization", auth[len("Bearer "):]
        for name in ("x-api-key", "x-goog-api-key", "api-key"):
            if self.headers.get(name) is not None:
                return name, self.headers.get(name)
        return None, None

    def key(self):
        return self.key_header()[1]

    def record(self, body):
        entry = {
            "method": self.command,
            "path": self.path,
            "key": self.key(),
            "key_header": self.key_header()[0],
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("utf-8", "replace"),
        }
        with LOCK, open(os.path.join(STATE, "seen.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    def reply(self, status, obj, extra=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def events(self, events, hold_at):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, (name, data) in enumerate(events):
            text = (f"event: {name}\n" if name else "") + f"data: {data}\n\n"
            raw = text.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            self.wfile.flush()
            if i == hold_at:
                while not os.path.exists(os.path.join(STATE, "release")):
                    time.sleep(0.02)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.record(body)
        what = accepted(self.key())
        if what is None:
            return self.reply(401, {"error": {"message": "invalid api key"}})
        if what == "429":
            return self.reply(429, {"error": {"message": "rate limited"}}, {"Retry-After": "1"})
        if what == "500":
            return self.reply(500, {"error": {"message": "upstream failed"}})
        if what == "redirect":
            self.send_response(307)
            self.send_header("Location", "https://attacker.example/v1/chat/completions")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if what == "stall":
            # Never answers (until released): the client's time-out must end the wait.
            while not os.path.exists(os.path.join(STATE, "release")):
                time.sleep(0.02)
            return self.reply(200, {})
        request = json.loads(body or b"{}")
        stream = bool(request.get("stream"))
        asked = request.get("hold")
        hold = 0 if what == "hold" or asked is True else (
            asked if isinstance(asked, int) and not isinstance(asked, bool) else None)
        path = self.path
        if path.startswith("/openai/deployments/"):
            # Azure OpenAI: /openai/deployments/NAME/chat/completions?api-version=…
            path = "/v1/" + path.split("/", 4)[4]
        if "/models/" in path and ":generateContent" in path:
            return self.reply(200, {
                "candidates": [{"content": {"role": "model", "parts": [{"text": "hello from fake"}]},
                                "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 2,
                                  "totalTokenCount": 10},
            })
        if "/models/" in path and ":streamGenerateContent" in path:
            part = lambda text, out: json.dumps({
                "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}}],
                "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": out,
                                  "totalTokenCount": 8 + out},
            })
            if "alt=sse" not in path:
                # Without alt=sse Gemini streams one JSON array of the same chunks.
                data = ("[" + ",".join([part("hello ", 1), part("streamed", 2)]) + "]").encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return self.wfile.write(data)
            return self.events([(None, part("hello ", 1)), (None, part("streamed", 2))], hold)
        if path.startswith("/v1/chat/completions"):
            if not stream:
                return self.reply(200, {
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                    "model": request.get("model", "m"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "hello from fake"}}],
                    "usage": dict(USAGE, total_tokens=18),
                })
            # As OpenAI does: usage (null in every chunk, then a last chunk with no choices)
            # only when the request asks for it.
            include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
            chunk = lambda delta, usage=None: json.dumps(dict({
                "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
                "model": request.get("model", "m"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}] if delta else [],
            }, **({"usage": usage} if include_usage else {})))
            events = [
                (None, chunk({"role": "assistant", "content": "hello "})),
                (None, chunk({"content": "streamed"})),
            ]
            if include_usage:
                events.append((None, chunk(None, dict(USAGE, total_tokens=18))))
            return self.events(events + [(None, "[DONE]")], hold)
        if self.path.startswith("/v1/messages"):
            message = {"id": "msg_1", "type": "message", "role": "assistant",
                       "model": request.get("model", "m"), "stop_reason": "end_turn",
                       "stop_sequence": None}
            if not stream:
                return self.reply(200, dict(message, content=[{"type": "text", "text": "hello from fake"}],
                                            usage={"input_tokens": 13, "output_tokens": 5}))
            start = dict(message, content=[], stop_reason=None,
                         usage={"input_tokens": 13, "output_tokens": 1})
            return self.events([
                ("message_start", json.dumps({"type": "message_start", "message": start})),
                ("content_block_start", json.dumps({"type": "content_block_start", "index": 0,
                                                    "content_block": {"type": "text", "text": ""}})),
            ] + [
                ("content_block_delta", json.dumps({"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": "hello streamed"}}))
            ] * int(request.get("deltas", 1)) + [
                ("content_block_stop", json.dumps({"type": "content_block_stop", "index": 0})),
                ("message_delta", json.dumps({"type": "message_delta",
                                              "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                              "usage": {"output_tokens": 5}})),
                ("message_stop", json.dumps({"type": "message_stop"})),
            ], hold)
        if self.path.startswith("/v1/models"):
            return self.reply(200, {"object": "list", "data": []})
        return self.reply(404, {"error": {"message": "no such endpoint"}})

    do_GET = do_POST = do_PUT = do_DELETE = handle_any


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(CERT, KEY)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with open(os.path.join(STATE, "port.tmp"), "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(os.path.join(STATE, "port.tmp"), os.path.join(STATE, "port"))
    server.serve_forever()


if __name__ == "__main__":
    main()
