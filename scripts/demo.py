"""The CPU demo (``make demo``): prepare the shipped fables, train a tiny GPT-J from scratch, save, convert to a
Hugging Face directory, load it with ``transformers``, generate greedily with both, and plot the loss curve.

    python scripts/demo.py                     # everything under out/demo/ (about 3-5 minutes on 2 CPU cores)
    python scripts/demo.py total_steps=100     # any training-config override (see configs/demo-tiny.yaml)

Running it again resumes the run in out/demo/run (a finished run trains no further); delete out/demo to start over.
"""

from __future__ import annotations

import glob
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

PROMPT = "The Clever Fox and the Crow\n\nOne morning, a clever fox"
NEW_TOKENS = 40


def main(overrides: list[str]) -> int:
    import numpy as np
    from absl import logging as absl_logging

    from gptj_jax.train.config import load_train_config
    from gptj_jax.train.data import INDEX, prepare
    from gptj_jax.train.loop import train

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's notes about metadata files are not for the reader
    t_start = time.time()
    os.chdir(ROOT)
    cfg = load_train_config(os.path.join("configs", "demo-tiny.yaml"), overrides)
    out = os.path.dirname(cfg.model_dir)

    # 1. prepare the corpus (data/demo: generated fables, CC0; see data/demo/README.md)
    for split, directory in (("train", cfg.train_set), ("val", cfg.val_set["fables"])):
        files = sorted(glob.glob(os.path.join("data", "demo", split, "*.txt")))
        if os.path.isfile(os.path.join(directory, INDEX)):
            print(f"== {directory} already prepared")
            continue
        print(f"== prepare {len(files)} files -> {directory}")
        index = prepare(files, directory, seq=cfg.seq, workers=2 if split == "train" else 1)
        print(f"   {index['num_records']} records of {cfg.seq + 1} tokens")

    # 2. train (resumes if out/demo/run has checkpoints)
    print(f"== train {cfg.name}: {cfg.total_steps} steps")
    summary = train(cfg)
    if summary["loss"] is None:
        print(f"   already at step {summary['step']} (delete {out} to train again)")
    else:
        print(f"   step {summary['step']}, last loss {summary['loss']:.4f}")

    # 3. convert the run's newest checkpoint to a Hugging Face directory, as `gptj-jax convert` does
    from gptj_jax.convert.pipeline import convert

    hf_dir = os.path.join(out, "hf")
    print(f"== convert {cfg.model_dir} -> {hf_dir}")
    convert(cfg.model_dir, hf_dir, to="hf", overwrite=True, verbose=False)

    # 4. greedy generation: ours (from the checkpoint) and transformers (from the HF directory)
    import torch
    import transformers

    import gptj_jax
    from gptj_jax.generation import generate
    from gptj_jax.tokenizer import load_tokenizer

    tok = load_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    config, params = gptj_jax.load(cfg.model_dir)  # the run directory: its newest step
    ours = generate(config, params, np.array([ids]), max_new_tokens=NEW_TOKENS, eos_token_id=[]).sequences
    ours = np.asarray(ours)[0, -NEW_TOKENS:].tolist()
    hf = transformers.GPTJForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    print("== greedy continuation of:", repr(PROMPT))
    print("   gptj-jax:     ", repr(tok.decode(ours)))
    print("   transformers: ", repr(tok.decode(theirs)))
    same = ours == theirs
    print(f"   same tokens: {same}")

    # 5. the loss curve
    from plot_metrics import plot, read_metrics

    png = plot(read_metrics(cfg.model_dir), os.path.join(out, "loss.png"), smooth=10, title="demo-tiny on the fables")
    print(f"== loss curve: {png}")
    print(f"== demo done in {time.time() - t_start:.0f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
