#!/usr/bin/env python3
"""Mock of `llmem serve` for developing the dashboard and the client checks without Rust.

Dev tool only (stdlib, Python 3.11). It serves src/serve/dashboard.html at `GET /` and fakes
the JSON API with changing figures; the text it "generates" is a fixed word list.

    python3 tests/browser/mock_server.py [--port 0] [--host 127.0.0.1] [--api-key K]
                                         [--ranks N]

It prints `listening on http://HOST:PORT` (port 0 picks a free one) as its first line.
With --api-key every /v1/* request needs `Authorization: Bearer K`, else 401.

Shapes the real server must match (field order free; `created` is unix seconds):

GET /v1/memory   see the issue; /v1/models: {"object":"list","data":[{"id","object":"model",
                 "created":0,"owned_by":"llmem"}]}
Errors (any status >= 400), content-type application/json:
  {"error": {"message": str, "type": "invalid_request_error"|"authentication_error"|
             "server_error", "param": null, "code": str|null}}
POST /v1/completions, stream false:
  {"id":"cmpl-N","object":"text_completion","created":T,"model":M,
   "choices":[{"index":0,"text":S,"finish_reason":"stop"|"length",
               "logprobs": null | {"tokens":[str], "token_logprobs":[float],
                                   "top_logprobs":[{str: float}]  (one dict per token,
                                                   `logprobs` entries, distinct keys),
                                   "text_offset":[int]  (char offset of each token in S)}}],
   "usage":{"prompt_tokens":P,"completion_tokens":C,"total_tokens":P+C}}
  len(tokens) == usage.completion_tokens.
POST /v1/completions, stream true: text/event-stream, each event `data: JSON\n\n`:
  {"id","object":"text_completion","created","model",
   "choices":[{"index":0,"text":piece,"logprobs":null,"finish_reason":null}]}
  the last chunk has finish_reason "stop"|"length" (text may be ""), then `data: [DONE]\n\n`.
POST /v1/chat/completions, stream false:
  {"id":"chatcmpl-N","object":"chat.completion","created","model",
   "choices":[{"index":0,"message":{"role":"assistant","content":S},
               "logprobs": null | {"content":[{"token":str,"logprob":float,"bytes":[int],
                                   "top_logprobs":[{"token":str,"logprob":float,
                                                    "bytes":[int]}]  (top_logprobs entries)}]},
               "finish_reason":"stop"|"length"}],
   "usage":{"prompt_tokens","completion_tokens","total_tokens"}}
  `logprobs` is present only when the request has "logprobs": true; `top_logprobs` (0..20)
  sets the list length (0 -> []).
POST /v1/chat/completions, stream true: events of
  {"id","object":"chat.completion.chunk","created","model",
   "choices":[{"index":0,"delta":{...},"logprobs":null,"finish_reason":null}]}
  first delta {"role":"assistant","content":""}, then {"content":piece} per token, last
  chunk delta {} with finish_reason "stop"|"length", then `data: [DONE]`.
"""

import argparse
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODEL = "smollm2-135m-instruct"
DASHBOARD = Path(__file__).resolve().parents[2] / "src" / "serve" / "dashboard.html"
WORDS = [" Paris", ".", " It", " is", " the", " capital", " of", " France", " and", " a",
         " city", " of", " light", "."]
ALTERNATIVES = [" London", " Rome", " Berlin", " Madrid", " Lyon"]
MIB = 1 << 20

START = time.time()
LOCK = threading.Lock()
STATE = {"running": 0, "prompt_total": 0, "generated_total": 0, "next_id": 1}
RANKS = 1  # --ranks: ranks of a fake TP deployment


def fake_tokens(n):
    """n (token, logprob, alternatives) triples; alternatives never repeat the token."""
    out = []
    for i in range(n):
        tok = WORDS[i % len(WORDS)]
        lp = -0.05 - 0.1 * (i % 3)
        alts = [(a, lp - 1.0 - j) for j, a in enumerate(ALTERNATIVES) if a != tok]
        out.append((tok, lp, alts))
    return out


def memory_snapshot():
    t = time.time() - START
    with LOCK:
        running = STATE["running"]
        gen = STATE["generated_total"] + int(t * 7)  # background "load" so tokens/s moves
        prompt = STATE["prompt_total"] + int(t * 3)
    block = 589824
    used_blocks = 40 + int(120 * (1 + math.sin(t / 9)))
    cached = 10 + int(10 * (1 + math.sin(t / 5)))
    total = 1820
    act = int(25165824 * (0.5 + 0.5 * math.sin(t * 1.7))) if int(t) % 3 else 0
    return {
        "model": MODEL,
        "device": "cpu",
        "uptime_s": round(t, 3),
        "ranks": [{
            "rank": i,
            "stage": 0,
            "tp_rank": i,
            **({"planned": {"weights_bytes": 538060032 // RANKS,
                            "kv_cache_reserved_bytes": total * block // RANKS,
                            "activation_bytes": 25165824 // RANKS}} if RANKS > 1 else {}),
            "weights_bytes": 538060032 // RANKS,
            "kv_cache_reserved_bytes": total * block,
            "kv_cache_used_bytes": used_blocks * block,
            "activation_bytes": act,
            "activation_peak_bytes": 25165824,
            "runtime_overhead_bytes": 40 * MIB,
            "unaccounted_bytes": 81234567 + int(8 * MIB * math.sin(t / 4)),
            "device_total_bytes": 25000000000,
            "device_used_bytes": 1700000000,
            "process_rss_bytes": 1700000000,
        } for i in range(RANKS)],
        "plan": {
            "weights_bytes": 538060032,
            "kv_cache_reserved_bytes": total * block,
            "activation_bytes": 25165824,
            "runtime_overhead_bytes": 0,
            "headroom_bytes": 0,
            "total_bytes": 538060032 + total * block + 25165824,
        },
        "kv_blocks": {"total": total, "used": used_blocks, "free": total - used_blocks,
                      "cached": cached, "block_size_tokens": 16, "bytes_per_block": block},
        "requests": {"running": running, "waiting": 0},
        "tokens": {"prompt_total": prompt, "generated_total": gen},
        "preemptions_total": int(t // 60),
    }


class Handler(BaseHTTPRequestHandler):
    server_version = "llmem-mock"
    protocol_version = "HTTP/1.1"
    api_key = None

    def log_message(self, fmt, *args):  # quiet
        pass

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def error(self, status, message, typ="invalid_request_error", code=None):
        self.send_json(status, {"error": {"message": message, "type": typ, "param": None,
                                          "code": code}})

    def authorized(self):
        if not self.api_key:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {self.api_key}":
            return True
        self.error(401, "missing or wrong API key: send Authorization: Bearer <key>",
                   "authentication_error", "invalid_api_key")
        return False

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/":
            body = DASHBOARD.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/v1/memory":
            if self.authorized():
                self.send_json(200, memory_snapshot())
        elif path == "/v1/models":
            if self.authorized():
                self.send_json(200, {"object": "list", "data": [
                    {"id": MODEL, "object": "model", "created": 0, "owned_by": "llmem"}]})
        else:
            self.error(404, f"no route for GET {path}", code="not_found")

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        n = int(self.headers.get("Content-Length", "0") or 0)
        raw = self.rfile.read(n)  # read it first so a kept-alive connection stays in step
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return self.error(404, f"no route for POST {path}", code="not_found")
        if not self.authorized():
            return
        try:
            req = json.loads(raw or b"null")
            if not isinstance(req, dict):
                raise ValueError("body must be a JSON object")
        except ValueError as e:
            return self.error(400, f"invalid JSON body: {e}")
        chat = path == "/v1/chat/completions"
        if chat:
            msgs = req.get("messages")
            if not isinstance(msgs, list) or not msgs:
                return self.error(400, "'messages' must be a non-empty list", code="messages")
            prompt_tokens = sum(len(str(m.get("content", "")).split()) + 4 for m in msgs)
        else:
            prompt = req.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                return self.error(400, "'prompt' must be a non-empty string", code="prompt")
            prompt_tokens = len(prompt.split())
        max_tokens = req.get("max_tokens") or 16
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return self.error(400, "'max_tokens' must be a positive integer")
        n = min(max_tokens, 12)  # the fake model "stops" after 12 tokens
        finish = "length" if n == max_tokens else "stop"
        toks = fake_tokens(n)
        with LOCK:
            cid = STATE["next_id"]
            STATE["next_id"] += 1
            STATE["prompt_total"] += prompt_tokens
        common = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{cid}", "created": int(time.time()),
                  "model": req.get("model") or MODEL}
        if req.get("stream"):
            return self.stream(chat, common, toks, finish)
        with LOCK:
            STATE["generated_total"] += n
        text = "".join(t for t, _, _ in toks)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                 "total_tokens": prompt_tokens + n}
        if chat:
            lp = None
            if req.get("logprobs"):
                k = int(req.get("top_logprobs") or 0)
                lp = {"content": [{
                    "token": t, "logprob": l, "bytes": list(t.encode()),
                    "top_logprobs": ([{"token": t, "logprob": l, "bytes": list(t.encode())}]
                                     + [{"token": a, "logprob": al, "bytes": list(a.encode())}
                                        for a, al in alts])[:k]} for t, l, alts in toks]}
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": lp, "finish_reason": finish}
            obj = "chat.completion"
        else:
            lp = None
            k = req.get("logprobs")
            if isinstance(k, int) and k >= 0:
                offs, pos = [], 0
                for t, _, _ in toks:
                    offs.append(pos)
                    pos += len(t)
                lp = {"tokens": [t for t, _, _ in toks],
                      "token_logprobs": [l for _, l, _ in toks],
                      "top_logprobs": [dict(([(t, l)] + alts)[:k]) for t, l, alts in toks],
                      "text_offset": offs}
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
            obj = "text_completion"
        self.send_json(200, {**common, "object": obj, "choices": [choice], "usage": usage})

    def stream(self, chat, common, toks, finish):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choice_fields, finish_reason=None):
            choice = {"index": 0, **choice_fields, "logprobs": None,
                      "finish_reason": finish_reason}
            data = {**common, "object": obj, "choices": [choice]}
            self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()

        with LOCK:
            STATE["running"] += 1
        try:
            if chat:
                event({"delta": {"role": "assistant", "content": ""}})
            for t, _, _ in toks:
                time.sleep(0.15)
                event({"delta": {"content": t}} if chat else {"text": t})
                with LOCK:
                    STATE["generated_total"] += 1
            event({"delta": {}} if chat else {"text": ""}, finish)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # client pressed Stop
        finally:
            with LOCK:
                STATE["running"] -= 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--ranks", type=int, default=1, help="fake a TP deployment of N ranks")
    args = ap.parse_args()
    Handler.api_key = args.api_key
    global RANKS
    RANKS = max(1, args.ranks)
    srv = ThreadingHTTPServer((args.host, args.port), Handler)
    srv.daemon_threads = True
    print(f"listening on http://{args.host}:{srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
