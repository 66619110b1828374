"""lm-evaluation-harness adapter: :class:`GPTJLM`, an ``lm_eval.api.model.LM`` registered as ``gptj-jax``.

Needs the ``[eval]`` extra (``pip install 'gptj-jax[eval]'``, lm-eval >= 0.4.13). lm-eval finds models
only in its own registry, so importing this module registers the adapter; ``gptj-jax lm-eval`` (the CLI
verb) and the training loop's ``eval_harness_tasks`` import it and run lm-eval's ``simple_evaluate``::

    import lm_eval
    from gptj_jax.eval_harness import GPTJLM
    lm = GPTJLM(model="EleutherAI/gpt-j-6B", batch_size=16, dtype="bfloat16", mesh="dp=1,mp=8")
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai", "hellaswag"])
    # or by name, once this module is imported:  simple_evaluate(model="gptj-jax", model_args="model=...")

The three request types, each exactly as lm-eval's Hugging Face backend (``HFLM``) computes them:

* ``loglikelihood`` (multiple choice, LAMBADA...): lm-eval's ``TemplateLM`` encodes each (context,
  continuation) pair (trailing context spaces moved to the continuation; an empty context becomes the
  prefix token, ``bos`` else ``eos``); the pair is cut on the left to the last ``max_length + 1`` tokens and
  scored by :func:`gptj_jax.score` (sorted longest first, batched ``batch_size`` at a time, rows and lengths
  bucketed so a handful of programs are compiled). The log-softmax is over the model's whole vocabulary:
  no extra-token suppression, so numbers equal HFLM's (and GPT-J's published ones).
* ``loglikelihood_rolling`` (perplexity): each text is cut into lm-eval's disjoint rolling windows of
  ``max_length`` tokens (:func:`gptj_jax.scoring.rolling_windows`, the first token conditioned on the prefix
  token); the windows of all texts are scored together and summed per text.
* ``generate_until``: each context is encoded and cut on the left to ``max_length - max_gen_toks`` tokens,
  then generated on the inference engine (:class:`gptj_jax.engine.LLM`: ``batch_size`` decode slots,
  continuous batching, one compiled decode step) with the request's knobs (greedy unless ``do_sample``),
  ``max_gen_toks`` new tokens at most, EOS from the model config, the ``until`` strings as stop strings and
  extra-token suppression off. The text, decoded without special tokens, is cut before the first ``until``
  string (HFLM's post-processing; its EOS text is added to ``until`` as HFLM does).

Constructor arguments (also as ``model_args`` strings: ``model=DIR,batch_size=8,dtype=bfloat16``):
``model`` (anything :func:`gptj_jax.load` reads), or ``config`` + ``params`` (+ ``tokenizer``) already in
memory (the training loop passes its current params); ``batch_size``; ``max_length`` (default the model's
``n_positions``); ``max_gen_toks`` (default 256, as HFLM); ``dtype`` (cast the weights when loading, and the
compute dtype); ``mesh`` (a ``jax.sharding.Mesh`` or ``"dp=1,fsdp=1,mp=8"``; ``;`` may separate the axes inside
``model_args``); ``tokenizer`` (a tokenizer object, or a directory / hub id; default the checkpoint's own,
else GPT-J's); ``revision``; ``seed`` (sampled generations only); ``attention``, ``scan_layers``,
``quantize``, ``quantize_embeddings`` (the shared model flags); ``kv_cache`` (``int8``: ``generate_until``'s
engine keeps int8 K/V with per-head scales; scoring runs without a cache).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any, Optional, Union

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

MODEL_NAME = "gptj-jax"
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's max_gen_toks
SCORE_CHUNK = 64  # batches per gptj_jax.score call (the progress bar advances per chunk)
# Generation knobs a task's generation_kwargs may set (GenerationConfig's names; HF's spelling).
GEN_KNOBS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size", "min_new_tokens",
             "seed")


class EvalHarnessError(ValueError):
    """Bad adapter arguments or a request the adapter cannot run; the message names the argument / request."""


def _int_arg(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise EvalHarnessError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


@register_model(MODEL_NAME)
class GPTJLM(TemplateLM):
    """lm-eval's ``LM`` on gptj-jax (see the module docstring for what each request type does)."""

    def __init__(
        self,
        model: Optional[str] = None,
        *,
        config: Any = None,
        params: Any = None,
        tokenizer: Any = None,
        batch_size: Union[int, str, None] = 8,
        max_length: Optional[int] = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        dtype: Any = None,
        mesh: Any = None,
        revision: Optional[str] = None,
        seed: int = 1234,
        max_batch_size: Optional[int] = None,
        device: Optional[str] = None,
        attention: Optional[str] = None,
        scan_layers: Optional[bool] = None,
        quantize: Optional[str] = None,
        quantize_embeddings: bool = False,
        kv_cache: Optional[str] = None,
    ) -> None:
        super().__init__()
        import gptj_jax
        from gptj_jax.dtypes import as_dtype

        del max_batch_size, device  # lm-eval's evaluator passes them; JAX places the work (see ``mesh``)
        if isinstance(batch_size, str):
            if not batch_size.strip().isdigit():
                raise EvalHarnessError(f"batch_size must be an integer >= 1 (no 'auto'), got {batch_size!r}")
            batch_size = int(batch_size)
        self._batch_size = _int_arg("batch_size", 8 if batch_size is None else batch_size)
        self._max_gen_toks = _int_arg("max_gen_toks", max_gen_toks)
        self._seed = _int_arg("seed", seed, 0)
        from gptj_jax.cache import check_kv_cache

        self.kv_cache = check_kv_cache(kv_cache)  # generate_until's engine cache ("int8": int8 K/V, per-head scales)
        try:
            self.dtype = as_dtype(dtype)
        except ValueError as e:
            raise EvalHarnessError(f"dtype: {e}") from None
        if isinstance(mesh, str):
            from gptj_jax.sharding import mesh_from_string

            mesh = mesh_from_string(mesh.replace(";", ",").replace(":", ","))
        self.mesh = mesh

        if (model is None) == (params is None):
            raise EvalHarnessError("pass either model=SOURCE (a checkpoint) or config= and params= (in memory)")
        if model is not None:
            from gptj_jax.convert.load import resolve, source_config

            source = resolve(model, revision)
            overrides = {k: v for k, v in (("attention", attention), ("scan_layers", scan_layers)) if v is not None}
            config = source_config(source, None).replace(**overrides)
            config, params = gptj_jax.load(source, mesh=mesh, dtype=self.dtype, config=config, head="causal_lm",
                                           quantize=quantize, quantize_embeddings=quantize_embeddings)
            if tokenizer is None:
                tokenizer = gptj_jax.load_tokenizer(model, revision=revision)
        elif not isinstance(config, gptj_jax.GPTJConfig):
            raise EvalHarnessError(f"config must be a GPTJConfig with params=, got {type(config).__name__}")
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = gptj_jax.load_tokenizer(tokenizer)
        self.config, self.params, self.tokenizer = config, params, tokenizer
        if len(tokenizer) > config.vocab_size:
            raise EvalHarnessError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}: "
                "its ids would fall outside the vocabulary"
            )
        if max_length is None:
            max_length = config.n_positions
        self._max_length = _int_arg("max_length", max_length)
        if self._max_length > config.n_positions:
            raise EvalHarnessError(f"max_length {max_length} > the model's n_positions {config.n_positions}")
        self._llm = None  # the generation engine, built on the first generate_until

    # ------------------------------------------------------------------------------------ properties
    @property
    def eot_token_id(self) -> int:
        if self.tokenizer.eos_token_id is not None:
            return int(self.tokenizer.eos_token_id)
        if not self.config.eos_token_ids:
            raise EvalHarnessError("neither the tokenizer nor the model config has an EOS id")
        return int(self.config.eos_token_ids[0])

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and a rolling text's first window) is conditioned on: bos, else eos (HFLM)."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": self.config.num_params(), "model_dtype": str(self.dtype or "as stored"),
                "max_length": self.max_length}

    # ------------------------------------------------------------------------------------ tokens
    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len: Optional[int] = None,
                   **kwargs: Any) -> list[int]:
        """Token ids of ``string`` as HFLM encodes them (no special tokens added to text that already starts
        with the prefix token's text), the last ``left_truncate_len`` if given."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------ scoring
    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]], desc: str, disable_tqdm: bool) -> list[Any]:
        """``gptj_jax.score`` of (context, continuation) id pairs, each cut on the left to ``max_length + 1``
        tokens (HFLM), in chunks of ``SCORE_CHUNK`` batches (longest first, as one call would batch them)."""
        from gptj_jax.scoring import score

        L = self.max_length
        cut = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise EvalHarnessError(f"{desc}: request {i} has an empty continuation (nothing to score)")
            if len(cont) > L:
                raise EvalHarnessError(f"{desc}: request {i} has a {len(cont)}-token continuation, more than "
                                       f"max_length {L}")
            window = (list(ctx) + list(cont))[-(L + 1):]
            cut.append((window[: len(window) - len(cont)], list(cont)))
        # identical pairs (multiple-choice tasks repeat them) are scored once
        unique: dict[tuple, int] = {}
        keys = [(tuple(c), tuple(t)) for c, t in cut]
        for k in keys:
            unique.setdefault(k, len(unique))
        todo = sorted(unique, key=lambda k: (-(len(k[0]) + len(k[1])), k[0] + k[1]))
        step = self.batch_size * SCORE_CHUNK
        scored: dict[tuple, Any] = {}
        with tqdm(total=len(todo), desc=desc, disable=disable_tqdm) as bar:
            for start in range(0, len(todo), step):
                chunk = todo[start:start + step]
                results = score(self.config, self.params, [(list(c), list(t)) for c, t in chunk],
                                batch_size=self.batch_size, mesh=self.mesh, dtype=self.dtype)
                scored.update(zip(chunk, results))
                bar.update(len(chunk))
        return [scored[k] for k in keys]

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """``[((context, continuation) strings, context ids, continuation ids)] -> [(log-likelihood, is_greedy)]``."""
        results = self._score_pairs([(ctx, cont) for _, ctx, cont in requests], "loglikelihood", disable_tqdm)
        out = []
        for (request_str, _, _), r in zip(requests, results):
            answer = (float(r.sum), bool(r.is_greedy))
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each ``(text,)``: the sum of its tokens' log-probs over lm-eval's disjoint rolling windows."""
        from gptj_jax.scoring import rolling_windows

        pairs, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for pair in rolling_windows(self.tok_encode(string), self.prefix_token_id, self.max_length):
                pairs.append(pair)
                owner.append(i)
        results = self._score_pairs(pairs, "loglikelihood_rolling", disable_tqdm)
        totals = [0.0] * len(requests)
        for i, r in zip(owner, results):
            totals[i] += float(r.sum)
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------------------ generation
    def _engine(self) -> Any:
        if self._llm is None:
            from gptj_jax.engine import LLM

            self._llm = LLM(self.config, self.params, max_slots=self._slots(), max_len=self.max_length,
                            dtype=self.dtype, mesh=self.mesh, tokenizer=self.tokenizer, max_waiting=1 << 30,
                            kv_cache=self.kv_cache)
        return self._llm

    def _slots(self) -> int:
        if self.mesh is None:
            return self.batch_size
        from gptj_jax import sharding

        data = sharding.axis_size(self.mesh, sharding.logical_to_mesh(("batch",))[0])
        return -(-self.batch_size // data) * data

    def _knobs(self, kwargs: dict, index: int) -> dict:
        """A request's remaining generation_kwargs as GenerationConfig knobs (HF's greedy rule: sampling only
        with ``do_sample`` true and a temperature > 0)."""
        do_sample = bool(kwargs.pop("do_sample", False))
        unknown = sorted(k for k in kwargs if k not in GEN_KNOBS)
        if unknown:
            raise EvalHarnessError(f"generate_until request {index}: generation_kwargs {unknown} are not supported "
                                   f"(supported: until, max_gen_toks, do_sample, {', '.join(GEN_KNOBS)})")
        knobs = {k: v for k, v in kwargs.items() if v is not None}
        if not do_sample or knobs.get("temperature", 1.0) == 0.0:
            for k in ("temperature", "top_k", "top_p", "min_p"):
                knobs.pop(k, None)
            return {"do_sample": False, **knobs}
        knobs.setdefault("seed", self._seed + index)
        return {"do_sample": True, **knobs}

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each ``(context, generation_kwargs)``: greedy (or sampled) text up to the first ``until`` string."""
        llm = self._engine()
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        handles, stops = [], []
        try:
            for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
                if not isinstance(gen_kwargs, dict):
                    raise EvalHarnessError(f"generate_until request {i}: generation_kwargs must be a dict, "
                                           f"got {type(gen_kwargs).__name__}")
                kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
                max_gen = int(kwargs.pop("max_gen_toks"))
                max_ctx = self.max_length - max_gen
                if max_ctx <= 0:
                    raise EvalHarnessError(f"generate_until request {i}: max_gen_toks {max_gen} must be less than "
                                           f"max_length {self.max_length}")
                ids = self.tok_encode(context, left_truncate_len=max_ctx)
                if not ids:
                    raise EvalHarnessError(f"generate_until request {i}: the context {context[:40]!r} has no tokens")
                handles.append(llm.submit(ids, max_new_tokens=max_gen, stop_strings=[s for s in until if s],
                                          suppress_extra_tokens=False, **self._knobs(kwargs, i)))
                stops.append(until)
        except BaseException:
            for h in handles:
                h.cancel()
            llm.run_until_idle()
            raise
        out = []
        with tqdm(total=len(handles), desc="generate_until", disable=disable_tqdm) as bar:
            for req, handle, until in zip(requests, handles, stops):
                result = handle.result()
                bar.update(1)
                if result.error is not None:
                    raise result.error
                text = postprocess_generated_text(self.tok_decode(result.token_ids[0]), until, None)
                self.cache_hook.add_partial("generate_until", req.args, text)
                out.append(text)
        return out


# ---------------------------------------------------------------------------------------- running tasks
def task_manager(include_path: Optional[Union[str, Sequence[str]]] = None) -> Any:
    """lm-eval's ``TaskManager`` with ``include_path`` (a directory of task YAML files, or several); a path
    that is not a directory is an :class:`EvalHarnessError` naming it."""
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
    for p in paths:
        if not os.path.isdir(p):
            raise EvalHarnessError(f"include path {p} is not a directory")
    return TaskManager(include_path=[os.fspath(p) for p in paths] or None)


def check_tasks(tasks: Sequence[str], manager: Any) -> list[str]:
    """The task names, each known to ``manager`` (lm-eval's registry plus the include path), else an
    :class:`EvalHarnessError` naming the unknown ones."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",")]
    names = [str(t).strip() for t in tasks if str(t).strip()]
    if not names:
        raise EvalHarnessError("no tasks given")
    known = set(manager.match_tasks(names))
    missing = [t for t in names if t not in known]
    if missing:
        raise EvalHarnessError(f"unknown lm-eval task(s) {', '.join(missing)} (not in lm-eval's registry or the "
                               "include path; `lm-eval ls tasks` lists them)")
    return names


def load_tasks(tasks: Sequence[str], manager: Any) -> None:
    """Build each task once (lm-eval reads or downloads its dataset here), so a task whose data cannot be had
    fails now with an :class:`EvalHarnessError` naming it."""
    for name in tasks:
        try:
            manager.load([name])
        except Exception as e:  # lm-eval / datasets raise many kinds (network, cache, config): name the task
            raise EvalHarnessError(f"lm-eval task {name!r} could not be loaded ({type(e).__name__}: {e}); its dataset "
                                   "must be reachable or in the Hugging Face datasets cache") from e


def evaluate(lm: GPTJLM, tasks: Sequence[str], *, manager: Any = None, include_path: Any = None,
             limit: Optional[float] = None, num_fewshot: Optional[int] = None, log_samples: bool = False,
             seed: int = 0, bootstrap_iters: int = 100000) -> dict:
    """``lm_eval.simple_evaluate`` of ``lm`` on ``tasks``; returns lm-eval's results dict (``results``,
    ``groups``, ``configs``, ``samples`` with ``log_samples``...)."""
    import lm_eval

    manager = manager or task_manager(include_path)
    names = check_tasks(tasks, manager)
    return lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=log_samples,
        random_seed=seed, bootstrap_iters=bootstrap_iters,
    )


def flat_metrics(results: dict, prefix: str = "harness") -> dict[str, float]:
    """lm-eval's ``results["results"]`` as flat ``{f"{prefix}_{task}_{metric}": value}`` (the filter name is
    kept unless it is ``none``; standard errors and non-numbers are left out), for metrics.jsonl / TensorBoard."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}_{filt}"
            if math.isfinite(value):
                flat[f"{prefix}_{task}_{name}".replace(" ", "_")] = float(value)
    return flat


def format_results(results: dict) -> str:
    """lm-eval's results table (and its groups table when there are groups), as ``lm-eval`` prints them."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def write_results(results: dict, output_path: str, samples: bool = False) -> list[str]:
    """Write ``results_<time>.json`` (and with ``samples`` one ``samples_<task>_<time>.jsonl`` per task) into the
    directory ``output_path``; each file is written to a temporary sibling then renamed, and an existing
    file is never overwritten. Returns the paths written."""
    import json

    from lm_eval.utils import handle_non_serializable

    os.makedirs(output_path, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime())
    files = {f"results_{stamp}.json": json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2,
                                                  default=handle_non_serializable, ensure_ascii=False)}
    if samples:
        for task, rows in results.get("samples", {}).items():
            files[f"samples_{task}_{stamp}.jsonl"] = "".join(
                json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows)
    written = []
    for name, text in files.items():
        path = os.path.join(output_path, name)
        if os.path.exists(path):
            raise FileExistsError(f"{path} already exists; not overwriting it")
        tmp = path + f".tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        written.append(path)
    return written


class TrainingHarness:
    """The training loop's ``eval_harness_tasks``: checked once at start-up (task names, tokenizer against
    the model's vocabulary), then :meth:`run` on the current params every ``val_every`` steps.

    Every process of a multi-host run calls :meth:`run` with the same (global) params and requests, so the
    scoring and decoding programs run on the whole mesh in step; each process computes the same results
    (lm-eval's rank 0 of 1) and the loop's logger writes them on process 0 only.
    """

    def __init__(self, tasks: Sequence[str], *, config: Any, tokenizer: Any, mesh: Any = None, dtype: Any = None,
                 batch_size: int = 8, limit: Optional[int] = None, include_path: Optional[str] = None) -> None:
        self.manager = task_manager(include_path)
        self.tasks = check_tasks(list(tasks), self.manager)
        load_tasks(self.tasks, self.manager)  # their datasets now, not at the first evaluation hours later
        self.config, self.tokenizer, self.mesh, self.dtype = config, tokenizer, mesh, dtype
        self.batch_size, self.limit = batch_size, limit
        if len(tokenizer) > config.vocab_size:
            raise EvalHarnessError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                                   f"{config.vocab_size}: its ids would fall outside the vocabulary")

    def run(self, params: Any) -> dict[str, float]:
        """The tasks on ``params``: ``{"harness_<task>_<metric>": value}`` (see :func:`flat_metrics`)."""
        lm = GPTJLM(config=self.config, params=params, tokenizer=self.tokenizer, batch_size=self.batch_size,
                    dtype=self.dtype, mesh=self.mesh)
        results = evaluate(lm, self.tasks, manager=self.manager, limit=self.limit)
        return flat_metrics(results)
