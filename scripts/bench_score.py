"""Scoring speed on this CPU: ``gptj_jax.score`` against transformers' forward + log_softmax + gather on the
same weights, in one run.

    python scripts/bench_score.py [--config gptj_jax/presets/gptj-162m.json] [--rounds 5]

Rows (162M GPT-J config, float32, random weights, batch of 8 requests whose input is 512 tokens):

* full scoring: context 1 token + continuation 512 tokens, every input position scored (what
  ``loglikelihood_rolling`` windows are). Transformers: ``model(ids).logits``, ``log_softmax`` over the
  vocabulary, ``gather`` of the targets and an argmax check (lm-eval's HF backend).
* multiple choice: context 481 + continuation 32 tokens (lm-eval's ``loglikelihood`` on a long prompt).
  Transformers runs the same full forward as above (as lm-eval does); ours computes the LM head only at
  the 32 scored positions.
* ours with the whole vocabulary in one block (``vocab_block=50400``) on the full-scoring input: what the
  vocabulary blocks (``scoring.VOCAB_BLOCK``) buy in time; the compiled program's temporary memory for
  both is printed too.

Input tokens per second (8 x 512 / wall time of one call, compilation excluded), median of ``--rounds``
interleaved rounds after a warm-up of each, so load from other jobs hits every side alike. Prints a
markdown table; the target is ours >= 1.3x transformers on full scoring.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

from bench_generate import build_models, measure_matmul_peak  # noqa: E402  (the 162M pair and the peak probe)

BATCH, LENGTH, MC_CONT = 8, 512, 32


def median_times_interleaved(fns: list, rounds: int) -> list[float]:
    """Median wall time of each function over ``rounds`` rounds that run them in turn (after one warm-up each)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [float(np.median(t)) for t in times]


def hf_score(hf, requests: list) -> list[tuple[np.ndarray, bool]]:
    """lm-eval's HF backend for one batch of equal-length requests: forward, log_softmax, gather, argmax."""
    import torch

    inputs = torch.tensor([(c + k)[:-1] for c, k in requests], dtype=torch.long)  # [B, T]
    with torch.inference_mode():
        logprobs = torch.log_softmax(hf(inputs).logits, dim=-1, dtype=torch.float32)  # [B, T, V]
        out = []
        for row, (_, cont) in zip(logprobs, requests):
            sel = row[-len(cont):]  # [n, V]
            target = torch.tensor(cont, dtype=torch.long)
            lp = torch.gather(sel, 1, target[:, None])[:, 0]
            out.append((lp.numpy(), bool((sel.argmax(-1) == target).all())))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "gptj_jax", "presets", "gptj-162m.json"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    import jax
    import jax.numpy as jnp
    import torch

    import gptj_jax
    from gptj_jax import scoring

    config, hf, params = build_models(args.config)
    params = jax.tree.map(jnp.asarray, params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    embed = params["transformer"]["wte"]["embedding"].size
    peak = measure_matmul_peak()
    rng = np.random.RandomState(0)
    texts = rng.randint(0, 50257, (BATCH, LENGTH + 1)).tolist()
    full = [(t[:1], t[1:]) for t in texts]  # input 512 tokens, all scored
    mc = [(t[: LENGTH + 1 - MC_CONT], t[LENGTH + 1 - MC_CONT:]) for t in texts]  # input 512, last 32 scored
    tokens = BATCH * LENGTH

    # parity on the full-scoring batch (same weights): a sanity check, not a timing
    ours_full = gptj_jax.score(config, params, full, batch_size=BATCH)
    theirs_full = hf_score(hf, full)
    max_diff = max(float(np.abs(o.logprobs - t[0]).max()) for o, t in zip(ours_full, theirs_full))
    greedy_same = all(o.is_greedy == t[1] for o, t in zip(ours_full, theirs_full))

    def ours(requests, vocab_block=None):
        return lambda: gptj_jax.score(config, params, requests, batch_size=BATCH, vocab_block=vocab_block)

    fns = [ours(full), lambda: hf_score(hf, full), ours(mc), lambda: hf_score(hf, mc), ours(full, config.vocab_size)]
    t_full, t_hf_full, t_mc, t_hf_mc, t_one = median_times_interleaved(fns, args.rounds)

    def temp_mb(vocab_block: int) -> float:
        shape = jax.ShapeDtypeStruct
        lowered = scoring._score_batch.lower(
            params, shape((BATCH, LENGTH), jnp.int32), shape((BATCH,), jnp.int32),
            shape((BATCH, LENGTH), jnp.int32), shape((BATCH, LENGTH), jnp.int32),
            config=config, dtype=jnp.float32, vocab_block=vocab_block,
        )
        return lowered.compile().memory_analysis().temp_size_in_bytes / 1e6

    mem_blocks, mem_one = temp_mb(min(scoring.VOCAB_BLOCK, config.vocab_size)), temp_mb(config.vocab_size)
    floor = peak / (2 * (n_params - embed))  # tokens/s if every matmul FLOP ran at the measured peak
    rate = lambda t: f"{tokens / t:.0f}"
    rows = [
        ("full scoring 8 x 512, input tokens/s", rate(t_full), rate(t_hf_full), f"{t_hf_full / t_full:.2f}x",
         f"FLOP floor {floor:.0f} tokens/s; target >= 1.3x"),
        (f"multiple choice 8 x (481 + {MC_CONT}), input tokens/s", rate(t_mc), rate(t_hf_mc),
         f"{t_hf_mc / t_mc:.2f}x", "ours: LM head at the 32 scored positions only"),
        (f"ours, full scoring, vocabulary in {scoring.VOCAB_BLOCK}-column blocks vs one block", rate(t_full),
         rate(t_one) + " (one block)", f"{t_one / t_full:.2f}x",
         f"compiled temp memory {mem_blocks:.0f} MB vs {mem_one:.0f} MB"),
    ]
    load_after = os.getloadavg()[0]
    print(f"\nload average (1 min) {load_before:.1f} before the run, {load_after:.1f} after it (this run adds "
          f"about 2) on {os.cpu_count()} cores" + ("  -- other jobs were running: figures are contaminated"
                                                  if load_before > 1.0 else ""))
    print(f"\nGPT-J {n_params / 1e6:.0f}M params ({os.path.basename(args.config)}), float32, random weights; "
          f"jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} CPU cores; XLA matmul "
          f"{peak / 1e9:.0f} GFLOP/s (measured here); median of {args.rounds} interleaved rounds after a warm-up; "
          f"parity on the full-scoring batch: max |ours - transformers| {max_diff:.1e}, is_greedy "
          f"{'identical' if greedy_same else 'DIFFERENT'}\n")
    print("| what | ours | transformers | ratio | floor, note |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
