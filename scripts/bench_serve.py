"""Serving throughput and latency: ``gptj-jax serve`` over HTTP against the engine alone, same workload.

    python scripts/bench_serve.py [--preset gptj-tiny | --model DIR] [--clients 1 8 32] [--requests 2]
                                  [--prompt 32] [--new 32] [--max-slots 32]

Workload: every client sends ``--requests x max(1, 32 / clients)`` greedy requests one after another (a
``--prompt``-token random prompt given as token ids, ``--new`` new tokens, EOS off), so each concurrency
level runs a comparable number of requests. The same requests run

* on the engine alone: an in-process :class:`gptj_jax.engine.LLM` (``max_slots``, its background thread),
  each client thread calling ``submit(...).result()``;
* through the server: ``gptj-jax serve`` as a subprocess on 127.0.0.1 (same ``max_slots``), each client
  thread POSTing ``/v1/completions`` (httpx, non-streamed).

Per level: generated tokens/s over the level's wall time, and p50 / p99 request latency (submit to result).
Compilation is excluded (a warm-up round runs first on each side; the server waits for ``/health``). The two
sides run one after the other, not at once. Prints a markdown table.

The lm-eval wall-time part (the in-process adapter against lm-eval's HF backend on the same tasks) is
:func:`bench_lm_eval`, run with ``--lm-eval``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def workload(clients: int, per_client: int, prompt: int, vocab: int, seed: int) -> list[list[list[int]]]:
    """Per client, its prompts (token ids)."""
    rng = np.random.RandomState(seed + clients)
    return [[rng.randint(0, min(vocab, 50257), prompt).tolist() for _ in range(per_client)] for _ in range(clients)]


def run_level(send, prompts: list[list[list[int]]]) -> tuple[float, list[float], int]:
    """Run every client's prompts in its own thread with ``send(ids) -> new tokens``; returns (wall seconds,
    latencies, tokens)."""
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def client(mine: list[list[int]]) -> None:
        for ids in mine:
            t = time.perf_counter()
            try:
                n = send(ids)
            except Exception as e:  # reported after the level
                errors.append(f"{type(e).__name__}: {e}")
                return
            with lock:
                latencies.append(time.perf_counter() - t)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return wall, latencies, tokens[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_engine(config, params, args, levels) -> dict:
    from gptj_jax.engine import LLM

    llm = LLM(config, params, max_slots=args.max_slots, max_len=args.prompt + args.new, max_waiting=4096)
    llm.start()
    try:
        def send(ids: list[int]) -> int:
            out = llm.submit(ids, max_new_tokens=args.new, eos_token_id=()).result()
            return sum(out.num_new_tokens)

        # as the server's warm-up: one sampled request, so that the scheduler's step program (the union of the
        # processors it has served, it only grows) is the same on both sides
        llm.submit([0] * 4, max_new_tokens=2, do_sample=True, temperature=0.7).result()
        run_level(send, workload(min(levels[-1], args.max_slots), 1, args.prompt, config.vocab_size, 99))  # warm
        return {c: run_level(send, workload(c, args.requests * max(1, 32 // c), args.prompt, config.vocab_size,
                                            args.seed)) for c in levels}
    finally:
        llm.stop(0)


def bench_server(model_dir: str, config, args, levels) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gptj_jax.cli", "serve", "--model", model_dir, "--port", str(port),
           "--max-slots", str(args.max_slots), "--max-len", str(args.prompt + args.new), "--max-waiting", "4096",
           "--served-model-name", "bench", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready in 600 s")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))

        def send(ids: list[int]) -> int:
            r = http.post(url + "/v1/completions", json={
                "model": "bench", "prompt": ids, "max_tokens": args.new, "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        run_level(send, workload(min(levels[-1], args.max_slots), 1, args.prompt, config.vocab_size, 99))  # warm
        results = {c: run_level(send, workload(c, args.requests * max(1, 32 // c), args.prompt, config.vocab_size,
                                               args.seed)) for c in levels}
        http.close()
        return results
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _lm_eval_tasks(directory: str, docs: int, gen_tokens: int, seed: int) -> list[str]:
    """Three local tasks in ``directory`` (YAML + jsonl): multiple choice (``docs`` questions x 4 choices),
    rolling perplexity (``docs // 4`` texts of ~300-600 words: several windows each) and generate_until
    (``docs // 4`` prompts, ``gen_tokens`` new tokens, stop at "\\n\\n"); returns their names."""
    import json

    rng = np.random.RandomState(seed)
    words = ("the of and to in is was for on that with as by at from his her it an were are which this be or "
             "has had one two city river house king people time year day water music world north south war "
             "book school church station village family game team road music island county film").split()
    text = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    tasks = {
        "bench_mc": ([{"q": text(int(rng.randint(20, 120))), "c": [text(int(rng.randint(1, 6))) for _ in range(4)],
                       "l": int(rng.randint(4))} for _ in range(docs)],
                     'output_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_target: "{{l}}"\n'
                     'doc_to_choice: "{{c}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'),
        "bench_ppl": ([{"t": text(int(rng.randint(300, 600)))} for _ in range(max(1, docs // 4))],
                      'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{t}}"\n'
                      "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
        "bench_gen": ([{"p": text(int(rng.randint(20, 100))), "a": "x"} for _ in range(max(1, docs // 4))],
                      'output_type: generate_until\ndoc_to_text: "{{p}}"\ndoc_to_target: "{{a}}"\n'
                      f'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: {gen_tokens}\n  do_sample: false\n'
                      "metric_list:\n  - metric: exact_match\n"),
    }
    for name, (rows, body) in tasks.items():
        data = os.path.join(directory, f"{name}.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(os.path.join(directory, f"{name}.yaml"), "w", encoding="utf-8") as f:
            f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    f"test_split: test\n{body}")
    return list(tasks)


def bench_lm_eval(args: argparse.Namespace) -> list[str]:
    """lm-eval wall time, the in-process ``gptj-jax`` adapter against lm-eval's HF backend (``--model hf``) on
    the same tasks and model (float32, the same batch size): each side runs ``simple_evaluate`` twice in
    this process, cold (the first run: compilation for the adapter, first-call overheads for torch) and warm
    (the same tasks again on the same model object). Also checks that both sides' metrics agree. Returns the
    markdown lines for docs/benchmarks.md."""
    import jax
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    import gptj_jax
    from gptj_jax.eval_harness import GPTJLM, task_manager
    from gptj_jax.tokenizer import save_tokenizer

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir = args.model
        else:
            config = gptj_jax.GPTJConfig.preset(args.preset)
            params = gptj_jax.init_params(config, jax.random.PRNGKey(0))
            model_dir = os.path.join(tmp, "model")
            gptj_jax.save_pretrained(model_dir, config, params)
            save_tokenizer(model_dir)
        tasks_dir = os.path.join(tmp, "tasks")
        os.makedirs(tasks_dir)
        names = _lm_eval_tasks(tasks_dir, args.lm_eval_docs, args.new, args.seed)
        manager = task_manager(tasks_dir)
        batch = args.lm_eval_batch_size

        def timed(make) -> tuple[float, float, float, dict]:
            t0 = time.perf_counter()
            lm = make()
            t_load = time.perf_counter() - t0
            walls, results = [], None
            for _ in range(2):
                t = time.perf_counter()
                results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager)
                walls.append(time.perf_counter() - t)
            return t_load, walls[0], walls[1], results

        load = os.getloadavg()[0]
        ours = timed(lambda: GPTJLM(model=model_dir, batch_size=batch, dtype="float32"))
        hf = timed(lambda: HFLM(pretrained=model_dir, dtype="float32", batch_size=batch, device="cpu"))
    for task, metric in (("bench_mc", "acc,none"), ("bench_mc", "acc_norm,none"), ("bench_gen", "exact_match,none")):
        a, b = ours[3]["results"][task][metric], hf[3]["results"][task][metric]
        if a != b:
            raise RuntimeError(f"{task} {metric}: adapter {a} != HF backend {b}")
    mc, ppl, gen = args.lm_eval_docs, max(1, args.lm_eval_docs // 4), max(1, args.lm_eval_docs // 4)
    lines = [
        f"model {args.model or args.preset}, float32, batch size {batch}; tasks: multiple choice ({mc} docs x 4 "
        f"choices), rolling perplexity ({ppl} texts of 300-600 words), generate_until ({gen} prompts, {args.new} "
        f"new tokens); {jax.devices()[0].platform}, load average {load:.1f} at the start",
        "",
        "| backend | load s | cold run s | warm run s | warm vs HF backend |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (t_load, cold, warm, _) in (("gptj-jax adapter", ours), ("lm-eval HF backend (torch)", hf)):
        lines.append(f"| {name} | {t_load:.1f} | {cold:.1f} | {warm:.1f} | {hf[2] / warm:.2f}x |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--preset", default="gptj-tiny", help="random weights of this preset (default gptj-tiny)")
    src.add_argument("--model", help="a checkpoint directory instead of random weights")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=2, help="requests per client at 32 clients (x 32/clients below)")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--max-slots", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm-eval", action="store_true", help="the lm-eval wall-time part only")
    parser.add_argument("--lm-eval-docs", type=int, default=64, help="--lm-eval: multiple-choice documents (and a "
                        "quarter as many rolling texts and prompts)")
    parser.add_argument("--lm-eval-batch-size", type=int, default=8, help="--lm-eval: batch size of both backends")
    args = parser.parse_args()
    if args.lm_eval:
        try:
            rows = bench_lm_eval(args)
        except NotImplementedError as e:
            print(f"bench_serve: {e}", file=sys.stderr)
            return 2
        print("\n".join(rows))
        return 0

    import jax

    import gptj_jax
    from gptj_jax import GPTJConfig

    levels = sorted(args.clients)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir = args.model
            config, params = gptj_jax.load(model_dir)
        else:
            config = GPTJConfig.preset(args.preset)
            params = gptj_jax.init_params(config, jax.random.PRNGKey(0))
            model_dir = os.path.join(tmp, "model")
            gptj_jax.save_pretrained(model_dir, config, params)
        load = os.getloadavg()[0]
        engine = bench_engine(config, params, args, levels)
        server = bench_server(model_dir, config, args, levels)
    name = args.model or args.preset
    print(f"model {name}, max_slots {args.max_slots}, prompt {args.prompt} tokens, {args.new} new tokens (greedy, "
          f"EOS off), load average {load:.1f} at the start\n")
    print("| clients | requests | engine tok/s | server tok/s | server/engine | engine p50 / p99 s | "
          "server p50 / p99 s |")
    print("|---|---|---|---|---|---|---|")
    for c in levels:
        (ew, el, et), (sw, sl, st) = engine[c], server[c]
        print(f"| {c} | {len(el)} | {et / ew:.0f} | {st / sw:.0f} | {(st / sw) / (et / ew):.2f} | "
              f"{np.percentile(el, 50):.3f} / {np.percentile(el, 99):.3f} | "
              f"{np.percentile(sl, 50):.3f} / {np.percentile(sl, 99):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
