"""The inference engine (``gptj_jax.engine``) as users drive it through ``import gptj_jax``: continuous
batching on fewer decode slots than requests gives every request exactly the tokens it gets alone (greedy:
also Transformers' tokens; sampled: per-request seeds), slots are reused while others decode, nothing
compiles again after warm-up, no device memory growth over 200 requests, cancellation, admission control,
bad input (one clear error, the scheduler keeps serving), the background thread, and the low-level
``prefill`` / ``insert`` / ``generate`` contract.
"""

import gc
import re
import threading

import jax
import numpy as np
import pytest
import torch
from conftest import TINY, hf_model, params_of

import gptj_jax
from gptj_jax import LLM, Engine, QueueFullError, Scheduler, UnknownRequestError
from gptj_jax.generation import TRACE_COUNTS, GenerationError
from gptj_jax.sampling import SamplingError

SLOTS = 4
MAX_LEN = 48


@pytest.fixture(scope="module")
def model():
    hf = hf_model(TINY, seed=0, scale=3.0)
    return hf, params_of(hf)


def _prompt(length: int, seed: int) -> list:
    return np.random.RandomState(seed).randint(0, TINY.vocab_size, length).tolist()


# mixed prompt lengths (buckets 8, 12, 16), output lengths and knobs: greedy, sampled (each with its own
# seed), penalties, the n-gram rule, bad words, an EOS id, logprobs
KNOBS = [
    dict(),
    dict(do_sample=True, top_k=20, temperature=0.8),
    dict(repetition_penalty=1.3),
    dict(do_sample=True, top_p=0.9, logprobs=True),
    dict(no_repeat_ngram_size=2),
    dict(do_sample=True, min_p=0.05, temperature=1.2),
    dict(bad_words_ids=[[7], [8, 9]], eos_token_id=[5]),
    dict(logprobs=True),
]
LENGTHS = [3, 14, 5, 9, 7, 2, 11, 6]
NEW = [5, 12, 3, 9, 16, 7, 4, 10]


def _workload(shift: int) -> list:
    """(prompt, keywords) of the mixed workload; ``shift`` changes prompts, seeds, knob values and output
    lengths but keeps every bucket (prompt lengths, top-k bucket, which processors are on)."""
    out = []
    for i, (length, new, knobs) in enumerate(zip(LENGTHS, NEW, KNOBS)):
        kw = dict(knobs, max_new_tokens=new - shift % 3, seed=100 * shift + i)
        if "temperature" in kw:
            kw["temperature"] += 0.03 * shift
        if "top_k" in kw:
            kw["top_k"] -= shift
        out.append((_prompt(length, 1000 * shift + i), kw))
    return out


def _alone(params, prompt, kw):
    """The request run on its own by ``gptj_jax.generate`` -> (new tokens, logprobs or None)."""
    out = gptj_jax.generate(TINY, params, [prompt], **kw)
    n = int(out.num_new_tokens[0])
    return out.new_tokens[0, :n].tolist(), None if out.logprobs is None else out.logprobs[0, :n]


def _engine_programs():
    from gptj_jax import engine

    return (engine._init_state_fn, engine._prefill_fn, engine._first_token_fn, engine._insert_fn, engine._step_fn)


def test_continuous_batching_equals_each_request_alone_and_reuses_slots(model):
    """8 requests on 4 slots: every result equals the request alone (greedy ones also equal Transformers'
    greedy generate); slots are refilled while other requests still decode; after warm-up a second workload
    with the same buckets (other prompts, values, seeds, lengths) compiles nothing."""
    hf, params = model
    llm = LLM(TINY, params, max_slots=SLOTS, max_len=MAX_LEN)
    work = _workload(0)
    handles = [llm.submit(p, **kw) for p, kw in work]
    outputs = llm.run_until_idle()
    assert sorted(o.id for o in outputs) == [h.id for h in handles]
    for h, (prompt, kw) in zip(handles, work):
        out = h.result()
        tokens, logprobs = _alone(params, prompt, kw)
        assert out.token_ids == [tokens], (kw, out.token_ids, tokens)
        assert len(tokens) == kw["max_new_tokens"] or out.finish_reasons == ["eos"]
        if kw.get("logprobs"):
            np.testing.assert_allclose(out.logprobs[0], logprobs, atol=1e-5)
        if set(kw) <= {"max_new_tokens", "seed", "logprobs"}:  # plain greedy: Transformers' tokens
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=kw["max_new_tokens"],
                              pad_token_id=0).numpy()[0, len(prompt):]
            assert tokens == ref.tolist()
    # every slot was used, and requests were admitted into freed slots while others were still decoding
    outs = [h.result() for h in handles]
    assert sorted({s for o in outs for s in o.slots}) == list(range(SLOTS))
    late = [o for o in outs if o.admitted_step > 0]
    assert len(late) == len(work) - SLOTS
    assert all(any(e.admitted_step < o.admitted_step < e.finished_step for e in outs) for o in late)

    # no compilation after warm-up
    before, sizes = dict(TRACE_COUNTS), [f._cache_size() for f in _engine_programs()]
    for shift in (1, 2):
        handles = [llm.submit(p, **kw) for p, kw in _workload(shift)]
        llm.run_until_idle()
        assert all(h.result().finish_reasons[0] in ("length", "eos") for h in handles)
    assert dict(TRACE_COUNTS) == before
    assert [f._cache_size() for f in _engine_programs()] == sizes
    # ... and the results still equal the requests alone
    for h, (prompt, kw) in zip(handles, _workload(2)):
        assert h.result().token_ids == [_alone(params, prompt, kw)[0]]


def test_num_return_sequences_take_several_slots(model):
    _, params = model
    llm = LLM(TINY, params, max_slots=SLOTS, max_len=MAX_LEN)
    kw = dict(max_new_tokens=6, do_sample=True, top_k=10, num_return_sequences=3, seed=4)
    prompts = [_prompt(5, 1), _prompt(8, 2)]
    outs = llm.generate(prompts, **kw)
    for prompt, out in zip(prompts, outs):
        ref = gptj_jax.generate(TINY, params, [prompt], **kw)
        assert out.token_ids == ref.new_tokens[:, :6].tolist() and len(out.slots) == 3


def test_no_device_memory_growth_over_200_requests(model):
    """The decode state is allocated once: the number of live device arrays after 200 more requests is the
    number after warm-up."""
    _, params = model
    llm = LLM(TINY, params, max_slots=SLOTS, max_len=32)

    def batch(start: int, n: int) -> None:
        for i in range(start, start + n):
            llm.submit(_prompt(2 + i % 6, i), max_new_tokens=1 + i % 4, seed=i)
        assert len(llm.run_until_idle()) == n

    batch(0, 20)
    gc.collect()
    live = len(jax.live_arrays())
    for start in range(20, 220, 40):
        batch(start, 40)
    gc.collect()
    assert len(jax.live_arrays()) == live


def test_cancel_frees_the_slot(model):
    _, params = model
    llm = LLM(TINY, params, max_slots=2, max_len=MAX_LEN)
    long = [llm.submit(_prompt(4, i), max_new_tokens=40) for i in range(2)]
    waiting = llm.submit(_prompt(3, 7), max_new_tokens=4)
    never = llm.submit(_prompt(3, 8), max_new_tokens=4)
    for _ in range(3):
        llm.step()
    assert (llm.num_busy_slots, llm.num_waiting, llm.num_live) == (2, 2, 4)
    assert llm.cancel(long[0].id) is True
    assert never.cancel() is True  # a waiting request never starts
    llm.run_until_idle()
    assert (llm.num_busy_slots, llm.num_waiting, llm.num_live) == (0, 0, 0)
    cancelled = long[0].result()
    assert cancelled.finish_reasons == ["cancelled"] and 0 < len(cancelled.token_ids[0]) < 40
    assert never.result().finish_reasons == ["cancelled"] and never.result().token_ids == [[]]
    # the freed slot took the waiting request while the other long one was still decoding
    out = waiting.result()
    assert out.slots == cancelled.slots and out.admitted_step < long[1].result().finished_step
    assert out.token_ids == [_alone(params, _prompt(3, 7), dict(max_new_tokens=4))[0]]
    assert long[1].result().token_ids == [_alone(params, _prompt(4, 1), dict(max_new_tokens=40))[0]]
    assert llm.cancel(waiting.id) is False  # already finished
    with pytest.raises(UnknownRequestError, match=r"unknown request id 99: no request with this id was submitted"):
        llm.cancel(99)


def test_admission_control(model):
    _, params = model
    llm = LLM(TINY, params, max_slots=2, max_len=MAX_LEN, max_waiting=3)
    handles = [llm.submit([1, 2, 3], max_new_tokens=2) for _ in range(3)]
    with pytest.raises(QueueFullError, match=r"3 requests are waiting \(max_waiting 3\); retry later"):
        llm.submit([1, 2, 3], max_new_tokens=2)
    llm.step()  # two are admitted: room again
    llm.submit([1, 2, 3], max_new_tokens=2)
    llm.run_until_idle()
    assert all(h.result().finish_reasons == ["length"] for h in handles)


@pytest.mark.parametrize(
    "prompt, kw, error, match",
    [
        (list(range(40)), dict(max_new_tokens=9), GenerationError,
         "prompt too long for the cache: 40 tokens + max_new_tokens 9 = 49 > the engine's max_len 48"),
        ([], dict(max_new_tokens=3), GenerationError, "empty prompt"),
        ([1, 101, 2], dict(max_new_tokens=3), GenerationError, "prompt token id 101 is outside the vocabulary [0, 101)"),
        ([-1, 2], dict(max_new_tokens=3), GenerationError, "prompt token id -1 is outside the vocabulary"),
        ([1, 2], dict(max_new_tokens=3, temprature=0.5), GenerationError,
         "unknown generation option 'temprature' (did you mean 'temperature'?)"),
        ([1, 2], dict(max_new_tokens=3, top_p=1.5), SamplingError, "top_p must be in (0, 1], got 1.5"),
        ([1, 2], dict(max_new_tokens=3, num_beams=2, do_sample=True), GenerationError, "num_beams 2 with do_sample"),
        ([1, 2], dict(max_new_tokens=3, num_beams=2), GenerationError, "num_beams 2: beam search is not served"),
        ([1, 2], dict(), GenerationError, "max_new_tokens is not set"),
        ([1, 2], dict(max_new_tokens=3, eos_token_id=[500]), GenerationError, "eos_token_id"),
        ([1, 2], dict(max_new_tokens=3, stop_strings=["x"]), GenerationError, "stop_strings need a tokenizer"),
    ],
)
def test_bad_input_one_clear_error_and_the_scheduler_keeps_serving(model, prompt, kw, error, match):
    _, params = model
    llm = _shared_llm(params)
    ok = llm.submit([1, 2, 3], max_new_tokens=5)
    with pytest.raises(error, match=re.escape(match)):
        llm.submit(prompt, **kw)
    assert llm.num_waiting == 1
    assert ok.result().token_ids == [_alone(params, [1, 2, 3], dict(max_new_tokens=5))[0]]


_LLM = {}


def _shared_llm(params):
    if "llm" not in _LLM:
        _LLM["llm"] = LLM(TINY, params, max_slots=2, max_len=MAX_LEN)
    return _LLM["llm"]


def test_bad_engine_arguments(model):
    _, params = model
    with pytest.raises(GenerationError, match="max_slots must be an integer >= 1, got 0"):
        Engine(TINY, params, max_slots=0, max_len=16)
    with pytest.raises(GenerationError, match="max_waiting must be an integer >= 1, got 0"):
        LLM(TINY, params, max_slots=1, max_len=16, max_waiting=0)
    with pytest.raises(GenerationError, match="engine must be an Engine"):
        Scheduler(object())


def test_background_thread(model):
    """start(): submit from several threads, results, streaming (iterator and callback), cancel; stop():
    new requests are refused; start() again serves again."""
    _, params = model
    llm = LLM(TINY, params, max_slots=SLOTS, max_len=MAX_LEN)
    llm.start()
    try:
        work = _workload(3)
        handles = {}

        def submit(part):
            for i in part:
                handles[i] = llm.submit(work[i][0], **work[i][1])

        threads = [threading.Thread(target=submit, args=(range(k, len(work), 2),)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        chunks = []
        streamed = llm.submit(_prompt(6, 5), max_new_tokens=11, stream=True)
        called = llm.submit(_prompt(6, 6), max_new_tokens=9, callback=chunks.append)
        long = llm.submit(_prompt(4, 9), max_new_tokens=40)
        for i, (prompt, kw) in enumerate(work):
            assert handles[i].result(timeout=120).token_ids == [_alone(params, prompt, kw)[0]]
        got = []
        for chunk in streamed:
            got.extend(chunk.tokens[0])
        assert chunk.output is not None and [got] == chunk.output.token_ids
        assert got == _alone(params, _prompt(6, 5), dict(max_new_tokens=11))[0]
        called.result(timeout=120)
        assert chunks[-1].output is called.output
        assert [t for c in chunks for t in c.tokens[0]] == called.output.token_ids[0]
        long.cancel()
        assert long.result(timeout=120).finish_reasons[0] in ("cancelled", "length")
    finally:
        llm.stop()
    assert not llm.running
    with pytest.raises(gptj_jax.engine.SchedulerStoppedError, match="the scheduler is stopped"):
        llm.submit([1, 2], max_new_tokens=2)
    with pytest.raises(RuntimeError, match="not running"):
        llm.stop()
    llm.start()
    try:
        assert llm.submit([1, 2], max_new_tokens=3).result(timeout=120).num_new_tokens == [3]
    finally:
        llm.stop(grace=30)


def test_engine_prefill_insert_generate(model):
    """JetStream's contract: prefill -> insert into any slot -> generate steps; the tokens equal generate()."""
    _, params = model
    engine = Engine(TINY, params, max_slots=3, max_len=32)
    state = engine.init_decode_state()
    prompts = [_prompt(5, 1), _prompt(9, 2)]
    plan = engine.plan(max_new_tokens=6)
    for slot, prompt in zip((2, 0), prompts):
        prefix = engine.prefill(engine.params, prompt, None, plan)
        state = engine.insert(prefix, state, slot)
    got = {0: [int(prefix.tokens[0])], 2: []}
    first = engine.prefill(engine.params, prompts[0], None, plan)
    got[2].append(int(first.tokens[0]))
    for _ in range(5):
        state, result = engine.generate(engine.params, Engine.with_spec(state, [plan.spec]))
        valid = np.asarray(result.valid)
        assert valid.tolist() == [True, False, True]
        for s in (0, 2):
            got[s].append(int(result.tokens[s]))
    assert not np.asarray(state.active).any()  # both rows ended by max_new_tokens
    for slot, prompt in zip((2, 0), prompts):
        assert got[slot] == _alone(params, prompt, dict(max_new_tokens=6))[0]
    with pytest.raises(GenerationError, match=r"slot 3: 1 rows do not fit slots \[0, 3\)"):
        engine.insert(first, state, 3)


MESH_SCRIPT = """
import sys, json
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import jax
jax.config.update("jax_num_cpu_devices", 4)
from conftest import hf_model, params_of
import gptj_jax
from gptj_jax import LLM, GPTJConfig
from gptj_jax.sharding import make_mesh
cfg = GPTJConfig(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
params = params_of(hf_model(cfg, seed=0, scale=3.0))
prompts = [[5, 6, 7], [9] * 11, [1, 2, 3, 4, 5, 6], [3, 1], [8, 8, 9, 10, 11]]
kws = [dict(max_new_tokens=6 + 2 * i, seed=i, **(dict(do_sample=True, top_k=10) if i % 2 else {{}}))
       for i in range(len(prompts))]
llm = LLM(cfg, params, max_slots=2, max_len=32, mesh=make_mesh(dp=2, mp=2))
handles = [llm.submit(p, **kw) for p, kw in zip(prompts, kws)]
llm.run_until_idle()
alone = [gptj_jax.generate(cfg, params, [p], **kw) for p, kw in zip(prompts, kws)]
print(json.dumps({{"mesh": [h.result().token_ids[0] for h in handles],
                   "alone": [a.new_tokens[0, : a.num_new_tokens[0]].tolist() for a in alone],
                   "kv": str(llm.state.cache["layers"][0]["k"].sharding.spec)}}))
"""


@pytest.mark.slow
def test_scheduler_on_a_mesh_equals_one_device():
    """Slots over dp, heads over mp (4 simulated devices): 5 requests on 2 slots give the one-device
    tokens of each request alone, and the decode state's K/V is sharded as cache_shardings says."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = MESH_SCRIPT.format(repo=repo, tests=os.path.join(repo, "tests"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["mesh"] == res["alone"]
    assert res["kv"] == "P('dp', 'mp')", res["kv"]  # [slots, heads, S, H]: slots over dp, heads over mp
