"""The OpenAI-compatible HTTP API through the `openai` package (pinned in
scripts/install-deps.sh), and with curl. `--part basic`: completions and chat, whole and streamed,
stop strings, log-probabilities, usage, seeds, n, errors. `--part limits` (a cluster with slowed
steps and --max-queued-requests 2): a client that disconnects mid-stream frees its sequence at
once, and the queue bound answers 429."""
import argparse
import json
import subprocess
import time
import urllib.error
import urllib.request

import openai

from common import active_requests, run, wait_active

p = argparse.ArgumentParser()
p.add_argument("--http", required=True, help="HOST:PORT of the HTTP API")
p.add_argument("--grpc", required=True, help="HOST:PORT of the gRPC API (admin status)")
p.add_argument("--switchyard", required=True)
p.add_argument("--model", required=True)
p.add_argument("--part", choices=["basic", "limits"], required=True)
a = p.parse_args()

BASE = f"http://{a.http}/v1"
client = openai.OpenAI(base_url=BASE, api_key="unused", max_retries=0, timeout=120)
MODEL = a.model
CHAT = [{"role": "user", "content": "Say hello."}]


def post_raw(path, body):
    """(status, parsed body) of a POST with a raw body (for malformed requests)."""
    req = urllib.request.Request(BASE + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def assert_error_body(body):
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err


def models_and_health():
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL], ids
    with urllib.request.urlopen(f"http://{a.http}/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"


def completion_whole_and_usage():
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason == "length", r
    assert r.usage.completion_tokens == 12, r.usage
    assert r.usage.prompt_tokens == len("Once upon a time".encode()), r.usage  # byte-level fixture
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert isinstance(c.text, str)


def completion_stream_matches_whole():
    whole = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0).choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole, (text, whole)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20, chunks[-1]
    fins = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert fins == ["length"], fins


def chat_whole_and_stream():
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=10, temperature=0)
    m = r.choices[0].message
    assert r.object == "chat.completion" and m.role == "assistant" and r.choices[0].finish_reason == "length", r
    # The ChatML template of the test's tokenizer_config.json, byte-level: one token per byte.
    prompt = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    assert r.usage.prompt_tokens == len(prompt.encode()), r.usage
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
    assert chunks[0].object == "chat.completion.chunk"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == m.content, (text, m.content)
    assert chunks[-1].choices[0].finish_reason == "length"


def stop_strings_across_tokens():
    full = client.completions.create(model=MODEL, prompt="The stop test", max_tokens=40, temperature=0).choices[0].text
    # Three characters from the middle: several byte-level tokens, so the match spans tokens.
    k = len(full) // 2
    stop = full[k:k + 3]
    assert len(stop) == 3, full
    r = client.completions.create(model=MODEL, prompt="The stop test", max_tokens=40, temperature=0, stop=[stop, "\x00never"])
    c = r.choices[0]
    assert c.text == full[:full.find(stop)], (c.text, full, stop)
    assert c.finish_reason == "stop", c
    # Streamed: the same text, the stop string never sent.
    chunks = list(client.completions.create(model=MODEL, prompt="The stop test", max_tokens=40, temperature=0, stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def logprobs_completion_and_chat():
    r = client.completions.create(model=MODEL, prompt="log", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6, lp
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3, (chosen, top)
        # Greedy: the chosen token is the most likely one.
        assert abs(max(top.values()) - chosen) < 1e-4, (chosen, top)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 5, content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4, t
        assert t.bytes == list(t.token.encode()), t
    # Streamed chat carries them per chunk.
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, stream=True))
    n = sum(len(ch.choices[0].logprobs.content) for ch in chunks if ch.choices and ch.choices[0].logprobs)
    assert n == 4, n


def seeds_reproduce_and_n_choices():
    kw = dict(model=MODEL, prompt="seed", max_tokens=24, temperature=1.0)
    one = client.completions.create(seed=42, **kw).choices[0].text
    two = client.completions.create(seed=42, **kw).choices[0].text
    other = client.completions.create(seed=7, **kw).choices[0].text
    assert one == two, (one, two)
    assert one != other, one
    r = client.completions.create(seed=42, n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.choices[0].text == one  # choice i uses seed + i
    assert len({c.text for c in r.choices}) == 3
    assert r.usage.completion_tokens == 3 * 24
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, n=2, stream=True))
    assert {ch.choices[0].index for ch in chunks} == {0, 1}


def bad_requests_get_400_with_an_openai_body():
    for kw in [dict(temperature=5), dict(top_p=0), dict(n=0), dict(max_tokens=0), dict(max_tokens=100000)]:
        try:
            client.completions.create(model=MODEL, prompt="x", **{"max_tokens": 4, **kw})
            raise AssertionError(f"{kw} accepted")
        except openai.BadRequestError as e:
            assert e.status_code == 400, e
            assert e.body["type"] == "invalid_request_error" and e.body["message"], e.body
    status, body = post_raw("/completions", b"{not json")
    assert status == 400, (status, body)
    assert_error_body(body)
    status, body = post_raw("/chat/completions", json.dumps({"model": MODEL}).encode())
    assert status == 400 and "messages" in body["error"]["message"], body


def unknown_model_gets_404():
    try:
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=2)
        raise AssertionError("accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and e.body["code"] == "model_not_found" and e.body["param"] == "model", e.body


def curl_streams_sse_lines():
    body = json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 4, "stream": True})
    out = subprocess.run(["curl", "-sS", "-N", f"{BASE}/chat/completions", "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    lines = [l for l in out.splitlines() if l]
    assert all(l.startswith("data: ") for l in lines), out
    assert lines[-1] == "data: [DONE]", out
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant", out
    assert len(lines) >= 3, out


def disconnect_mid_stream_frees_the_sequence():
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, stream=True)  # to the end of the context
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert active_requests(a.switchyard, a.grpc) == 1
    stream.close()
    took = wait_active(a.switchyard, a.grpc, 0, limit_s=3)
    print(f"     freed {took:.2f} s after the disconnect")


def queue_bound_answers_429():
    # --max-queued-requests 2: two long streams hold both places.
    held = [client.completions.create(model=MODEL, prompt="q", max_tokens=400, stream=True) for _ in range(2)]
    for s in held:
        next(iter(s))
    try:
        client.completions.create(model=MODEL, prompt="q", max_tokens=2)
        raise AssertionError("a third request was accepted")
    except openai.RateLimitError as e:
        assert e.status_code == 429 and e.body["code"] == "rate_limit_exceeded", e.body
    for s in held:
        s.close()
    wait_active(a.switchyard, a.grpc, 0, limit_s=3)
    # The places are given back: requests are accepted again.
    deadline = time.monotonic() + 5
    while True:
        try:
            client.completions.create(model=MODEL, prompt="q", max_tokens=2)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "still 429 after the streams closed"
            time.sleep(0.05)


if a.part == "basic":
    run([models_and_health, completion_whole_and_usage, completion_stream_matches_whole, chat_whole_and_stream,
         stop_strings_across_tokens, logprobs_completion_and_chat, seeds_reproduce_and_n_choices,
         bad_requests_get_400_with_an_openai_body, unknown_model_gets_404, curl_streams_sse_lines])
else:
    run([disconnect_mid_stream_frees_the_sequence, queue_bound_answers_429])
