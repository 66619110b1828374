"""``gptj-jax serve``: the real server as a subprocess on 127.0.0.1 (a free port, a tiny random model saved
with transformers), queried with the real ``openai`` client (streamed and not) and raw HTTP (httpx):
greedy and seeded completions equal offline ``gptj_jax.generate``, streams concatenate to the whole text,
echo + logprobs equal ``gptj_jax.score``, 32 concurrent clients, a client disconnecting mid-stream, the
queue limit, malformed requests (OpenAI's error shape, naming the field), and SIGTERM under load.

The server is module-scoped (one warm-up for the file); the SIGTERM test is the file's last and stops it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from conftest import hf_model

import gptj_jax
from gptj_jax import GPTJConfig

# vocab 50400: GPT-J's tokenizer fits (text prompts); 128 positions leave room for long streams
CFG = GPTJConfig(vocab_size=50400, n_positions=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
NAME = "tiny-gptj"
SLOTS = 8
WAITING = 32
GRACE = 3.0
PROMPTS = ["Hello world", "The cat sat on", "Once upon a time", "A"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-model")
    hf_model(CFG, seed=0, scale=3.0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def offline(model_dir):
    config, params = gptj_jax.load(model_dir)
    return config, params, gptj_jax.load_tokenizer(model_dir)


def _precompile(offline) -> None:
    """The offline runs' programs (greedy and sampled, 10 and 100 tokens, 3 rows), compiled while the server
    warms up (the two processes overlap)."""
    ids = [1, 2, 3]
    _offline_text(offline, ids, 10)
    _offline_text(offline, ids, 10, do_sample=True, temperature=0.8, seed=0)
    _offline_text(offline, ids, 10, do_sample=True, temperature=0.8, seed=0, num_return_sequences=3)
    _offline_text(offline, ids, 100, eos_token_id=[])
    _offline_text(offline, ids, 8, eos_token_id=[])


@pytest.fixture(scope="module")
def server(model_dir, offline, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "gptj_jax.cli", "serve", "--model", model_dir, "--port", str(port),
           "--max-slots", str(SLOTS), "--max-waiting", str(WAITING), "--served-model-name", NAME,
           "--grace", str(GRACE), "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    precompile = threading.Thread(target=_precompile, args=(offline,))
    precompile.start()
    try:
        deadline = time.monotonic() + 240
        warming = None  # a completion asked while warming up
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server not ready:\n{log.read_text()}"
            try:
                r = httpx.get(url + "/health", timeout=2)
                if r.status_code == 200:
                    break
                assert r.status_code == 503 and r.json()["status"] == "warming_up", r.text
                if warming is None:
                    warming = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=10)
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        precompile.join()
        yield {"url": url, "proc": proc, "log": log, "warming": warming}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server["url"] + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _offline_text(offline, prompt, max_tokens, **kw) -> tuple[str, list[int]]:
    config, params, tok = offline
    ids = tok(prompt)["input_ids"] if isinstance(prompt, str) else prompt
    out = gptj_jax.generate(config, params, [ids], max_new_tokens=max_tokens, tokenizer=tok, **kw)
    new = out.new_tokens[0, : out.num_new_tokens[0]].tolist()
    return tok.decode(new, skip_special_tokens=True), new


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ============================================================================ completions
def test_health_models_and_chat(server):
    # /health said 503 while the programs compiled (the warm-up takes seconds), and completions were refused
    warming = server["warming"]
    assert warming is not None and warming.status_code == 503 and _error(warming)["code"] == "warming_up"
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
    models = _client(server).models.list()
    assert [m.id for m in models.data] == [NAME]
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"model": NAME, "messages": []})
    assert r.status_code == 404 and "GPT-J is not a chat model" in _error(r)["message"]


def test_greedy_equals_generate_and_stream_concatenates(server, offline):
    client = _client(server)
    for prompt in PROMPTS:
        ref, new = _offline_text(offline, prompt, 10)
        res = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0)
        assert res.choices[0].text == ref and res.choices[0].finish_reason == "length"
        assert res.usage.completion_tokens == 10 and res.usage.prompt_tokens == len(offline[2](prompt)["input_ids"])
        chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True))
        assert len(chunks) > 2
        assert "".join(c.choices[0].text for c in chunks) == ref
        assert chunks[-1].choices[0].finish_reason == "length"
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # token ids, a list of prompts (choices in order), echo, n > 1 greedy (copies)
    ids = offline[2]("The cat sat on")["input_ids"]
    ids2 = offline[2](PROMPTS[0])["input_ids"]
    res = client.completions.create(model=NAME, prompt=[ids, ids2], max_tokens=10, temperature=0, n=2, echo=True)
    refs = [_offline_text(offline, ids, 10)[0], _offline_text(offline, ids2, 10)[0]]
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    assert [c.text for c in res.choices] == ["The cat sat on" + refs[0]] * 2 + [PROMPTS[0] + refs[1]] * 2
    res = client.completions.create(model=NAME, prompt=PROMPTS[:2], max_tokens=10, temperature=0)
    assert [c.text for c in res.choices] == [_offline_text(offline, p, 10)[0] for p in PROMPTS[:2]]
    # a stop string: the text ends before it, finish_reason "stop"
    ref = _offline_text(offline, PROMPTS[2], 10)[0]
    stop = ref[len(ref) // 2: len(ref) // 2 + 3]
    res = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=10, temperature=0, stop=[stop])
    assert res.choices[0].text == ref[: ref.find(stop)] and res.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=10, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == res.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_equals_generate(server, offline):
    client = _client(server)
    for seed in (3, 11):
        ref, _ = _offline_text(offline, PROMPTS[1], 10, do_sample=True, temperature=0.8, seed=seed)
        res = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=10, temperature=0.8, seed=seed)
        assert res.choices[0].text == ref
    # n > 1 sampled: row r of the request is generate's row r (fold_in(key(seed), r))
    config, params, tok = offline
    out = gptj_jax.generate(config, params, [tok(PROMPTS[0])["input_ids"]], max_new_tokens=10, do_sample=True,
                            temperature=0.8, seed=5, num_return_sequences=3, tokenizer=tok)
    refs = [tok.decode(out.new_tokens[r, : out.num_new_tokens[r]].tolist(), skip_special_tokens=True) for r in range(3)]
    res = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=10, temperature=0.8, seed=5, n=3)
    assert [c.text for c in res.choices] == refs and len(set(refs)) > 1


def test_echo_logprobs_equal_score(server, offline):
    """lm-eval's local-completions request: token ids, max_tokens 1, logprobs 1, echo, temperature 0. The
    echoed tokens' log-probs are gptj_jax.score's; lm-eval's is_greedy rule on top_logprobs agrees with score.
    A prompt may fill the whole context (lm-eval's rolling windows)."""
    config, params, tok = offline
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, 50257, 8).tolist(), rng.randint(0, 50257, CFG.n_positions).tolist()]
    res = _client(server).completions.create(model=NAME, prompt=prompts, max_tokens=1, logprobs=1, echo=True,
                                             temperature=0)
    assert len(res.choices) == 2 and res.usage.completion_tokens == 2
    for ids, choice in zip(prompts, res.choices):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert choice.text.startswith(tok.decode(ids)) and choice.finish_reason == "length"
        (whole,) = gptj_jax.score(config, params, [(ids[:1], ids[1:])])
        np.testing.assert_array_equal(np.float32(lp.token_logprobs[1:-1]), whole.logprobs)  # score's values
        ctxlen = len(ids) // 2  # lm-eval: token_logprobs[ctxlen:-1], is_greedy from top_logprobs
        (ref,) = gptj_jax.score(config, params, [(ids[:ctxlen], ids[ctxlen:])])
        got = lp.token_logprobs[ctxlen:-1]
        np.testing.assert_allclose(got, ref.logprobs, rtol=0, atol=2e-5)
        assert all(t == max(top.values()) for t, top in zip(got, lp.top_logprobs[ctxlen:-1])) == ref.is_greedy
        assert not ref.is_greedy  # random ids
    # a continuation made of greedy tokens is greedy by both rules (max_tokens 0: nothing generated)
    ids = prompts[0][:4]
    _, new = _offline_text(offline, ids, 4)
    res = _client(server).completions.create(model=NAME, prompt=[ids + new], max_tokens=0, logprobs=1, echo=True,
                                             temperature=0)
    lp = res.choices[0].logprobs
    assert len(lp.token_logprobs) == 8 and res.usage.completion_tokens == 0
    (ref,) = gptj_jax.score(config, params, [(ids, new)])
    np.testing.assert_array_equal(np.float32(lp.token_logprobs[4:]), ref.logprobs)
    assert ref.is_greedy and all(t == max(top.values()) for t, top in zip(lp.token_logprobs[4:], lp.top_logprobs[4:]))
    # logprobs of generated tokens: score of (prompt, completion), top-3 alternatives, the greedy one first
    res = _client(server).completions.create(model=NAME, prompt=ids, max_tokens=4, logprobs=3, temperature=0)
    lp = res.choices[0].logprobs
    np.testing.assert_array_equal(np.float32(lp.token_logprobs), ref.logprobs)
    assert all(len(top) == 3 and max(top.values()) == t for top, t in zip(lp.top_logprobs, lp.token_logprobs))
    assert "".join(lp.tokens) == res.choices[0].text == tok.decode(new)


# ============================================================================ concurrency
def test_32_concurrent_clients(server, offline):
    """32 threads x 4 requests (greedy and seeded sampling, streamed and not): all succeed, each equals its
    offline run; the 8 slots are reused (slot assignments > max_slots) and all free at the end."""
    config, params, tok = offline
    before = _metrics(server)
    rng = np.random.RandomState(1)
    jobs = []  # (client, request index, ids, sampled?, stream?)
    for c in range(32):
        for k in range(4):
            ids = rng.randint(0, 50257, int(rng.randint(3, 8))).tolist()
            jobs.append((c, k, ids, (c + k) % 2 == 1, k == 3))
    results, errors = {}, []

    def client_thread(c: int) -> None:
        client = _client(server)
        try:
            for c_, k, ids, sampled, stream in jobs:
                if c_ != c:
                    continue
                kw = dict(temperature=0.9, seed=1000 + 4 * c + k) if sampled else dict(temperature=0)
                if stream:
                    text = "".join(ch.choices[0].text for ch in client.completions.create(
                        model=NAME, prompt=ids, max_tokens=10, stream=True, **kw))
                else:
                    text = client.completions.create(model=NAME, prompt=ids, max_tokens=10, **kw).choices[0].text
                results[(c, k)] = text
        except Exception as e:  # reported below
            errors.append(f"client {c}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    assert len(results) == 128
    for c, k, ids, sampled, _ in jobs:
        kw = dict(do_sample=True, temperature=0.9, seed=1000 + 4 * c + k) if sampled else {}
        assert results[(c, k)] == _offline_text(offline, ids, 10, **kw)[0], (c, k)
    after = _metrics(server)
    assigned = after["gptj_jax_slot_assignments_total"] - before["gptj_jax_slot_assignments_total"]
    assert assigned == 128 > SLOTS
    assert after["gptj_jax_busy_slots"] == 0 and after["gptj_jax_queue_depth"] == 0
    assert after['gptj_jax_requests_total{endpoint="/v1/completions",status="200"}'] - before.get(
        'gptj_jax_requests_total{endpoint="/v1/completions",status="200"}', 0) == 128
    assert after["gptj_jax_decode_step_seconds"] > 0


def test_disconnect_mid_stream_frees_slot(server, offline):
    """A client that leaves mid-stream: its request is cancelled (its slot back within a few steps) while
    another stream goes on to its full, correct text."""
    before = _metrics(server)
    body = {"model": NAME, "max_tokens": 100, "temperature": 0, "stream": True, "ignore_eos": True}
    other_text = []

    def other() -> None:
        with httpx.stream("POST", server["url"] + "/v1/completions", json={**body, "prompt": PROMPTS[3]},
                          timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    other_text.append(json.loads(line[6:])["choices"][0]["text"])

    t = threading.Thread(target=other)
    t.start()
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", server["url"] + "/v1/completions", json={**body, "prompt": PROMPTS[0]}) as r:
            assert r.status_code == 200
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: {")
                if events == 2:
                    break  # leave: the connection closes with the stream
    deadline = time.monotonic() + 30
    while True:
        m = _metrics(server)
        if m["gptj_jax_busy_slots"] == 0 and not t.is_alive():
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    t.join()
    cancelled = m.get('gptj_jax_cancelled_total{reason="disconnect"}', 0) - before.get(
        'gptj_jax_cancelled_total{reason="disconnect"}', 0)
    assert cancelled == 1
    assert m["gptj_jax_generation_tokens_total"] - before["gptj_jax_generation_tokens_total"] < 2 * 100
    assert "".join(other_text) == _offline_text(offline, PROMPTS[3], 100, eos_token_id=[])[0]


# ============================================================================ limits and bad input
def test_queue_full_is_429(server):
    """One request of 48 prompts: 8 take the slots, 32 wait, the next finds the queue full: 429 (and the
    prompts already queued are cancelled); then the server serves as before."""
    ids = [[5, 6, 7]] * 48
    r = httpx.post(server["url"] + "/v1/completions", json={"model": NAME, "prompt": ids, "max_tokens": 8},
                   timeout=60)
    assert r.status_code == 429, r.text
    err = _error(r)
    assert err["code"] == "queue_full" and err["type"] == "rate_limit_exceeded" and "max_waiting 32" in err["message"]
    deadline = time.monotonic() + 30
    while _metrics(server)["gptj_jax_queue_depth"] > 0:  # the cancelled prompts leave the queue
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ok = httpx.post(server["url"] + "/v1/completions", json={"prompt": ids[:4], "max_tokens": 8, "temperature": 0},
                    timeout=60)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4


BAD = [
    # (raw body or JSON object, status, param, message fragment)
    ('{"prompt": "hi", "max_tokens": 3', 400, None, "malformed JSON"),
    ("[1, 2]", 400, None, "must be a JSON object"),
    ({"max_tokens": 3}, 400, "prompt", "prompt: Field required"),
    ({"prompt": 5}, 400, "prompt", "prompt must be a string"),
    ({"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"prompt": "hi", "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
    ({"prompt": "hi", "logprobs": 99}, 400, "logprobs", "less than or equal to 5"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"prompt": [1, 50400, 3]}, 400, "prompt", "prompt[1] = 50400 is outside the vocabulary [0, 50400)"),
    ({"prompt": [[1, 2], [-4]]}, 400, "prompt", "prompt[1][0] = -4 is outside the vocabulary"),
    ({"prompt": [1] * 120, "max_tokens": 16}, 400, "prompt", "120 tokens + max_tokens 16 = 136 > this server's"),
    ({"prompt": []}, 400, "prompt", "prompt must be a string"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model", "The model 'gpt-4' does not exist"),
    ({"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"prompt": "hi", "frequency_penalty": 1}, 400, "frequency_penalty", "not supported"),
    ({"prompt": "hi", "use_beam_search": True}, 400, "use_beam_search", "beam search is not served"),
    ({"prompt": "hi", "best_of": 3}, 400, "best_of", "best_of 3 != n 1"),
    ({"prompt": "hi", "stop": [""]}, 400, "stop", "must not be empty"),
    ({"prompt": "hi", "n": 2, "temperature": 1.0, "max_tokens": 2, "seed": 2**64}, 400, "seed", "less than"),
    ({"prompt": "hi", "n": 9, "temperature": 0.5}, 400, "n", "9 > the server's 8 decode slots"),
    ({"prompt": "hi", "logprobs": 1, "stream": True}, 400, "logprobs", "not streamed"),
    ({"prompt": "hi", "min_tokens": 20, "max_tokens": 4}, 400, "min_tokens", "must be <= max_tokens"),
]


@pytest.mark.parametrize("body, status, param, fragment", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_request_is_openai_error(server, body, status, param, fragment):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = httpx.post(server["url"] + "/v1/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = _error(r)
    assert err["param"] == param and fragment in err["message"], err
    if "max_tokens 16 = 136" in fragment:
        assert err["code"] == "context_length_exceeded"
    # the server still serves
    ok = httpx.post(server["url"] + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2, "temperature": 0},
                    timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_bad_requests_are_counted(server):
    m = _metrics(server)
    assert m['gptj_jax_requests_total{endpoint="/v1/completions",status="400"}'] >= len(
        [b for b in BAD if b[1] == 400])
    assert m['gptj_jax_requests_total{endpoint="/v1/completions",status="429"}'] >= 1
    assert m["gptj_jax_busy_slots"] == 0 and m["gptj_jax_ready"] == 1


# ============================================================================ SIGTERM (last: stops the server)
def test_sigterm_under_load_exits_zero(server, offline):
    """SIGTERM with 24 requests in flight (6 long and 18 short, streamed and not; 8 decoding, the rest
    waiting): each either completes (its text equal to the offline run) or gets a clean error (503
    ``shutting_down``, or an error event and ``[DONE]`` on a stream); requests after the signal are refused;
    the process exits 0 within the grace period (plus uvicorn's and the interpreter's shutdown)."""
    proc, url = server["proc"], server["url"]
    outcomes, started = {}, threading.Barrier(25)
    ids = [9, 8, 7, 6]
    lengths = [100 if i % 4 == 0 else 8 for i in range(24)]

    def body(i: int) -> dict:
        return {"model": NAME, "prompt": ids, "max_tokens": lengths[i], "temperature": 0, "ignore_eos": True}

    def plain(i: int) -> None:
        started.wait()
        try:
            r = httpx.post(url + "/v1/completions", json=body(i), timeout=120)
            outcomes[i] = ("plain", r.status_code, r.json())
        except httpx.TransportError as e:
            outcomes[i] = ("transport", None, str(e))

    def streamed(i: int) -> None:
        started.wait()
        text, error, done = [], None, False
        try:
            with httpx.stream("POST", url + "/v1/completions", json={**body(i), "stream": True}, timeout=120) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            error = event["error"]
                        else:
                            text.append(event["choices"][0]["text"])
            outcomes[i] = ("stream", r.status_code, {"text": "".join(text), "error": error, "done": done})
        except httpx.TransportError as e:
            outcomes[i] = ("transport", None, str(e))

    threads = [threading.Thread(target=streamed if i % 3 == 0 else plain, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    started.wait()
    deadline = time.monotonic() + 30
    while _metrics(server)["gptj_jax_busy_slots"] < SLOTS - 2:  # the load is on
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    late = None
    try:
        late = httpx.post(url + "/v1/completions", json=body(1), timeout=10)
    except httpx.TransportError:
        pass  # already closed: refused too
    rc = proc.wait(GRACE + 30)
    elapsed = time.monotonic() - t0
    for t in threads:
        t.join(30)
    assert rc == 0, server["log"].read_text()
    assert elapsed < GRACE + 10, elapsed
    if late is not None:
        assert late.status_code == 503 and _error(late)["code"] == "shutting_down"
    refs = {n: _offline_text(offline, ids, n, eos_token_id=[])[0] for n in set(lengths)}
    finished = 0
    assert len(outcomes) == 24
    for i, (kind, status, result) in outcomes.items():
        ref = refs[lengths[i]]
        assert kind != "transport", result
        if kind == "plain" and status == 200:
            assert result["choices"][0]["text"] == ref
            finished += 1
        elif kind == "plain":
            assert status == 503 and result["error"]["code"] == "shutting_down", result
        elif result["error"] is None:
            assert status == 200 and result["done"] and result["text"] == ref
            finished += 1
        else:
            assert result["error"]["code"] == "shutting_down" and result["done"], result
            assert ref.startswith(result["text"])
    assert finished >= 1, outcomes


# ============================================================================ the verb's own errors
@pytest.mark.parametrize("args, fragment", [
    (["--model", "/no/such/model"], "--model /no/such/model"),
    (["--model", "M", "--max-slots", "0"], "--max-slots must be >= 1, got 0"),
    (["--model", "M", "--port", "70000"], "--port must be <= 65535"),
    (["--model", "M", "--max-len", "4096"], "--max-len 4096 > the model's n_positions 128"),
])
def test_cli_errors_are_one_line(model_dir, args, fragment):
    args = [model_dir if a == "M" else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "gptj_jax.cli", "serve", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("gptj-jax serve: error:") and fragment in lines[0], lines
