"""lm-evaluation-harness: the ``gptj-jax`` adapter (``gptj_jax.eval_harness.GPTJLM``) against lm-eval's own
Hugging Face backend (``HFLM``) on the same tiny random GPT-J saved by transformers, on three small local
tasks written here (multiple choice, rolling perplexity with documents longer than the 64-token window,
``generate_until`` with stop strings and a context cut on the left): every per-request log-likelihood within
1e-4, ``is_greedy`` and generations identical, metrics equal. Also the ``gptj-jax lm-eval`` CLI as a
subprocess, training with ``eval_harness_tasks``, and the same tasks through lm-eval's ``local-completions``
model against ``gptj-jax serve``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import lm_eval
import numpy as np
import pytest
from conftest import hf_model
from lm_eval.models.huggingface import HFLM

import gptj_jax
from gptj_jax import GPTJConfig
from gptj_jax.eval_harness import GPTJLM, EvalHarnessError, flat_metrics, format_results, task_manager
from gptj_jax.tokenizer import save_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# vocab 50400: GPT-J's tokenizer fits; n_positions 64: rolling documents and long contexts exceed one window
WIDE = GPTJConfig(vocab_size=50400, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
BATCH = 4
MAX_GEN = 16
TASKS = ("gx_mc", "gx_ppl", "gx_gen")

FOX = "The quick brown fox jumps over the lazy dog. "
MC_DOCS = [
    {"question": "What is the capital of France?", "choices": [" Paris", " London", " Berlin", " a town on a river"],
     "label": 0},
    {"question": "Two plus two is", "choices": [" four", " five", " twenty two"], "label": 1},
    {"question": FOX * 8 + "Then the fox", "choices": [" ran", " slept soundly"], "label": 1},  # 80+ tokens: cut
    {"question": "", "choices": ["Yes", "No"], "label": 0},  # empty context: the prefix token
    {"question": "Colours: red, green,", "choices": [" blue", " yellow", " purple and orange"], "label": 2},
]
PPL_DOCS = [
    {"text": "A short document."},
    {"text": FOX * 7},  # ~70 tokens: two windows
    {"text": " ".join(f"Sentence number {i} talks about the weather in town." for i in range(14))},  # 3+ windows
]
GEN_PROMPTS = ["Once upon a time", "The meaning of life is", FOX * 7 + "And so", "Q: What is 2+2?\nA:", "Hello"]


# ============================================================================ fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny random GPT-J saved by transformers (float32) with GPT-J's tokenizer files."""
    path = tmp_path_factory.mktemp("tiny-gptj")
    hf_model(WIDE, seed=0, scale=3.0).save_pretrained(path)  # scaled: varied greedy text, no near-ties
    save_tokenizer(path)
    return str(path)


@pytest.fixture(scope="module")
def model(model_dir):
    config, params = gptj_jax.load(model_dir)
    return config, params, gptj_jax.load_tokenizer(model_dir)


def _free_generation(model, prompt: str) -> str:
    """The greedy continuation (MAX_GEN tokens, EOS on, no suppression) of the task's prompt, as text."""
    config, params, tok = model
    ids = tok(prompt)["input_ids"][-(WIDE.n_positions - MAX_GEN):]
    out = gptj_jax.generate(config, params, [ids], max_new_tokens=MAX_GEN, suppress_extra_tokens=False, tokenizer=tok)
    return tok.decode(out.new_tokens[0, : out.num_new_tokens[0]].tolist(), skip_special_tokens=True)


def _stop_inside(text: str) -> str:
    """A 2-character piece of ``text`` first seen near its middle (so a stop string cuts it there)."""
    for k in range(len(text) // 3, len(text) - 2):
        piece = text[k: k + 2]
        if piece.strip() and piece not in text[:k]:
            return piece
    raise AssertionError(f"no stop string found in {text!r}")


def _greedy_choice(model, question: str) -> str:
    """A one-token continuation of ``question`` that is the model's argmax there (so is_greedy is True)."""
    config, params, tok = model
    ids = tok(question)["input_ids"]
    out = gptj_jax.generate(config, params, [ids], max_new_tokens=1, suppress_extra_tokens=False, eos_token_id=[],
                            tokenizer=tok)
    choice = tok.decode(out.new_tokens[0].tolist())
    assert tok(question + choice)["input_ids"][len(ids):] == out.new_tokens[0].tolist()  # re-encodes the same
    return choice


def _write_task(directory, name: str, rows: list, body: str) -> None:
    data = os.path.join(directory, f"{name}.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    header = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    with open(os.path.join(directory, f"{name}.yaml"), "w", encoding="utf-8") as f:
        f.write(header + body)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, model):
    """The three local tasks. The generation task's stop strings are pieces of two prompts' free greedy
    continuations (so the stop strings really cut them), and one target is the expected cut text."""
    path = str(tmp_path_factory.mktemp("tasks"))
    mc = [dict(d) for d in MC_DOCS]
    mc[1]["choices"] = mc[1]["choices"] + [_greedy_choice(model, mc[1]["question"])]
    _write_task(path, "gx_mc", mc, """output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{question}}"
doc_to_target: "{{label}}"
doc_to_choice: "{{choices}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    _write_task(path, "gx_ppl", PPL_DOCS, """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    free = [_free_generation(model, p) for p in GEN_PROMPTS]
    stops = [_stop_inside(free[0]), _stop_inside(free[2])]
    cut = free[0]
    for s in stops + ["\n"]:
        cut = cut.split(s)[0]
    rows = [{"prompt": p, "answer": cut if i == 0 else "never"} for i, p in enumerate(GEN_PROMPTS)]
    until = json.dumps(stops + ["\n"])
    _write_task(path, "gx_gen", rows, f"""output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {until}
  max_gen_toks: {MAX_GEN}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    with open(os.path.join(path, "free.json"), "w", encoding="utf-8") as f:
        json.dump({"free": free, "stops": stops, "cut": cut}, f)
    return path


@pytest.fixture(scope="module")
def manager(tasks_dir):
    return task_manager(tasks_dir)


def _evaluate(lm, manager, tasks=TASKS, **kw) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, log_samples=True, **kw)


@pytest.fixture(scope="module")
def runs(model_dir, manager):
    """(ours, lm-eval's HF backend): lm-eval's results dicts, samples logged, float32, batch size 4."""
    ours = _evaluate(GPTJLM(model=model_dir, batch_size=BATCH, dtype="float32"), manager)
    ref = _evaluate(HFLM(pretrained=model_dir, dtype="float32", batch_size=BATCH, device="cpu"), manager)
    return ours, ref


def _pairs(ours: dict, ref: dict, task: str) -> list:
    a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
    b = sorted(ref["samples"][task], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b] and len(a) > 0
    for x, y in zip(a, b):
        assert [r["arguments"] for r in [x]] == [r["arguments"] for r in [y]]  # the same requests
    return list(zip(a, b))


# ============================================================================ parity with HFLM
def test_loglikelihood_parity_multiple_choice(runs):
    """Every (context, choice) request: log-likelihood within 1e-4 of HFLM's, is_greedy identical (both
    outcomes occur), including an 80-token context cut on the left and an empty context; acc / acc_norm equal."""
    ours, ref = runs
    greedy, n = [], 0
    for a, b in _pairs(ours, ref, "gx_mc"):
        assert len(a["resps"]) == len(b["resps"]) == len(a["arguments"])
        for (ll_a, g_a), (ll_b, g_b) in zip((r[0] for r in a["resps"]), (r[0] for r in b["resps"])):
            assert abs(ll_a - ll_b) <= 1e-4, (a["doc_id"], ll_a, ll_b)
            assert g_a == g_b
            greedy.append(g_a)
            n += 1
    assert n == sum(len(d["choices"]) for d in MC_DOCS) + 1
    assert True in greedy and False in greedy
    for metric in ("acc,none", "acc_norm,none", "acc_stderr,none"):
        assert ours["results"]["gx_mc"][metric] == ref["results"]["gx_mc"][metric]


def test_rolling_parity(runs, model):
    """loglikelihood_rolling: documents of 1, 2 and 3+ windows of 64 tokens; each within 1e-4 of HFLM's;
    word / byte perplexity and bits per byte equal to 1e-6."""
    ours, ref = runs
    tok = model[2]
    lengths = [len(tok(d["text"])["input_ids"]) for d in PPL_DOCS]
    assert lengths[0] < 64 < lengths[1] <= 128 < lengths[2], lengths
    for a, b in _pairs(ours, ref, "gx_ppl"):
        ll_a, ll_b = a["resps"][0][0], b["resps"][0][0]
        assert abs(ll_a - ll_b) <= 1e-4, (a["doc_id"], ll_a, ll_b)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["gx_ppl"][metric] == pytest.approx(ref["results"]["gx_ppl"][metric], rel=1e-6)


def test_generate_until_parity(runs, tasks_dir):
    """generate_until: identical texts; the stop strings cut two generations, a 70-token context is cut on the
    left to max_length - max_gen_toks; exact_match equal (1 of 5: doc 0's target is its expected cut text)."""
    ours, ref = runs
    with open(os.path.join(tasks_dir, "free.json"), encoding="utf-8") as f:
        free = json.load(f)
    texts = []
    for a, b in _pairs(ours, ref, "gx_gen"):
        assert a["resps"] == b["resps"], (a["doc_id"], a["resps"], b["resps"])
        texts.append(a["resps"][0][0])
    assert texts[0] == free["cut"] and len(texts[0]) < len(free["free"][0])
    assert free["stops"][1] not in texts[2] and len(texts[2]) < len(free["free"][2])
    assert ours["results"]["gx_gen"]["exact_match,none"] == ref["results"]["gx_gen"]["exact_match,none"] == 0.2


# ============================================================================ the CLI
def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "gptj_jax.cli", "lm-eval", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_cli_prints_lm_evals_table(runs, model_dir, tasks_dir, tmp_path):
    """`gptj-jax lm-eval` as a subprocess prints lm-eval's table with the in-process adapter's numbers and
    writes the results JSON (and samples) into --output-path."""
    ours, _ = runs
    out = tmp_path / "out"
    proc = _cli("--model", model_dir, "--tasks", "gx_mc,gx_ppl", "--include-path", tasks_dir, "--batch-size",
                str(BATCH), "--dtype", "float32", "--output-path", str(out), "--log-samples")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    header = table.splitlines()[0].replace(" ", "")
    assert header.startswith("|Tasks|Version|Filter|n-shot|Metric|") and "Value" in header, table
    for task, metric in (("gx_mc", "acc,none"), ("gx_mc", "acc_norm,none"), ("gx_ppl", "word_perplexity,none")):
        assert f"{ours['results'][task][metric]:.4f}" in table, (task, metric, table)
    rows = [line for line in table.splitlines() if line.startswith("|gx_")]
    assert [r.split("|")[1].strip() for r in rows] == ["gx_mc", "gx_ppl"], table
    written = sorted(os.listdir(out))
    assert len(written) == 3 and written[0].startswith("results_") and all(".tmp" not in w for w in written), written
    saved = json.loads((out / written[0]).read_text())
    assert saved["results"]["gx_mc"]["acc,none"] == ours["results"]["gx_mc"]["acc,none"]
    lines = (out / next(w for w in written if w.startswith("samples_gx_ppl"))).read_text().splitlines()
    assert len(lines) == len(PPL_DOCS)


def test_cli_unknown_task_is_one_error_line(model_dir, tasks_dir):
    proc = _cli("--model", model_dir, "--tasks", "gx_mc,gx_nope", "--include-path", tasks_dir)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("gptj-jax lm-eval: error:") and "gx_nope" in lines[-1] and "gx_mc" not in lines[-1]
    proc = _cli("--model", model_dir, "--tasks", "gx_mc", "--include-path", os.path.join(tasks_dir, "missing"))
    assert proc.returncode == 1 and "include path" in proc.stderr and "missing" in proc.stderr


# ============================================================================ adapter arguments
def test_bad_arguments(model, model_dir, manager):
    config, params, tok = model
    with pytest.raises(EvalHarnessError, match="batch_size must be an integer >= 1"):
        GPTJLM(config=config, params=params, tokenizer=tok, batch_size=0)
    with pytest.raises(EvalHarnessError, match="either model=SOURCE"):
        GPTJLM(model=model_dir, config=config, params=params)
    with pytest.raises(EvalHarnessError, match="max_length 65 > the model's n_positions 64"):
        GPTJLM(config=config, params=params, tokenizer=tok, max_length=65)
    small = GPTJConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
    with pytest.raises(EvalHarnessError, match="tokenizer has 50400 tokens but the model's vocab_size is 101"):
        GPTJLM(config=small, params=params, tokenizer=tok)
    lm = GPTJLM(config=config, params=params, tokenizer=tok, max_gen_toks=64)  # >= max_length 64
    with pytest.raises(EvalHarnessError, match="max_gen_toks 64 must be less than max_length 64"):
        lm_eval.simple_evaluate(model=lm, tasks=["gx_gen"], task_manager=manager, gen_kwargs="max_gen_toks=64",
                                limit=1)


def test_in_memory_model_and_flat_metrics(runs, model, manager):
    """The adapter on (config, params, tokenizer) in memory (as training uses it) gives the same results;
    flat_metrics names them harness_<task>_<metric>."""
    ours, _ = runs
    config, params, tok = model
    res = _evaluate(GPTJLM(config=config, params=params, tokenizer=tok, batch_size=3), manager, tasks=("gx_mc",))
    for a, b in zip(res["samples"]["gx_mc"], ours["samples"]["gx_mc"]):
        np.testing.assert_allclose([r[0][0] for r in a["resps"]], [r[0][0] for r in b["resps"]], rtol=0, atol=1e-5)
    flat = flat_metrics(res)
    assert flat == {"harness_gx_mc_acc": res["results"]["gx_mc"]["acc,none"],
                    "harness_gx_mc_acc_norm": res["results"]["gx_mc"]["acc_norm,none"]}
    assert "gx_mc" in format_results(res)


# ============================================================================ training
def test_training_writes_harness_rows(tmp_path, tasks_dir):
    """eval_harness_tasks run every val_every steps on the current params: rows at steps 2 and 4 with the
    tasks' metrics; the step-4 row equals the adapter on the final params."""
    from gptj_jax.train.config import load_train_config
    from gptj_jax.train.data import write_records
    from gptj_jax.train.loop import train

    rng = np.random.RandomState(0)
    rows = (rng.randint(0, 128, (32, 1)) + np.arange(17)[None, :]) % 128
    write_records(str(tmp_path / "data"), rows, num_bytes=32 * 17 * 3)
    cfg = load_train_config(None, [
        "layers=2", "d_model=32", "n_heads=4", "n_vocab=50400", "pe_rotary_dims=4", "n_positions=64", "seq=16",
        "dtype=float32", "progress=false", "peak_flops=1e11", f"train_set={tmp_path / 'data'}",
        f"model_dir={tmp_path / 'run'}", "total_steps=4", "per_replica_batch=4", "lr=1e-3", "val_every=2",
        "ckpt_every=100", "eval_harness_tasks=[gx_mc, gx_ppl]", "eval_harness_limit=3",
        f"eval_harness_include_path={tasks_dir}",
    ])
    summary = train(cfg)
    with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
        metrics = [json.loads(line) for line in f]
    harness = [r for r in metrics if any(k.startswith("harness_") for k in r)]
    assert [r["step"] for r in harness] == [2, 4]
    keys = {"step", "harness_gx_mc_acc", "harness_gx_mc_acc_norm", "harness_gx_ppl_word_perplexity",
            "harness_gx_ppl_byte_perplexity", "harness_gx_ppl_bits_per_byte"}
    assert all(set(r) == keys for r in harness), harness
    assert harness[0] != harness[1]  # the params changed between steps 2 and 4
    lm = GPTJLM(config=summary["model_config"], params=summary["final_params"], tokenizer=gptj_jax.load_tokenizer(),
                dtype="float32")
    final = flat_metrics(lm_eval.simple_evaluate(model=lm, tasks=["gx_mc", "gx_ppl"],
                                                 task_manager=task_manager(tasks_dir), limit=3))
    assert final.keys() == keys - {"step"}
    for k, v in final.items():
        assert harness[1][k] == pytest.approx(v, rel=1e-5), k


def test_training_refuses_unknown_harness_task(tmp_path, tasks_dir):
    from gptj_jax.train.config import TrainConfigError, load_train_config
    from gptj_jax.train.data import write_records
    from gptj_jax.train.loop import train

    write_records(str(tmp_path / "data"), np.zeros((8, 17), np.int64), num_bytes=8 * 17 * 3)
    cfg = load_train_config(None, [
        "layers=2", "d_model=32", "n_heads=4", "n_vocab=50400", "pe_rotary_dims=4", "n_positions=64", "seq=16",
        "progress=false", "peak_flops=1e11", f"train_set={tmp_path / 'data'}", f"model_dir={tmp_path / 'run'}",
        "total_steps=2", "per_replica_batch=4", "eval_harness_tasks=[gx_mc, gx_nope]",
        f"eval_harness_include_path={tasks_dir}",
    ])
    with pytest.raises(TrainConfigError, match="eval_harness_tasks.*gx_nope"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ============================================================================ over the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """`gptj-jax serve` on the tiny model, as a subprocess on a free port of 127.0.0.1; yields its base URL."""
    import urllib.request

    port = _free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+", encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "gptj_jax.cli", "serve", "--model", model_dir, "--port", str(port),
                             "--max-slots", str(BATCH), "--dtype", "float32"], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, "the server exited:\n" + open(log.name, encoding="utf-8").read()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not become healthy in 300 s"
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def test_local_completions_against_server(server, model_dir, manager, runs):
    """lm-eval's `local-completions` model against `gptj-jax serve` (token-id prompts, echo + logprobs):
    every log-likelihood within 1e-4 of the adapter's and is_greedy identical, generations identical.

    lm-eval's API models keep one position for the generated token (their max_length is the argument - 1):
    with max_length 65 they cut a long pair to its last 64 tokens and roll windows of 63 predictions, which
    is the adapter (and HFLM) with max_length 63; generation contexts are cut to 64 - max_gen_toks tokens,
    as the adapter and HFLM with max_length 64 do."""
    api = lm_eval.simple_evaluate(
        model="local-completions", tasks=list(TASKS), task_manager=manager, log_samples=True,
        model_args={"base_url": server + "/v1/completions", "model": model_dir, "tokenizer_backend": "huggingface",
                    "tokenizer": model_dir, "tokenized_requests": True, "max_length": 65, "max_retries": 1},
    )
    ours = _evaluate(GPTJLM(model=model_dir, batch_size=BATCH, dtype="float32", max_length=63), manager,
                     tasks=("gx_mc", "gx_ppl"))
    n = 0
    for a, b in _pairs(api, ours, "gx_mc") + _pairs(api, ours, "gx_ppl"):
        for ra, rb in zip(a["resps"], b["resps"]):
            ra, rb = ra[0], rb[0]
            if isinstance(rb, (list, tuple)):  # loglikelihood: (ll, is_greedy)
                assert abs(ra[0] - rb[0]) <= 1e-4 and ra[1] == rb[1], (a["doc_id"], ra, rb)
            else:  # loglikelihood_rolling: ll
                assert abs(ra - rb) <= 1e-4, (a["doc_id"], ra, rb)
            n += 1
    assert n == sum(len(d["choices"]) for d in MC_DOCS) + 1 + len(PPL_DOCS)
    for a, b in _pairs(api, runs[0], "gx_gen"):
        assert a["resps"] == b["resps"], (a["doc_id"], a["resps"], b["resps"])
    assert api["results"]["gx_gen"]["exact_match,none"] == 0.2
