"""Generation speed on this CPU: ours against transformers ``generate`` on the same weights, in one run.

    python scripts/bench_generate.py [--config configs/gptj-162m.json] [--repeats 3] [--only decode1 ...]

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
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "gptj-162m.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=["prefill", "decode1", "decode16", "bf16"], default=None)
    args = parser.parse_args()
    only = set(args.only or ["prefill", "decode1", "decode16", "bf16"])

    import jax
    import jax.numpy as jnp
    import torch

    from gptj_jax.generate import generate, prefill

    config, hf, params_np = build_models(args.config)
    params = jax.tree.map(jnp.asarray, params_np)
    rng = np.random.RandomState(0)
    rows: list[tuple[str, str, str, str, str]] = []  # what, ours, transformers, ratio, note

    bandwidth = measure_bandwidth()
    peak = measure_matmul_peak()
    print(f"bandwidth {bandwidth / 1e9:.1f} GB/s, XLA matmul {peak / 1e9:.0f} GFLOP/s", file=sys.stderr)

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_np))
    embed_rows = config.vocab_size * config.n_embd

    if "prefill" in only:
        ids = rng.randint(0, 50257, (1, PREFILL)).astype(np.int32)
        mask = np.ones_like(ids)
        ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)

        def ours_prefill():
            logits, cache = prefill(params, ids_j, mask_j, config=config, cache_len=PREFILL + NEW)
            logits.block_until_ready()

        ids_t = torch.tensor(ids, dtype=torch.long)

        def hf_prefill():
            with torch.no_grad():
                hf(ids_t, attention_mask=torch.ones_like(ids_t), use_cache=True, logits_to_keep=1)

        t_ours, t_hf = best_time(ours_prefill, args.repeats), best_time(hf_prefill, args.repeats)
        flops = 2 * (n_params - embed_rows - config.vocab_size * config.n_embd) * PREFILL  # lm head: 1 position
        rows.append((
            "prefill 1x512, tokens/s", f"{PREFILL / t_ours:.0f}", f"{PREFILL / t_hf:.0f}", f"{t_hf / t_ours:.2f}x",
            f"matmul floor {PREFILL / (flops / peak):.0f} tokens/s; target >= 1.3x",
        ))
        print(rows[-1], file=sys.stderr)

    def decode_pair(batch: int, dtype=None, with_hf: bool = True):
        ids = rng.randint(0, 50257, (batch, PROMPT)).astype(np.int32)
        p = params if dtype is None else jax.tree.map(lambda x: x.astype(dtype), params)

        def ours():
            out = generate(config, p, ids, max_new_tokens=NEW, eos_token_id=[])
            assert out.num_new_tokens.min() == NEW

        t_ours = best_time(ours, args.repeats)
        t_hf = None
        if with_hf:
            ids_t = torch.tensor(ids, dtype=torch.long)

            def theirs():
                with torch.no_grad():
                    out = hf.generate(ids_t, attention_mask=torch.ones_like(ids_t), do_sample=False,
                                      max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
                assert out.shape[1] == PROMPT + NEW

            t_hf = best_time(theirs, args.repeats)
        return batch * NEW / t_ours, (batch * NEW / t_hf if t_hf else None)

    if "decode1" in only or "bf16" in only:
        ours1, hf1 = decode_pair(1)
        weight_bytes = 4 * (n_params - embed_rows + config.n_embd)
        cache_bytes = 2 * config.n_layer * (PROMPT + NEW // 2) * config.n_embd * 4
        floor = bandwidth / (weight_bytes + cache_bytes)
        rows.append((
            "decode batch 1, new tokens/s", f"{ours1:.1f}", f"{hf1:.1f}", f"{ours1 / hf1:.2f}x",
            f"float32 floor {floor:.1f} tokens/s ({(weight_bytes + cache_bytes) / 1e6:.0f} MB/step at "
            f"{bandwidth / 1e9:.1f} GB/s): ours = {100 * ours1 / floor:.0f}% of floor; target >= 90%",
        ))
        print(rows[-1], file=sys.stderr)
    if "decode16" in only:
        ours16, hf16 = decode_pair(16)
        rows.append((
            "decode batch 16, new tokens/s", f"{ours16:.1f}", f"{hf16:.1f}", f"{ours16 / hf16:.2f}x", "target >= 4x",
        ))
        print(rows[-1], file=sys.stderr)
    if "bf16" in only:
        ours_bf16, _ = decode_pair(1, jnp.bfloat16, with_hf=False)
        rows.append((
            "decode batch 1, bfloat16 weights, new tokens/s", f"{ours_bf16:.1f}", "-",
            f"{ours_bf16 / ours1:.2f}x our float32", f"bfloat16 floor {2 * floor:.1f} tokens/s; target >= 1.7x",
        ))
        print(rows[-1], file=sys.stderr)

    print(f"\nGPT-J {n_params / 1e6:.0f}M params ({os.path.basename(args.config)}), float32 unless marked; "
          f"jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} CPU cores; "
          f"memory bandwidth {bandwidth / 1e9:.1f} GB/s, XLA matmul {peak / 1e9:.0f} GFLOP/s (measured here)\n")
    print("| what | ours | transformers | ratio | floor, target |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
