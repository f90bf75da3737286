#!/usr/bin/env python3
"""Drive `llmem serve` with the official `openai` Python package and check the answers' shapes.

    python3 -m venv /tmp/oai-venv && /tmp/oai-venv/bin/pip install -r tests/openai_client/requirements.txt
    /tmp/oai-venv/bin/python tests/openai_client/check_openai.py BASE_URL MODEL [--api-key K]

BASE_URL is the server's OpenAI root, e.g. http://127.0.0.1:8080/v1 (a bare
http://host:port gets /v1 appended). Three checks:
  (a) completions.create(prompt="The capital of France is", max_tokens=8, temperature=0,
      logprobs=3): text non-empty, usage complete, one top_logprobs dict of 3 entries per
      token, len(tokens) == usage.completion_tokens;
  (b) chat.completions.create(stream=True, max_tokens=16): deltas add up to non-empty text and
      the stream ends with a finish_reason;
  (c) chat.completions.create(logprobs=True, top_logprobs=2): every content entry has
      2 top_logprobs.
Exit 0 when all pass; 1 with a message naming the failed check.
"""

import argparse
import sys
from urllib.parse import urlsplit

try:
    import openai
except ImportError:
    sys.exit("the `openai` package is missing: pip install -r tests/openai_client/requirements.txt")


class Failure(Exception):
    pass


def expect(cond, message):
    if not cond:
        raise Failure(message)


def check_usage(usage, where):
    expect(usage is not None, f"{where}: response has no usage")
    for f in ("prompt_tokens", "completion_tokens", "total_tokens"):
        v = getattr(usage, f, None)
        expect(isinstance(v, int) and v >= 0, f"{where}: usage.{f} is {v!r}, expected an int >= 0")
    expect(usage.prompt_tokens > 0, f"{where}: usage.prompt_tokens is 0 for a non-empty prompt")
    expect(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
           f"{where}: usage.total_tokens {usage.total_tokens} != prompt_tokens "
           f"{usage.prompt_tokens} + completion_tokens {usage.completion_tokens}")


def check_completion(client, model):
    where = "(a) completion"
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                  temperature=0, logprobs=3)
    expect(r.object == "text_completion", f"{where}: object is {r.object!r}")
    expect(len(r.choices) == 1, f"{where}: {len(r.choices)} choices, expected 1")
    c = r.choices[0]
    expect(isinstance(c.text, str) and c.text.strip(), f"{where}: empty text {c.text!r}")
    expect(c.finish_reason in ("stop", "length"), f"{where}: finish_reason {c.finish_reason!r}")
    check_usage(r.usage, where)
    expect(1 <= r.usage.completion_tokens <= 8,
           f"{where}: usage.completion_tokens {r.usage.completion_tokens} not in 1..8")
    lp = c.logprobs
    expect(lp is not None, f"{where}: choices[0].logprobs is null although logprobs=3 was asked")
    toks = lp.tokens or []
    expect(len(toks) == r.usage.completion_tokens,
           f"{where}: {len(toks)} logprobs.tokens but usage.completion_tokens = "
           f"{r.usage.completion_tokens}")
    expect(lp.token_logprobs is not None and len(lp.token_logprobs) == len(toks),
           f"{where}: logprobs.token_logprobs has {len(lp.token_logprobs or [])} entries "
           f"for {len(toks)} tokens")
    expect(lp.top_logprobs is not None and len(lp.top_logprobs) == len(toks),
           f"{where}: logprobs.top_logprobs has {len(lp.top_logprobs or [])} entries "
           f"for {len(toks)} tokens")
    for i, (tok, tlp, top) in enumerate(zip(toks, lp.token_logprobs, lp.top_logprobs)):
        expect(isinstance(top, dict) and len(top) == 3,
               f"{where}: top_logprobs[{i}] for token {tok!r} has "
               f"{len(top) if isinstance(top, dict) else top!r} entries, expected 3")
        expect(all(isinstance(v, (int, float)) and v <= 1e-6 for v in top.values()),
               f"{where}: top_logprobs[{i}] has a value that is not a log-probability: {top}")
        expect(isinstance(tlp, (int, float)) and tlp <= 1e-6,
               f"{where}: token_logprobs[{i}] = {tlp!r} is not a log-probability")
    if lp.text_offset is not None:
        expect(len(lp.text_offset) == len(toks),
               f"{where}: text_offset has {len(lp.text_offset)} entries for {len(toks)} tokens")
    if "".join(toks) != c.text:
        print(f"  note: tokens join to {''.join(toks)!r}, text is {c.text!r}")
    print(f"ok {where}: {c.text!r} ({r.usage.completion_tokens} tokens, finish "
          f"{c.finish_reason}), top-3 of token 0: {lp.top_logprobs[0] if toks else {}}")


def check_chat_stream(client, model):
    where = "(b) streamed chat"
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello"}], stream=True,
        max_tokens=16)
    text, finish, chunks, role = [], None, 0, None
    for chunk in stream:
        chunks += 1
        expect(chunk.object == "chat.completion.chunk",
               f"{where}: chunk {chunks} has object {chunk.object!r}")
        if not chunk.choices:
            continue  # e.g. a usage-only chunk
        expect(finish is None, f"{where}: a chunk came after the finish_reason chunk")
        ch = chunk.choices[0]
        if ch.delta is not None:
            role = role or ch.delta.role
            if ch.delta.content:
                text.append(ch.delta.content)
        if ch.finish_reason is not None:
            finish = ch.finish_reason
    joined = "".join(text)
    expect(chunks > 0, f"{where}: the stream had no chunks")
    expect(joined.strip(), f"{where}: the deltas add up to empty text ({chunks} chunks)")
    expect(finish in ("stop", "length"),
           f"{where}: the stream ended without a finish_reason of stop/length (got {finish!r})")
    expect(role in (None, "assistant"), f"{where}: delta role is {role!r}")
    print(f"ok {where}: {joined!r} ({chunks} chunks, finish {finish})")


def check_chat_logprobs(client, model):
    where = "(c) chat logprobs"
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8,
        temperature=0, logprobs=True, top_logprobs=2)
    expect(r.object == "chat.completion", f"{where}: object is {r.object!r}")
    c = r.choices[0]
    expect(c.message.role == "assistant", f"{where}: message.role is {c.message.role!r}")
    expect(c.message.content and c.message.content.strip(), f"{where}: empty message content")
    check_usage(r.usage, where)
    expect(c.logprobs is not None and c.logprobs.content is not None,
           f"{where}: choices[0].logprobs.content is missing although logprobs=true was asked")
    content = c.logprobs.content
    expect(len(content) == r.usage.completion_tokens,
           f"{where}: {len(content)} logprobs.content entries but usage.completion_tokens = "
           f"{r.usage.completion_tokens}")
    for i, e in enumerate(content):
        expect(isinstance(e.token, str) and isinstance(e.logprob, float) and e.logprob <= 1e-6,
               f"{where}: content[{i}] = token {e.token!r}, logprob {e.logprob!r}")
        expect(e.top_logprobs is not None and len(e.top_logprobs) == 2,
               f"{where}: content[{i}].top_logprobs has {len(e.top_logprobs or [])} entries, "
               f"expected 2")
        lps = [t.logprob for t in e.top_logprobs]
        expect(lps == sorted(lps, reverse=True),
               f"{where}: content[{i}].top_logprobs not sorted best first: {lps}")
        for t in e.top_logprobs:
            expect(isinstance(t.token, str) and t.logprob <= 1e-6,
                   f"{where}: content[{i}].top_logprobs entry {t!r}")
            if t.bytes is not None:
                try:
                    spelled = bytes(t.bytes).decode("utf-8")
                except UnicodeDecodeError:
                    spelled = None  # part of a multi-byte character: token text can't match
                expect(spelled is None or spelled == t.token,
                       f"{where}: content[{i}] top entry bytes {t.bytes} spell {spelled!r}, "
                       f"not the token {t.token!r}")
    joined = b"".join(bytes(e.bytes) for e in content if e.bytes is not None)
    if joined.decode("utf-8", "replace") != c.message.content:
        print(f"  note: token bytes join to {joined!r}, content is {c.message.content!r}")
    print(f"ok {where}: {c.message.content!r}, {len(content)} tokens x 2 top_logprobs")


def main():
    ap = argparse.ArgumentParser(description="Check llmem serve with the openai package.")
    ap.add_argument("base_url", help="e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("model")
    ap.add_argument("--api-key", default=None, help="sent as Authorization: Bearer K")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    args = ap.parse_args()
    base = args.base_url.rstrip("/")
    if urlsplit(base).path in ("", "/"):
        base += "/v1"
    client = openai.OpenAI(base_url=base, api_key=args.api_key or "none", max_retries=0,
                           timeout=args.timeout)
    print(f"openai {openai.__version__}, base_url {base}, model {args.model}")
    failed = 0
    for step in (check_completion, check_chat_stream, check_chat_logprobs):
        try:
            step(client, args.model)
        except Failure as e:
            failed += 1
            print(f"FAIL {e}", file=sys.stderr)
        except openai.APIStatusError as e:
            failed += 1
            print(f"FAIL {step.__name__}: HTTP {e.status_code}: {e.message}", file=sys.stderr)
        except openai.APIConnectionError as e:
            failed += 1
            print(f"FAIL {step.__name__}: cannot reach {base}: {e}", file=sys.stderr)
        except openai.OpenAIError as e:
            failed += 1
            print(f"FAIL {step.__name__}: {type(e).__name__}: {e}", file=sys.stderr)
    if failed:
        print(f"{failed} of 3 checks failed", file=sys.stderr)
        return 1
    print("PASS: 3 of 3 openai client checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
