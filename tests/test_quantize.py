"""int8 weight-only quantization (``gptj_jax.quantize``, ``load(..., quantize="int8")``, ``--quantize int8``):
accuracy on a trained model against float32 and bfloat16, device bytes, quantize-on-load peak, an 8-device mesh,
and bad schemes."""

from __future__ import annotations

import gc
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import generate_cli

import gptj_jax
from gptj_jax import quantize as qz
from gptj_jax.convert import table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The Clever Fox and the Crow\n\nOne morning, a clever fox"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A demo-size GPT-J (configs/demo-tiny.yaml) trained briefly on two demo fable files: its run dir, an HF
    directory of it, and held-out token rows from data/demo/val."""
    from gptj_jax.train.config import load_train_config
    from gptj_jax.train.data import prepare
    from gptj_jax.train.loop import train

    tmp = tmp_path_factory.mktemp("q")
    files = sorted(glob.glob(os.path.join(ROOT, "data", "demo", "train", "*.txt")))
    prepare(files[:2], str(tmp / "data"), seq=64, workers=1, progress=False)
    cfg = load_train_config(os.path.join(ROOT, "configs", "demo-tiny.yaml"), [
        f"train_set={tmp / 'data'}", f"model_dir={tmp / 'run'}", "seq=64", "per_replica_batch=8",
        "total_steps=60", "warmup_steps=0", "anneal_steps=60", "lr=3e-3", "ckpt_every=1000", "val_set={}",
        "progress=false", "peak_flops=1e11",
    ])
    summary = train(cfg)
    config = summary["model_config"]
    params = jax.device_get(summary["final_params"])
    hf_dir = str(tmp / "hf")
    gptj_jax.save_pretrained(hf_dir, config, params)
    tok = gptj_jax.load_tokenizer(hf_dir)
    with open(sorted(glob.glob(os.path.join(ROOT, "data", "demo", "val", "*.txt")))[0], encoding="utf-8") as f:
        ids = tok(f.read())["input_ids"]
    rows = np.asarray(ids[: 8 * 128], np.int32).reshape(8, 128)  # 1024 held-out tokens
    return {"run": cfg.model_dir, "hf": hf_dir, "config": config, "params": params, "rows": rows}


def _logits(config, params, rows, dtype):
    """[B, T, V] float32 logits through the jitted step (quantized params are dequantized inside it)."""
    model = gptj_jax.GPTJForCausalLM(config, dtype=dtype)
    return np.asarray(jax.jit(lambda p, x: model.apply({"params": qz.dequantize(p)}, x).logits)(params, rows))


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ppl(logp, rows):
    tgt = rows[:, 1:]
    nll = -np.take_along_axis(logp[:, :-1], tgt[..., None], -1)[..., 0]
    return float(np.exp(nll.mean()))


@pytest.mark.parametrize("embeddings", [False, True])
def test_int8_matches_float32_on_a_trained_model(trained, embeddings):
    """top-1 agreement >= 99%, mean KL(f32 || int8) <= 0.01 nats/token on held-out text, and the int8 model's
    perplexity within 1% of the bfloat16 model's (all from load(..., quantize="int8") of the HF directory)."""
    rows = trained["rows"]
    config, f32 = gptj_jax.load(trained["hf"], dtype="float32")
    _, bf16 = gptj_jax.load(trained["hf"], dtype="bfloat16")
    _, q8 = gptj_jax.load(trained["hf"], dtype="bfloat16", quantize="int8", quantize_embeddings=embeddings)
    leaves = table.flatten(q8)
    n_quantized = 6 * config.n_layer + (2 if embeddings else 0)
    assert sum(qz.is_quantized_leaf(x) for x in leaves.values()) == n_quantized
    q = leaves["transformer/h_0/attn/q_proj/kernel"]
    assert q.q.dtype == jnp.int8 and q.scale.shape == (config.n_embd,) and q.scale.dtype == jnp.float32

    lp32 = _log_softmax(_logits(config, f32, rows, jnp.float32))
    lp16 = _log_softmax(_logits(config, bf16, rows, jnp.bfloat16))
    lp8 = _log_softmax(_logits(config, q8, rows, jnp.bfloat16))
    top1 = float((lp8.argmax(-1) == lp32.argmax(-1)).mean())
    kl = float((np.exp(lp32) * (lp32 - lp8)).sum(-1).mean())
    ppl32, ppl16, ppl8 = _ppl(lp32, rows), _ppl(lp16, rows), _ppl(lp8, rows)
    print(f"embeddings={embeddings}: top1 {top1:.4f} KL {kl:.5f} ppl f32 {ppl32:.3f} bf16 {ppl16:.3f} int8 {ppl8:.3f}")
    assert ppl32 < 2000  # trained: far below the vocabulary's 50400
    assert top1 >= 0.99, top1
    assert kl <= 0.01, kl
    assert abs(ppl8 - ppl16) <= 0.01 * ppl16, (ppl8, ppl16)


def test_int8_device_bytes_at_most_055_of_bfloat16(trained):
    """Measured from the placed arrays (tiny model, embeddings included: they are most of its bytes), and for
    GPT-J-6B's shapes with the default scheme (block matmuls only) from jax.eval_shape."""
    _, bf16 = gptj_jax.load(trained["hf"], dtype="bfloat16")
    _, q8 = gptj_jax.load(trained["hf"], dtype="bfloat16", quantize="int8", quantize_embeddings=True)
    ratio = qz.device_bytes(q8) / qz.device_bytes(bf16)
    print(f"tiny int8/bf16 device bytes {ratio:.4f}")
    assert ratio <= 0.55, ratio
    six_b = gptj_jax.GPTJConfig.preset("gptj-6b")
    abstract = jax.eval_shape(lambda: gptj_jax.init_params(six_b, jax.random.PRNGKey(0), param_dtype=jnp.bfloat16))
    ratio_6b = qz.param_bytes(qz.abstract_params(abstract)) / qz.param_bytes(abstract)
    print(f"6B int8/bf16 bytes {ratio_6b:.4f}")
    assert ratio_6b <= 0.55, ratio_6b


@pytest.mark.parametrize("source", ["hf", "run"])
def test_quantize_on_load_peak_is_int8_model_plus_one_tensor(trained, source):
    """Live device bytes while loading (every live buffer once) never exceed the int8 model plus one bfloat16
    tensor (the largest), from an HF directory (safetensors, float32 stored) and from our orbax run directory;
    embeddings quantized too, so the largest tensors are among those streamed as float then quantized."""
    from gptj_jax.convert.load import live_device_bytes

    gc.collect()
    base = live_device_bytes()
    stats: dict = {}
    config, q8 = gptj_jax.load(trained[source], dtype="bfloat16", quantize="int8", quantize_embeddings=True,
                               stats=stats)
    largest_bf16 = max(int(np.prod(s)) * 2 for s in table.expected_param_shapes(config, "causal_lm").values())
    int8_model = qz.device_bytes(q8)
    print(f"peak above baseline {stats['peak_live_bytes'] - base}, int8 model {int8_model}, largest bf16 {largest_bf16}")
    assert stats["peak_live_bytes"] - base <= int8_model + largest_bf16
    # and the result equals quantizing the bfloat16 params afterwards, bit for bit
    _, bf16 = gptj_jax.load(trained[source], dtype="bfloat16")
    want = table.flatten(qz.quantize_params(bf16, embeddings=True))
    for p, x in table.flatten(q8).items():
        if qz.is_quantized_leaf(x):
            assert np.array_equal(np.asarray(x.q), np.asarray(want[p].q)), p
            assert np.array_equal(np.asarray(x.scale), np.asarray(want[p].scale)), p
        else:
            assert np.array_equal(np.asarray(x), np.asarray(want[p])), p


def test_decode_step_keeps_no_float_copy_of_the_weights():
    """The compiled decode step dequantizes kernel by kernel: its temporaries exceed those of the same step on
    bfloat16 weights by at most two layers' kernels in bfloat16, not by the model's (8 layers of 256 wide)."""
    from gptj_jax import generation

    config = gptj_jax.GPTJConfig(vocab_size=512, n_positions=64, n_embd=256, n_layer=8, n_head=4, rotary_dim=16)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), gptj_jax.init_params(config, jax.random.PRNGKey(0)))
    q8 = qz.quantize_params(bf16)
    cache = gptj_jax.init_cache(config, 1, 64, jnp.bfloat16)

    def temp(params):
        step = jax.jit(lambda p, c, t: generation.forward_cached(p, t, None, c, config=config, dtype=jnp.bfloat16))
        return step.lower(params, cache, jnp.zeros((1, 1), jnp.int32)).compile().memory_analysis().temp_size_in_bytes

    kernels = [x for x in jax.tree.leaves(q8, is_leaf=qz.is_quantized_leaf) if qz.is_quantized_leaf(x)]
    model_bf16 = sum(2 * x.q.size for x in kernels)
    layer_bf16 = model_bf16 // config.n_layer
    t8, t16 = temp(q8), temp(bf16)
    print(f"decode temp bytes int8 {t8}, bf16 {t16}, one layer's kernels in bf16 {layer_bf16}, all {model_bf16}")
    assert t8 - t16 <= 2 * layer_bf16, (t8, t16, layer_bf16)


def test_cli_quantize_int8_mesh_of_8_equals_one_device(trained):
    """``generate --quantize int8 --greedy`` on an 8-device mesh (fsdp=2, mp=4: kernels and their scales split)
    prints exactly what one device prints."""
    argv = ["--model", trained["hf"], "--prompt", PROMPT, "--max-new-tokens", "16", "--greedy", "--quiet",
            "--quantize", "int8", "--dtype", "float32"]
    one = generate_cli(argv)
    eight = generate_cli([*argv, "--mesh", "fsdp=2,mp=4"], env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert one.returncode == 0 and eight.returncode == 0, (one.stderr[-2000:], eight.stderr[-2000:])
    assert eight.stdout == one.stdout and one.stdout.startswith(PROMPT)
    # and the scales really are split over the mesh when loaded there (in a fresh 8-device process)
    script = (
        "import jax, json, gptj_jax\nfrom gptj_jax import sharding as sh, quantize as qz\n"
        f"c, p = gptj_jax.load({trained['hf']!r}, mesh=sh.make_mesh(fsdp=2, mp=4), quantize='int8', quantize_embeddings=True)\n"
        "k = p['transformer']['h_0']['mlp']['fc_in']['kernel']; e = p['transformer']['wte']['embedding']\n"
        "print(json.dumps([str(k.q.sharding.spec), str(k.scale.sharding.spec), len(k.scale.addressable_shards[0].data),"
        " k.scale.shape[0], str(e.scale.sharding.spec)]))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kq, ks, shard, full, es = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "mp" in kq and "mp" in ks and shard * 4 == full, (kq, ks, shard, full)
    assert "mp" in es, es


@pytest.mark.parametrize("scheme", ["int4", "fp16x"])
def test_unknown_scheme_is_one_clear_error(trained, scheme):
    with pytest.raises(ValueError, match=rf"quantize='{scheme}' is not a quantization scheme; the one scheme is 'int8'"):
        gptj_jax.load(trained["hf"], quantize=scheme)
    proc = generate_cli(["--model", trained["hf"], "--prompt", "x", "--quantize", scheme])
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptj-jax generate: error: ValueError: --quantize="), lines
    assert f"'{scheme}' is not a quantization scheme" in lines[0]
    if scheme == "int4":
        assert "int4 / fp8 are not implemented" in lines[0]


def test_lm_eval_adapter_takes_int8_like_load(trained):
    """``GPTJLM(model=..., quantize="int8")`` (what ``gptj-jax lm-eval --quantize int8`` builds) scores with the
    int8 weights: its log-likelihoods equal ``gptj_jax.score`` on ``load(..., quantize="int8")`` exactly."""
    from lm_eval.api.instance import Instance

    from gptj_jax.eval_harness import GPTJLM

    lm = GPTJLM(model=trained["hf"], quantize="int8", dtype="float32", batch_size=2)
    config, params = gptj_jax.load(trained["hf"], quantize="int8", dtype="float32")
    assert isinstance(lm.params["transformer"]["h_0"]["mlp"]["fc_in"]["kernel"], qz.QuantizedArray)
    tok = gptj_jax.load_tokenizer(trained["hf"])
    pairs = [("The fox and the", " grapes"), ("Once upon a time", " there was a crow")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    want = gptj_jax.score(config, params, [(tok(c)["input_ids"], tok(x)["input_ids"]) for c, x in pairs],
                          dtype="float32")
    for (ll, greedy), w in zip(got, want):
        assert ll == pytest.approx(float(w.sum), abs=1e-5) and greedy == w.is_greedy


@pytest.mark.parametrize("verb", ["serve", "lm-eval"])
def test_serve_and_lm_eval_refuse_an_unknown_scheme(trained, verb):
    argv = {"serve": ["serve", "--model", trained["hf"]], "lm-eval": ["lm-eval", "--model", trained["hf"], "--tasks", "x"]}
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "gptj_jax.cli", *argv[verb], "--quantize", "int4"], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"gptj-jax {verb}: error: ValueError: --quantize='int4' is not a quantization scheme")
