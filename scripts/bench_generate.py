"""Generation speed on this CPU: ours against transformers ``generate`` on the same weights, in one run.

    python scripts/bench_generate.py [--config gptj_jax/presets/gptj-162m.json] [--repeats 3] [--only decode1 ...]

Rows (162M GPT-J config, float32 unless marked):

* prefill, 1 x 512 tokens: ours ``prefill`` (prompt into a 576-slot cache, LM head at the last position)
  against transformers' forward with ``use_cache=True, logits_to_keep=1`` (what its ``generate`` runs
  for the prompt); tokens/s. The floor is the matmul FLOPs (2 x params x tokens) over the measured
  XLA matmul peak.
* decode at batch 1 and 16: greedy, 32-token prompts, 64 new tokens, EOS off; new tokens/s over the
  whole ``generate`` call (prefill of the 32-token prompt included, compilation excluded).
* the batch-1 memory floor: bytes read per decode step (every weight once except the embedding table,
  of which one row is read, plus the K/V cache of the average context, 32 + 32 tokens) over the memory
  bandwidth measured here (best of a large reduction and a large matrix-vector product).
* bfloat16 weights and compute at batch 1 against our float32.

Each figure is the best of ``--repeats`` timed runs after a warm-up run. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PROMPT, NEW, PREFILL = 32, 64, 512


def best_time(fn, repeats: int) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def best_times_interleaved(fns: list, repeats: int) -> list[float]:
    """Best wall time of each function, running them in turn ``repeats`` times (after one warm-up each), so
    that load from other jobs on the machine hits every side alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [min(t) for t in times]


def measure_bandwidth() -> float:
    """Memory read bandwidth in bytes/s: best of a 512 MiB sum and a 256 MiB matrix-vector product (XLA)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((128 * 1024 * 1024,), jnp.float32)
    total = jax.jit(jnp.sum)
    t_sum = best_time(lambda: total(x).block_until_ready(), 5)
    w = jnp.ones((8192, 8192), jnp.float32)
    v = jnp.ones((8192,), jnp.float32)
    mv = jax.jit(lambda w, v: w @ v)
    t_mv = best_time(lambda: mv(w, v).block_until_ready(), 5)
    return max(x.nbytes / t_sum, w.nbytes / t_mv)


def measure_gemv_chain(params) -> float:
    """Bytes/s of XLA's own matrix-vector products over the model's weight matrices (batch 1, no other work):
    what a decode step could reach if it did nothing but read the weights through ``x @ W``."""
    import jax
    import jax.numpy as jnp

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    mats = [w for path, w in leaves if w.ndim == 2 and "wte" not in jax.tree_util.keystr(path)]
    xs = {d: jnp.ones((1, d), jnp.float32) for d in {w.shape[0] for w in mats}}
    chain = jax.jit(lambda mats, xs: [xs[w.shape[0]] @ w for w in mats])
    t = best_time(lambda: jax.block_until_ready(chain(mats, xs)), 10)
    return sum(w.nbytes for w in mats) / t


def measure_matmul_peak() -> float:
    """XLA float32 matmul FLOP/s on 2048^3."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((2048, 2048), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    return 2 * 2048**3 / best_time(lambda: mm(a, a).block_until_ready(), 5)


def build_models(config_path: str, seed: int = 0):
    """A random transformers GPT-J (float32, eval) and our params for the same weights."""
    import torch
    import transformers

    from gptj_jax.config import GPTJConfig
    from gptj_jax.convert.table import apply_transform, hf_to_ours, is_ignored_hf, unflatten

    config = GPTJConfig.from_pretrained(config_path)
    d = config.to_hf_dict()
    d.pop("model_type")
    torch.manual_seed(seed)
    hf = transformers.GPTJForCausalLM(transformers.GPTJConfig(**d)).eval()
    flat = {}
    for name, tensor in hf.state_dict().items():
        if is_ignored_hf(name):
            continue
        path, transform = hf_to_ours(name)
        flat[path] = np.ascontiguousarray(apply_transform(tensor.detach().numpy(), transform))
    return config, hf, unflatten(flat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "gptj_jax", "presets", "gptj-162m.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=["prefill", "decode1", "decode16", "bf16"], default=None)
    args = parser.parse_args()
    only = set(args.only or ["prefill", "decode1", "decode16", "bf16"])

    import jax
    import jax.numpy as jnp
    import torch

    from gptj_jax.generation import generate, prefill

    config, hf, params_np = build_models(args.config)
    params = jax.tree.map(jnp.asarray, params_np)
    rng = np.random.RandomState(0)
    rows: list[tuple[str, str, str, str, str]] = []  # what, ours, transformers, ratio, note

    load_before = os.getloadavg()[0]
    bandwidth = max(measure_bandwidth(), measure_bandwidth())  # the higher figure: the stricter floor
    peak = max(measure_matmul_peak(), measure_matmul_peak())
    gemv = measure_gemv_chain(params)
    print(f"bandwidth {bandwidth / 1e9:.1f} GB/s, XLA matmul {peak / 1e9:.0f} GFLOP/s, "
          f"XLA x @ W over the weights {gemv / 1e9:.1f} GB/s", file=sys.stderr)

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_np))
    embed_rows = config.vocab_size * config.n_embd

    if "prefill" in only:
        ids = rng.randint(0, 50257, (1, PREFILL)).astype(np.int32)
        ids_j, mask_j = jnp.asarray(ids), jnp.asarray(np.ones_like(ids))
        ids_t = torch.tensor(ids, dtype=torch.long)

        def ours_prefill():
            logits, _ = prefill(params, ids_j, mask_j, config=config, cache_len=PREFILL + NEW)
            logits.block_until_ready()

        def hf_prefill(keep: int):
            with torch.no_grad():
                hf(ids_t, attention_mask=torch.ones_like(ids_t), use_cache=True, logits_to_keep=keep)

        t_ours, t_hf, t_hf_full = best_times_interleaved(
            [ours_prefill, lambda: hf_prefill(1), lambda: hf_prefill(0)], args.repeats
        )
        flops = 2 * (n_params - embed_rows - config.vocab_size * config.n_embd) * PREFILL  # LM head at 1 position
        flops += 4 * config.n_layer * PREFILL * (PREFILL + NEW) * config.n_embd  # attention over the cache slots
        rows.append((
            "prefill 1x512, tokens/s (LM head at the last position, as in `generate`)",
            f"{PREFILL / t_ours:.0f}", f"{PREFILL / t_hf:.0f}", f"{t_hf / t_ours:.2f}x",
            f"FLOP floor {PREFILL / (flops / peak):.0f} tokens/s ({flops / t_ours / 1e9:.0f} GFLOP/s reached); "
            "target >= 1.3x",
        ))
        rows.append((
            "prefill 1x512, transformers forward with all 512 logits (context)", "-",
            f"{PREFILL / t_hf_full:.0f}", f"{t_hf_full / t_ours:.2f}x", "",
        ))
        print(rows[-2], rows[-1], sep="\n", file=sys.stderr)

    def decode_fns(batch: int, dtype=None) -> tuple:
        ids = rng.randint(0, 50257, (batch, PROMPT)).astype(np.int32)
        p = params if dtype is None else jax.tree.map(lambda x: x.astype(dtype), params)
        ids_t = torch.tensor(ids, dtype=torch.long)

        def ours():
            out = generate(config, p, ids, max_new_tokens=NEW, eos_token_id=[])
            assert out.num_new_tokens.min() == NEW

        def theirs():
            with torch.no_grad():
                out = hf.generate(ids_t, attention_mask=torch.ones_like(ids_t), do_sample=False,
                                  max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
            assert out.shape[1] == PROMPT + NEW

        return ours, theirs

    floor = None
    if "decode1" in only or "bf16" in only:
        ours_f, hf_f = decode_fns(1)
        fns = [ours_f, hf_f]
        if "bf16" in only:
            fns.append(decode_fns(1, jnp.bfloat16)[0])
        times = best_times_interleaved(fns, args.repeats)
        ours1, hf1 = NEW / times[0], NEW / times[1]
        weight_bytes = 4 * (n_params - embed_rows + config.n_embd)
        cache_bytes = 2 * config.n_layer * (PROMPT + NEW // 2) * config.n_embd * 4
        floor = bandwidth / (weight_bytes + cache_bytes)
        rows.append((
            "decode batch 1, new tokens/s", f"{ours1:.1f}", f"{hf1:.1f}", f"{ours1 / hf1:.2f}x",
            f"memory floor {floor:.1f} tokens/s ({(weight_bytes + cache_bytes) / 1e6:.0f} MB/step at "
            f"{bandwidth / 1e9:.1f} GB/s): ours = {100 * ours1 / floor:.0f}% of it; target >= 90%. XLA's "
            f"`x @ W` alone over these weights runs at {gemv / 1e9:.1f} GB/s = "
            f"{gemv / (weight_bytes + cache_bytes):.1f} tokens/s",
        ))
        print(rows[-1], file=sys.stderr)
        if "bf16" in only:
            ours_bf16 = NEW / times[2]
            rows.append((
                "decode batch 1, bfloat16 weights and compute, new tokens/s", f"{ours_bf16:.1f}", "-",
                f"{ours_bf16 / ours1:.2f}x our float32",
                f"bfloat16 memory floor {2 * floor:.1f} tokens/s; target >= 1.7x our float32",
            ))
            print(rows[-1], file=sys.stderr)
    if "decode16" in only:
        t_ours, t_hf = best_times_interleaved(list(decode_fns(16)), args.repeats)
        ours16, hf16 = 16 * NEW / t_ours, 16 * NEW / t_hf
        step_flops = 2 * 16 * (n_params - embed_rows)
        rows.append((
            "decode batch 16, new tokens/s", f"{ours16:.1f}", f"{hf16:.1f}", f"{ours16 / hf16:.2f}x",
            f"FLOP floor {16 / (step_flops / peak):.0f} tokens/s ({step_flops * NEW / t_ours / 1e9:.0f} GFLOP/s "
            "reached); target >= 4x",
        ))
        print(rows[-1], file=sys.stderr)

    load_after = os.getloadavg()[0]
    # This run itself keeps about 2 threads busy, so only the load before it says whether others were running.
    print(f"\nload average (1 min) {load_before:.1f} before the run, {load_after:.1f} after it (this run adds "
          f"about 2) on {os.cpu_count()} cores" + ("  -- other jobs were running: figures are contaminated"
                                                  if load_before > 1.0 else ""))
    print(f"\nGPT-J {n_params / 1e6:.0f}M params ({os.path.basename(args.config)}), float32 unless marked; "
          f"jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} CPU cores; "
          f"memory bandwidth {bandwidth / 1e9:.1f} GB/s, XLA matmul {peak / 1e9:.0f} GFLOP/s (measured here); "
          f"best of {args.repeats} interleaved runs after a warm-up\n")
    print("| what | ours | transformers | ratio | floor, target |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
