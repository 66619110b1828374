"""XLA:TPU's memory for a LoRA-like step of GPT-J-6B on a TPU v5e-1, a stand-in written before the LoRA code (issue 14)
landed; plan does not compile the real LoRA step yet.

A frozen bfloat16 base and a backward pass through every block: only each block's tiny ln_1 scale and bias
are trained, so XLA:TPU has to keep what a LoRA backward keeps (activations for the input gradients of every
block) minus the adapters themselves (rank 8: 252 MiB of float32 adapters, gradients and Adam state, to be
added). Batch 1 x 2048, remat as given (default full). Needs libtpu (pip install 'gptj-jax[tpu-aot]'):

    JAX_PLATFORMS=cpu python scripts/plan_lora_proxy.py [full|none]
"""
import os
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util

from gptj_jax import plan as P
from gptj_jax import sharding as sh
from gptj_jax.config import GPTJConfig
from gptj_jax.losses import token_cross_entropy
from gptj_jax.model import model_for

cfg = GPTJConfig.load("gptj-6b")
remat = sys.argv[1] if len(sys.argv) > 1 else "full"
devices = P.tpu_devices("v5e-1")
mesh = sh.make_mesh(1, 1, 1, devices=devices)
params = sh.abstract_params(cfg, mesh, "causal_lm", jnp.bfloat16)
flat = traverse_util.flatten_dict(params)
train_keys = [k for k in flat if "ln_1" in k]
frozen = {"/".join(k): v for k, v in flat.items() if k not in train_keys}
trainable = {"/".join(k): jax.ShapeDtypeStruct(v.shape, jnp.float32, sharding=v.sharding) for k, v in flat.items() if k in train_keys}
module = model_for(cfg, "causal_lm", dtype=jnp.bfloat16, remat_policy=remat)
def step(frozen, trainable, tokens):
    def loss(tr):
        p = dict(frozen)
        p.update({k: v.astype(jnp.bfloat16) for k, v in tr.items()})
        p = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in p.items()})
        logits = module.apply({"params": p}, tokens[:, :-1], deterministic=True).logits
        return token_cross_entropy(logits, tokens[:, 1:]).mean()
    g = jax.grad(loss)(trainable)
    return jax.tree.map(lambda t, g: t - 1e-3 * g, trainable, g)
tokens = jax.ShapeDtypeStruct((1, 2049), jnp.int32, sharding=sh.batch_sharding(mesh, 1))
t0 = time.time()
s = P._compile("lora-proxy", jax.jit(step, donate_argnums=(1,)), frozen, trainable, tokens)
print(f"remat={remat} compile {time.time()-t0:.0f}s error={s.error!r}")
G = 1024**3
print(f"arguments {s.argument/G:.2f} GiB, temp {s.temp/G:.2f} GiB, output {s.output/G:.3f}, alias {s.alias/G:.3f}, peak {s.peak/G:.2f} GiB")
