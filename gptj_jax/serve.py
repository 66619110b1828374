"""``gptj-jax serve``: an OpenAI-compatible completions server on the inference engine.

Endpoints (FastAPI on uvicorn; the optional extra ``pip install gptj-jax[serve]``):

* ``POST /v1/completions``: OpenAI's (legacy) completions API, plus vLLM's extras ``top_k``, ``min_p``,
  ``repetition_penalty``, ``ignore_eos``, ``min_tokens``. Streams as server-sent events (``data: {...}``
  chunks, then ``data: [DONE]``).
* ``GET /v1/models``, ``GET /health`` (503 until the common programs are compiled and warm, then 200),
  ``GET /metrics`` (Prometheus text). ``POST /v1/chat/completions`` answers 404: GPT-J is not a chat model.

How it runs. The :class:`~gptj_jax.engine.Scheduler` (continuous batching over ``max_slots`` decode slots)
runs in its own thread (``Scheduler.start()``); request handlers run on uvicorn's event loop and only
``submit`` / ``cancel`` requests: each prompt of a request is one engine request whose chunks come back
through its callback (``loop.call_soon_threadsafe`` onto an ``asyncio.Queue``), so HTTP handling never
blocks decoding and decoding never waits for a client. A client that disconnects (mid-stream or while
waiting) has its requests cancelled: their slots are refilled before the next decode step.

Log-probabilities. ``logprobs`` (top-k, ``k <= 5``) and ``echo`` + ``logprobs`` come from the scoring API,
not from the sampler: after generation, ``gptj_jax.score`` gives each token's log-probability under the
model's plain distribution (full vocabulary, no temperature or processors: what lm-eval compares against),
and one forward pass (:func:`_top_logprobs`) gives the top-k alternatives of each position; where the chosen
token is the argmax its top-k entry carries ``score``'s value, so ``token == max(top)`` is lm-eval's
``is_greedy``. ``echo`` with ``max_tokens`` 0 or 1 at temperature 0 (lm-eval's ``local-completions``
scoring request) runs that pass alone, no decode slot: the prompt may then fill the model's whole context.

Errors are OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad field (named in
``param``; pydantic's validation errors are mapped to it), 404 for an unknown model or route, 400 with code
``context_length_exceeded`` for a prompt longer than the model allows, 429 when ``max_waiting`` requests
already wait for a slot, 503 while warming up or shutting down, 500 if the engine fails (the server goes on).

SIGTERM (or Ctrl-C): new requests get 503, running ones finish for up to ``grace`` seconds, the rest are
cancelled (a clean 503 error, or an error event on a stream), then the process exits 0. A second signal
exits at once. No authentication: the default bind is 127.0.0.1; put a proxy in front to expose it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from jax import lax
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import GPTJConfig
from .engine import LLM, QueueFullError, RequestChunk, RequestOutput, Scheduler, SchedulerStoppedError
from .generation import bucket
from .generation_config import SEED_LIMIT, GenerationConfig, GenerationError
from .model import GPTJModel
from .tokenizer import NUM_REAL_TOKENS

Array = jax.Array
Params = Any

__all__ = ["CompletionRequest", "ServerState", "create_app", "serve"]

logger = logging.getLogger("gptj_jax.serve")

TOP_LOGPROBS = 5  # the most alternatives per token (OpenAI's limit); the top-k pass always computes this many
DEFAULT_MAX_TOKENS = 16  # OpenAI's default
# GenerationConfig's field names -> the request's
PARAM_OF_FIELD = {"max_new_tokens": "max_tokens", "num_return_sequences": "n", "stop_strings": "stop",
                  "min_new_tokens": "min_tokens", "eos_token_id": "ignore_eos"}
FINISH_REASON = {"eos": "stop", "stop_string": "stop", "length": "length"}


# ---------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _bad(param: Optional[str], message: str, code: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def _unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, "service_unavailable", None, code)


# ---------------------------------------------------------------------------------------- the request body
Number = Optional[float]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions`` (unknown fields are ignored, as OpenAI and vLLM do)."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[StrictStr] = None
    prompt: Any = Field(..., description="a string, a list of strings, token ids, or a list of token-id lists")
    max_tokens: Optional[StrictInt] = Field(DEFAULT_MAX_TOKENS, ge=0)
    temperature: Number = Field(1.0, ge=0, strict=True, allow_inf_nan=False)
    top_p: Number = Field(1.0, gt=0, le=1, strict=True, allow_inf_nan=False)
    n: StrictInt = Field(1, ge=1)
    stop: Union[None, StrictStr, list[StrictStr]] = None
    seed: Optional[StrictInt] = Field(None, ge=0, lt=SEED_LIMIT)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=TOP_LOGPROBS)
    echo: StrictBool = False
    presence_penalty: Number = Field(0.0, strict=True, allow_inf_nan=False)
    frequency_penalty: Number = Field(0.0, strict=True, allow_inf_nan=False)
    best_of: Optional[StrictInt] = Field(None, ge=1)
    suffix: Optional[StrictStr] = None
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[StrictStr] = None
    # vLLM's extras
    use_beam_search: StrictBool = False
    top_k: Optional[StrictInt] = Field(None, ge=-1)
    min_p: Number = Field(0.0, ge=0, le=1, strict=True, allow_inf_nan=False)
    repetition_penalty: Number = Field(1.0, gt=0, strict=True, allow_inf_nan=False)
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)


@dataclasses.dataclass
class _Prompt:
    ids: list[int]
    text: Optional[str]  # as given, for a text prompt


# ---------------------------------------------------------------------------------------- log-probabilities
@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _top_logprobs_fn(params: Params, tokens: Array, length: Array, suppress_from: Array, *, config: GPTJConfig,
                     dtype: Any) -> tuple[Array, Array, Array]:
    """tokens ``[1, T]`` right-padded (real up to ``length``) -> the top-``TOP_LOGPROBS`` log-probs ``[1, T, 5]``
    float32 and ids ``[1, T, 5]`` of the next token at every position (the model's plain log-softmax over the
    whole vocabulary, the LM head in float32 as ``scoring`` computes it), and the greedy next token after the
    last real position ``[1]`` (ids ``>= suppress_from`` banned, as the engine's suppression)."""
    T = tokens.shape[1]
    mask = jnp.arange(T, dtype=jnp.int32)[None, :] < length[:, None]  # [1, T]
    h = GPTJModel(config, dtype=dtype).apply(
        {"params": params["transformer"]}, jnp.where(mask, tokens, 0), attention_mask=mask
    ).last_hidden_state  # [1, T, D]
    h = h.astype(dtype).astype(jnp.float32)
    head = params["lm_head"]
    logits = jnp.einsum("BTD,DV->BTV", h, head["kernel"].astype(jnp.float32),
                        preferred_element_type=jnp.float32) + head["bias"].astype(jnp.float32)  # [1, T, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    values, ids = lax.top_k(logp, TOP_LOGPROBS)
    last = jnp.take_along_axis(logits, (length - 1)[:, None, None], axis=1)[:, 0]  # [1, V]
    allowed = jnp.arange(logits.shape[-1])[None, :] < suppress_from
    nxt = jnp.argmax(jnp.where(allowed, last, -jnp.inf), axis=-1).astype(jnp.int32)  # [1]
    return values, ids.astype(jnp.int32), nxt


def _top_logprobs(engine: Any, seq: Sequence[int], suppress: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """The top-k pass over ``seq`` (<= n_positions tokens): (values ``[L, 5]``, ids ``[L, 5]``, greedy next id)."""
    config = engine.config
    L = len(seq)
    T = min(bucket(L, 8), config.n_positions)
    tokens = np.zeros((1, T), np.int32)
    tokens[0, :L] = seq
    suppress_from = NUM_REAL_TOKENS if suppress and config.vocab_size > NUM_REAL_TOKENS else config.vocab_size
    values, ids, nxt = _top_logprobs_fn(engine.params, jnp.asarray(tokens), jnp.asarray([L], jnp.int32),
                                        jnp.asarray(suppress_from, jnp.int32), config=config, dtype=engine.dtype)
    values, ids, nxt = jax.device_get((values, ids, nxt))
    return np.asarray(values[0, :L]), np.asarray(ids[0, :L]), int(nxt[0])


# ---------------------------------------------------------------------------------------- metrics
class _Metrics:
    """Counters and gauges, written as Prometheus text by ``GET /metrics``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.slot_assignments = 0
        self.cancelled: dict[str, int] = {}  # reason -> engine requests cancelled
        self.latency_sum = 0.0
        self.latency_count = 0
        self.busy_seconds = 0.0  # wall time with at least one busy slot
        self.step_seconds = 0.0  # recent wall time per decode step

    def count(self, endpoint: str, status: Union[int, str]) -> None:
        with self.lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def add(self, **values: float) -> None:
        with self.lock:
            for name, value in values.items():
                setattr(self, name, getattr(self, name) + value)

    def cancel(self, reason: str, n: int = 1) -> None:
        with self.lock:
            self.cancelled[reason] = self.cancelled.get(reason, 0) + n


# ---------------------------------------------------------------------------------------- the server state
class ServerState:
    """What the app serves: the scheduler (engine), tokenizer, model name, readiness and metrics."""

    def __init__(self, scheduler: Scheduler, *, model_name: str, tokenizer: Any, max_scoring: int = 4,
                 warmup: bool = True):
        if tokenizer is None:
            raise ValueError("the server needs a tokenizer (text prompts and completions)")
        self.scheduler = scheduler
        self.engine = scheduler.engine
        self.config: GPTJConfig = scheduler.engine.config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.created = int(time.time())
        self.metrics = _Metrics()
        self.ready = threading.Event()
        self.draining = False
        self.warm_error: Optional[BaseException] = None
        self.warmup = warmup
        self.max_scoring = max_scoring
        self._scoring: Optional[asyncio.Semaphore] = None
        self._scoring_waiting = 0
        self._monitor_stop = threading.Event()
        self.on_fatal: Any = None  # called when warm-up fails (serve() makes the server exit)

    # ---- limits
    @property
    def context_limit(self) -> int:
        """Prompt + max_tokens at most (the engine's slots and the model's positions)."""
        return min(self.engine.max_len, self.config.n_positions)

    def busy_slots(self) -> int:
        return self.scheduler.num_busy_slots

    # ---- lifecycle
    def start(self) -> None:
        if not self.scheduler.running:
            self.scheduler.start()
        threading.Thread(target=self._monitor, name="gptj-jax-metrics", daemon=True).start()
        if self.warmup:
            threading.Thread(target=self._warm, name="gptj-jax-warmup", daemon=True).start()
        else:
            self.ready.set()

    def stop(self, grace: Optional[float] = 0.0) -> None:
        """Refuse new requests; let running ones finish for ``grace`` seconds, cancel the rest; stop the thread."""
        self.draining = True
        self._monitor_stop.set()
        if self.scheduler.running:
            live = self.scheduler.num_live
            self.scheduler.stop(grace)
            if live:
                logger.info("engine stopped (%d requests were in flight at the signal)", live)

    def _warm(self) -> None:
        """Compile and run the common programs: greedy and sampled decoding, the smallest prompt bucket, the
        scoring and top-k passes."""
        t0 = time.perf_counter()
        try:
            ids = [0] * min(4, self.context_limit - 2)
            greedy = self.scheduler.submit(ids, max_new_tokens=2, do_sample=False)
            greedy.result()
            # the scheduler's step program serves the union of the processors seen so far (it only grows):
            # after this, greedy and temperature sampling share one compiled step
            sampled = self.scheduler.submit(ids, max_new_tokens=2, do_sample=True, temperature=0.7, seed=0)
            sampled.result()
            from .scoring import score

            score(self.config, self.engine.params, [(ids[:1], ids[1:])], batch_size=1, mesh=self.engine.mesh)
            _top_logprobs(self.engine, ids, True)
        except BaseException as e:  # noqa: BLE001 - reported, and the server exits (serve())
            self.warm_error = e
            logger.error("warm-up failed: %s: %s", type(e).__name__, e)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        logger.info("warm: compiled and ran the common programs in %.1f s", time.perf_counter() - t0)
        self.ready.set()

    def _monitor(self) -> None:
        """Sample the decode-step counter: wall time per step while slots are busy."""
        last_t, last_steps, last_busy = time.perf_counter(), self.scheduler.steps, False
        while not self._monitor_stop.wait(0.2):
            t, steps, busy = time.perf_counter(), self.scheduler.steps, self.busy_slots() > 0
            if last_busy or busy:
                self.metrics.add(busy_seconds=t - last_t)
                if steps > last_steps:
                    with self.metrics.lock:
                        self.metrics.step_seconds = (t - last_t) / (steps - last_steps)
            last_t, last_steps, last_busy = t, steps, busy

    # ---- checks common to every request
    def check_serving(self) -> None:
        if self.draining:
            raise _unavailable("the server is shutting down: it accepts no new requests", "shutting_down")
        if not self.ready.is_set():
            raise _unavailable("the server is warming up (compiling); retry once GET /health returns 200",
                               "warming_up")

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist: this server serves '{self.model_name}' "
                                "(GET /v1/models)", "invalid_request_error", "model", "model_not_found")

    # ---- prompts
    def prompts(self, prompt: Any) -> list[_Prompt]:
        """The request's prompts, tokenized and checked against the vocabulary (errors name ``prompt``)."""
        V = self.config.vocab_size

        def ids_of(value: list, where: str) -> list[int]:
            if not value:
                raise _bad("prompt", f"{where} is empty: a prompt needs at least one token")
            for i, t in enumerate(value):
                if not isinstance(t, int) or isinstance(t, bool):
                    raise _bad("prompt", f"{where}[{i}] = {t!r:.40} is not a token id (an integer)")
                if not 0 <= t < V:
                    raise _bad("prompt", f"{where}[{i}] = {t} is outside the vocabulary [0, {V})")
            return list(value)

        def text_of(value: str, where: str) -> _Prompt:
            ids = self.tokenizer(value)["input_ids"]
            if not ids:
                raise _bad("prompt", f"{where} is empty: a prompt needs at least one token")
            bad = [t for t in ids if not 0 <= t < V]
            if bad:
                raise _bad("prompt", f"{where} tokenizes to id {bad[0]}, outside the model's vocabulary [0, {V})")
            return _Prompt(list(ids), value)

        if isinstance(prompt, str):
            return [text_of(prompt, "prompt")]
        if not isinstance(prompt, list) or not prompt:
            raise _bad("prompt", "prompt must be a string, a list of strings, a list of token ids or a list of "
                                 f"token-id lists (non-empty), got {type(prompt).__name__} {prompt!r:.40}")
        if all(isinstance(p, str) for p in prompt):
            return [text_of(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        if all(isinstance(p, list) for p in prompt):
            return [_Prompt(ids_of(p, f"prompt[{i}]"), None) for i, p in enumerate(prompt)]
        if all(not isinstance(p, (list, str, dict)) for p in prompt):
            return [_Prompt(ids_of(prompt, "prompt"), None)]
        raise _bad("prompt", "prompt mixes types: pass one string, a list of strings, a list of token ids or a "
                             "list of token-id lists")

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one state per server
    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    # ---- scoring (echo / logprobs), run in a worker thread
    def scoring_slot(self) -> asyncio.Semaphore:
        if self._scoring is None:
            self._scoring = asyncio.Semaphore(self.max_scoring)
        return self._scoring

    def logprobs(self, seq: list[int], first: int, suppress: bool) -> tuple[list[float], np.ndarray, np.ndarray, int]:
        """Log-probs of ``seq[first:]`` (``first >= 1``) by ``gptj_jax.score``, the top-k of the positions before
        them, and the greedy token after ``seq``. Top-k entries equal to the chosen token carry score's value."""
        from .scoring import score

        scored: list[float] = []
        if first < len(seq):
            (result,) = score(self.config, self.engine.params, [(seq[:first], seq[first:])], batch_size=1,
                              mesh=self.engine.mesh)
            scored = [float(v) for v in result.logprobs]
        values, ids, nxt = _top_logprobs(self.engine, seq, suppress)
        values = values.astype(np.float64)
        for j, t in enumerate(range(first, len(seq))):
            hit = np.flatnonzero(ids[t - 1] == seq[t])
            if hit.size:
                values[t - 1, hit[0]] = scored[j]
        return scored, values, ids, nxt


# ---------------------------------------------------------------------------------------- responses
def _logprobs_object(state: ServerState, tokens: list[int], lps: list[Optional[float]], tops: list[Optional[dict]],
                     offset: int) -> dict:
    texts = [state.token_text(t) for t in tokens]
    offsets, at = [], offset
    for s in texts:
        offsets.append(at)
        at += len(s)
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _top_dict(state: ServerState, values: np.ndarray, ids: np.ndarray, k: int) -> dict:
    out: dict[str, float] = {}
    for v, t in zip(values[:k], ids[:k]):
        out.setdefault(state.token_text(int(t)), float(v))
    return out


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def _holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of a partial text to hold back: an incomplete UTF-8 character, or the
    start of a stop string that the next tokens may complete."""
    keep = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


@dataclasses.dataclass
class _Job:
    """One completions request: its prompts, knobs and engine requests."""

    body: CompletionRequest
    prompts: list[_Prompt]
    gc: Optional[GenerationConfig]  # None: no generation (max_tokens 0)
    rows: int  # engine rows per prompt (n, or 1 when greedy n > 1 is replicated)
    copies: int  # choices per engine row
    stops: tuple[str, ...]
    scoring_only: bool  # echo with max_tokens <= 1, greedy: one top-k pass, no decode slot
    suppress: bool
    id: str = dataclasses.field(default_factory=lambda: "cmpl-" + secrets.token_hex(12))
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    handles: list = dataclasses.field(default_factory=list)
    inbox: Optional["_Inbox"] = None


class _Inbox:
    """Chunks from the scheduler's thread to the event loop, with one wake-up per batch: the callback appends
    under a lock and schedules a wake-up only when none is pending, so a fast decode loop is never slowed by
    a thread hand-off per step (the event loop takes whatever piled up meanwhile)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.scheduled = False
        self.event = asyncio.Event()

    def put(self, item: Any) -> None:  # scheduler thread
        with self.lock:
            self.items.append(item)
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self.lock:
            self.scheduled = False
        self.event.set()

    async def get(self) -> list:
        """Everything that arrived since the last call (waits for at least one item)."""
        while True:
            with self.lock:
                if self.items:
                    out = list(self.items)
                    self.items.clear()
                    return out
                self.event.clear()
            await self.event.wait()


def _plan(state: ServerState, body: CompletionRequest) -> _Job:
    """Check the knobs and the prompts; no engine work. Raises :class:`APIError` naming the field."""
    if body.presence_penalty:
        raise _bad("presence_penalty", f"presence_penalty {body.presence_penalty} is not supported (only 0); "
                                       "use repetition_penalty (vLLM's extra field) instead")
    if body.frequency_penalty:
        raise _bad("frequency_penalty", f"frequency_penalty {body.frequency_penalty} is not supported (only 0); "
                                        "use repetition_penalty (vLLM's extra field) instead")
    if body.use_beam_search:
        raise _bad("use_beam_search", "beam search is not served: the engine's decode slots run greedy and sampled "
                                      "decoding (gptj_jax.beam.beam_search runs it offline)")
    if body.best_of is not None and body.best_of != body.n:
        raise _bad("best_of", f"best_of {body.best_of} != n {body.n} is not supported: omit best_of (or pass n)")
    if body.suffix:
        raise _bad("suffix", "suffix (insertion) is not supported by GPT-J")
    if body.logit_bias:
        raise _bad("logit_bias", "logit_bias is not supported")
    if body.stream and body.logprobs is not None:
        raise _bad("logprobs", "logprobs are not streamed: ask with stream false")
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    temperature = 1.0 if body.temperature is None else body.temperature
    greedy = temperature == 0
    if body.n > state.engine.max_slots and not greedy:
        raise _bad("n", f"n {body.n} > the server's {state.engine.max_slots} decode slots (--max-slots)")
    stops = () if body.stop is None else (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    if any(not s for s in stops):
        raise _bad("stop", "stop strings must not be empty")
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    knobs = dict(
        max_new_tokens=max(max_tokens, 1), min_new_tokens=min(body.min_tokens, max(max_tokens, 1)),
        do_sample=not greedy, temperature=1.0 if greedy else temperature, top_k=top_k,
        top_p=1.0 if body.top_p is None else body.top_p, min_p=body.min_p or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        stop_strings=stops, num_return_sequences=1 if greedy else body.n,
        seed=secrets.randbits(63) if body.seed is None else body.seed,
    )
    if body.ignore_eos:
        knobs["eos_token_id"] = ()
    if body.min_tokens > max_tokens:
        raise _bad("min_tokens", f"min_tokens ({body.min_tokens}) must be <= max_tokens ({max_tokens})")
    try:
        gc = GenerationConfig(**knobs)
        plan = state.engine.plan(gc, tokenizer=state.tokenizer)
    except GenerationError as e:
        field = getattr(e, "field", None)
        raise _bad(PARAM_OF_FIELD.get(field, field), str(e)) from None
    prompts = state.prompts(body.prompt)
    plain_greedy = greedy and not (body.min_tokens or body.repetition_penalty not in (None, 1.0) or stops)
    scoring_only = body.echo and max_tokens <= 1 and plain_greedy
    limit = state.context_limit if not scoring_only else state.config.n_positions
    for i, p in enumerate(prompts):
        need = len(p.ids) + (0 if scoring_only else max_tokens)
        if need > limit:
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise _bad("prompt", f"{where} is too long: {len(p.ids)} tokens + max_tokens {max_tokens} = "
                                 f"{len(p.ids) + max_tokens} > this server's context of {limit} tokens",
                       "context_length_exceeded")
    return _Job(body, prompts, gc if max_tokens > 0 and not scoring_only else None,
                1 if greedy else body.n, body.n if greedy else 1, stops, scoring_only, plan.suppress)


async def _submit(state: ServerState, job: _Job) -> None:
    """Submit every prompt to the engine (all or none: a refusal cancels those already submitted). Each
    prompt's chunks go to the job's inbox as ``(prompt index, chunk)``; without streaming only the last."""
    inbox = job.inbox = _Inbox(asyncio.get_running_loop())
    every = job.body.stream
    try:
        for i, p in enumerate(job.prompts):

            def callback(chunk: RequestChunk, i: int = i) -> None:
                if every or chunk.output is not None:
                    inbox.put((i, chunk))

            job.handles.append(state.scheduler.submit(p.ids, job.gc, callback=callback))
    except BaseException as e:
        _cancel(state, job, None)
        if isinstance(e, QueueFullError):
            raise APIError(429, f"the server is busy: {e}", "rate_limit_exceeded", None, "queue_full") from None
        if isinstance(e, SchedulerStoppedError):
            raise _unavailable("the server is shutting down: it accepts no new requests", "shutting_down") from None
        if isinstance(e, GenerationError):
            field = getattr(e, "field", None)
            raise _bad(PARAM_OF_FIELD.get(field, field) or "prompt", str(e)) from None
        raise


def _cancel(state: ServerState, job: _Job, reason: Optional[str]) -> int:
    """Cancel the job's unfinished engine requests; returns how many."""
    n = 0
    for h in job.handles:
        if not h.done() and h.cancel():
            n += 1
    if n and reason:
        state.metrics.cancel(reason, n)
    return n


def _account(state: ServerState, job: _Job, outputs: Sequence[Optional[RequestOutput]]) -> tuple[int, int]:
    prompt_tokens = sum(len(p.ids) for p in job.prompts)
    completion = sum(sum(o.num_new_tokens) * job.copies for o in outputs if o is not None)
    slots = sum(len(o.slots) for o in outputs if o is not None)
    state.metrics.add(prompt_tokens=prompt_tokens, generation_tokens=completion, slot_assignments=slots)
    return prompt_tokens, completion


def _check_output(output: RequestOutput, draining: bool) -> None:
    if output.error is not None:
        raise APIError(500, f"the engine failed on this request: {type(output.error).__name__}: {output.error}",
                       "server_error", None, "engine_error")
    if "cancelled" in output.finish_reasons:
        if draining:
            raise _unavailable("the server shut down before this request finished (cancelled)", "shutting_down")
        raise _unavailable("the request was cancelled", "cancelled")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _complete(state: ServerState, job: _Job, request: Request) -> dict:
    """A non-streamed completion: wait for every prompt's output (cancelling if the client leaves), then
    build the choices (log-probs by the scoring API when asked)."""
    body = job.body
    outputs: list[Optional[RequestOutput]] = [None] * len(job.prompts)
    if job.gc is not None:
        await _submit(state, job)
        try:
            while any(o is None for o in outputs):
                try:
                    items = await asyncio.wait_for(job.inbox.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        _cancel(state, job, "disconnect")
                        raise APIError(499, "client disconnected", "client_closed") from None  # nobody reads it
                    continue
                for i, chunk in items:
                    outputs[i] = chunk.output
        finally:
            if any(o is None for o in outputs):
                _cancel(state, job, "disconnect")
        for o in outputs:
            _check_output(o, state.draining)
    prompt_tokens, completion_tokens = _account(state, job, outputs)

    need_pass = body.logprobs is not None or job.scoring_only
    choices = []
    for i, p in enumerate(job.prompts):
        out = outputs[i]
        prompt_text = p.text if p.text is not None else state.text(p.ids)
        rows = out.token_ids if out is not None else [[]]
        reasons = [FINISH_REASON.get(r, r) for r in out.finish_reasons] if out is not None else ["length"]
        per_row = []
        for r, tokens in enumerate(rows):
            text, stopped = _cut_at_stop(state.text(tokens), job.stops)
            per_row.append([tokens, text, "stop" if stopped else reasons[r]])
        if job.scoring_only and (body.max_tokens or 0) >= 1:
            per_row[0][0] = None  # filled by the pass below
        lp_rows: list[Optional[dict]] = [None] * len(per_row)
        nxt_top: Optional[dict] = None
        if need_pass:
            async with state.scoring_slot():
                for r, row in enumerate(per_row):
                    tokens = row[0]
                    seq = p.ids + (tokens or [])
                    first = 1 if body.echo else len(p.ids)
                    scored, values, ids, nxt = await asyncio.to_thread(state.logprobs, seq, first, job.suppress)
                    if tokens is None:  # scoring-only: the greedy token from the same pass
                        tokens = [nxt]
                        row[0], row[1], row[2] = tokens, state.text(tokens), "length"
                        completion_tokens += job.copies
                        state.metrics.add(generation_tokens=job.copies)
                        nv, ni = values[-1], ids[-1]
                        gen_lp = float(nv[ni == nxt][0]) if (ni == nxt).any() else None
                        scored = scored + [gen_lp]
                        nxt_top = _top_dict(state, nv, ni, body.logprobs or 0)
                    if body.logprobs is None:
                        continue
                    k = body.logprobs
                    shown = (p.ids if body.echo else []) + tokens
                    lps: list[Optional[float]] = ([None] if body.echo else []) + scored
                    tops: list[Optional[dict]] = [None] if body.echo else []
                    for t in range(first, len(seq)):
                        tops.append(_top_dict(state, values[t - 1], ids[t - 1], k))
                    if len(tops) < len(shown):
                        tops.append(nxt_top if job.scoring_only else None)
                    lps = lps[: len(shown)]
                    offset = 0 if body.echo else len(prompt_text)
                    lp_rows[r] = _logprobs_object(state, shown, lps, tops, offset)
        for r, (_, text, reason) in enumerate(per_row):
            for _ in range(job.copies):
                choices.append({"index": len(choices), "text": (prompt_text if body.echo else "") + text,
                                "logprobs": lp_rows[r], "finish_reason": reason})
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": state.model_name,
            "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


def _sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":")) + "\n\n"


async def _stream(state: ServerState, job: _Job) -> AsyncIterator[str]:
    """Server-sent events: one chunk per engine chunk and choice with the new text, the finish reason on the
    choice's last chunk, an optional usage chunk, then ``[DONE]``. Text that may be the start of a stop
    string (or half a UTF-8 character) is held back until the next tokens decide."""
    body = job.body
    head = {"id": job.id, "object": "text_completion", "created": job.created, "model": state.model_name}

    def chunk(index: int, text: str, reason: Optional[str]) -> str:
        return _sse({**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]})

    n_choices = len(job.prompts) * job.rows * job.copies
    if body.echo:
        for i, p in enumerate(job.prompts):
            text = p.text if p.text is not None else state.text(p.ids)
            for c in range(job.rows * job.copies):
                yield chunk(i * job.rows * job.copies + c, text, None)
    outputs: list[Optional[RequestOutput]] = [None] * len(job.prompts)
    if job.gc is None:  # max_tokens 0: the prompt only
        for c in range(n_choices):
            yield chunk(c, "", "length")
    else:
        tokens = [[[] for _ in range(job.rows)] for _ in job.prompts]
        sent = [[0] * job.rows for _ in job.prompts]
        while any(o is None for o in outputs):
            touched: dict[int, None] = {}
            for i, ch in await job.inbox.get():  # every chunk that arrived since the last wake-up
                if ch.output is not None:
                    _check_output(ch.output, state.draining)
                    outputs[i] = ch.output
                for r in range(job.rows):
                    tokens[i][r] = list(ch.output.token_ids[r]) if ch.output is not None else tokens[i][r] + ch.tokens[r]
                touched[i] = None
            for i in touched:
                final = outputs[i]
                for r in range(job.rows):
                    text = state.text(tokens[i][r])
                    reason = None
                    if final is not None:
                        text, stopped = _cut_at_stop(text, job.stops)
                        reason = "stop" if stopped else FINISH_REASON.get(final.finish_reasons[r], "stop")
                        end = len(text)
                    else:
                        end = len(text) - _holdback(text, job.stops)
                    if end > sent[i][r] or reason is not None:
                        delta = text[sent[i][r]: end]
                        sent[i][r] = max(sent[i][r], end)
                        for c in range(job.copies):
                            yield chunk((i * job.rows + r) * job.copies + c, delta, reason)
    prompt_tokens, completion_tokens = _account(state, job, outputs)
    if body.stream_options is not None and body.stream_options.include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events whose engine requests are cancelled however the response ends (client gone)."""

    def __init__(self, content: AsyncIterator[str], on_close: Any):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _guarded_stream(state: ServerState, job: _Job) -> AsyncIterator[str]:
    try:
        async for event in _stream(state, job):
            yield event
        state.metrics.count("/v1/completions", 200)
    except APIError as e:  # headers are sent: the error is an event
        state.metrics.count("/v1/completions", e.status)
        yield _sse(e.body())
        yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------- the app
def create_app(state_or_scheduler: Union[ServerState, Scheduler], *, model_name: str = "gptj",
               tokenizer: Any = None, warmup: bool = True) -> FastAPI:
    """The FastAPI app serving ``state_or_scheduler`` (a :class:`ServerState`, or a scheduler / ``LLM`` plus
    ``model_name`` and ``tokenizer``). Starting the app (its lifespan) starts the scheduler's thread and the
    warm-up; stopping it stops them (cancelling what is in flight)."""
    from contextlib import asynccontextmanager

    if isinstance(state_or_scheduler, ServerState):
        state = state_or_scheduler
    else:
        state = ServerState(state_or_scheduler, model_name=model_name, tokenizer=tokenizer, warmup=warmup)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            state.stop(0.0)

    app = FastAPI(title="gptj-jax", description="OpenAI-compatible completions for GPT-J", lifespan=lifespan)
    app.state.server = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        if request.url.path == "/v1/completions":
            state.metrics.count("/v1/completions", exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ())]
        kind = first.get("type", "")
        if kind == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", first.get("msg", ""))
            err = _bad(None, f"malformed JSON in the request body: {detail}", "invalid_json")
        elif loc in (["body"], []):
            err = _bad(None, f"the request body must be a JSON object: {first.get('msg', '')}", "invalid_body")
        else:
            param = ".".join(loc[1:]) if loc and loc[0] == "body" else ".".join(loc)
            got = first.get("input")
            message = f"{param}: {first.get('msg', 'invalid value')}"
            if kind != "missing":
                message += f" (got {json.dumps(got)[:60] if _jsonable(got) else repr(got)[:60]})"
            if len(errors) > 1:
                others = sorted({".".join(str(p) for p in e.get("loc", ())[1:]) for e in errors[1:]} - {param})
                if others:
                    message += f"; also invalid: {', '.join(others)}"
            err = _bad(param, message, "missing_field" if kind == "missing" else "invalid_value")
        if request.url.path == "/v1/completions":
            state.metrics.count("/v1/completions", 400)
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}: this server serves /v1/completions, " \
                      "/v1/models, /health and /metrics"
        return APIError(exc.status_code, message, "invalid_request_error", None, None).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        if request.url.path == "/v1/completions":
            state.metrics.count("/v1/completions", 500)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        state.check_serving()
        state.check_model(body.model)
        t0 = time.perf_counter()
        job = await asyncio.to_thread(_plan, state, body)
        if body.stream:
            if job.scoring_only:
                raise _bad("stream", "echo with max_tokens <= 1 at temperature 0 (scoring) is not streamed: ask "
                                     "with stream false")
            if job.gc is not None:
                await _submit(state, job)

            def closed() -> None:
                if _cancel(state, job, "disconnect"):
                    state.metrics.count("/v1/completions", 499)  # the client left mid-stream

            return _EventStream(_guarded_stream(state, job), closed)
        if job.scoring_only:
            scoring = state.scoring_slot()
            if scoring.locked() and state._scoring_waiting >= state.scheduler.max_waiting:
                raise APIError(429, f"the server is busy: {state._scoring_waiting} scoring requests are waiting",
                               "rate_limit_exceeded", None, "queue_full")
            state._scoring_waiting += 1
            try:
                result = await _complete(state, job, request)
            finally:
                state._scoring_waiting -= 1
        else:
            result = await _complete(state, job, request)
        state.metrics.count("/v1/completions", 200)
        state.metrics.add(latency_sum=time.perf_counter() - t0, latency_count=1)
        return JSONResponse(result)

    @app.post("/v1/chat/completions")
    async def chat_completions() -> JSONResponse:
        return APIError(404, f"GPT-J is not a chat model: /v1/chat/completions is not served; use "
                             f"/v1/completions with a prompt (model '{state.model_name}')", "invalid_request_error",
                        None, "not_a_chat_model").response()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "gptj-jax",
            "max_model_len": state.context_limit,
        }]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        if state.warm_error is not None:
            return JSONResponse({"status": "failed", "error": f"{type(state.warm_error).__name__}: "
                                                              f"{state.warm_error}"}, status_code=503)
        if not state.ready.is_set():
            return JSONResponse({"status": "warming_up"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_prometheus(state), media_type="text/plain; version=0.0.4")

    return app


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _prometheus(state: ServerState) -> str:
    m = state.metrics
    s = state.scheduler
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: Sequence[tuple[str, float]]) -> None:
        lines.append(f"# HELP gptj_jax_{name} {help_}")
        lines.append(f"# TYPE gptj_jax_{name} {kind}")
        for labels, value in samples:
            lines.append(f"gptj_jax_{name}{labels} {value:.9g}" if isinstance(value, float) else
                         f"gptj_jax_{name}{labels} {value}")

    with m.lock:
        requests = sorted(m.requests.items())
        cancelled = sorted(m.cancelled.items())
        snap = {k: getattr(m, k) for k in ("prompt_tokens", "generation_tokens", "slot_assignments", "busy_seconds",
                                           "step_seconds", "latency_sum", "latency_count")}
    metric("requests_total", "counter", "HTTP requests by endpoint and status code",
           [(f'{{endpoint="{e}",status="{c}"}}', n) for (e, c), n in requests])
    metric("prompt_tokens_total", "counter", "prompt tokens of finished requests", [("", snap["prompt_tokens"])])
    metric("generation_tokens_total", "counter", "tokens generated", [("", snap["generation_tokens"])])
    metric("cancelled_total", "counter", "engine requests cancelled, by reason",
           [(f'{{reason="{r}"}}', n) for r, n in cancelled])
    metric("slot_assignments_total", "counter", "decode-slot assignments (rows admitted)",
           [("", snap["slot_assignments"])])
    metric("queue_depth", "gauge", "requests waiting for a decode slot", [("", s.num_waiting)])
    metric("requests_live", "gauge", "engine requests submitted and not finished", [("", s.num_live)])
    metric("busy_slots", "gauge", "decode slots holding a live row", [("", state.busy_slots())])
    metric("max_slots", "gauge", "decode slots", [("", state.engine.max_slots)])
    metric("decode_steps_total", "counter", "decode steps dispatched", [("", s.steps)])
    metric("decode_busy_seconds_total", "counter", "wall time with at least one busy slot",
           [("", float(snap["busy_seconds"]))])
    metric("decode_step_seconds", "gauge", "recent wall time per decode step", [("", float(snap["step_seconds"]))])
    metric("request_latency_seconds", "summary", "completions latency (non-streamed)",
           [("_sum", float(snap["latency_sum"])), ("_count", snap["latency_count"])])
    metric("ready", "gauge", "1 once compiled and warm", [("", int(state.ready.is_set() and not state.draining))])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- serve()
def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_slots: int = 16,
    max_waiting: int = 256,
    max_len: Optional[int] = None,
    served_model_name: Optional[str] = None,
    dtype: Any = None,
    mesh: Any = None,
    revision: Optional[str] = None,
    tokenizer: Optional[str] = None,
    config: Any = None,
    grace: float = 30.0,
    log_level: str = "info",
    ready_message: bool = True,
    quantize: Optional[str] = None,
    quantize_embeddings: bool = False,
    kv_cache: Optional[str] = None,
) -> int:
    """Load ``model`` (anything :func:`gptj_jax.load` reads), build the engine and serve it until SIGTERM /
    Ctrl-C; returns the exit code (0 after a graceful shutdown, 1 if the warm-up failed).

    ``mesh``: a ``jax.sharding.Mesh`` or a ``"dp=..,fsdp=..,mp=.."`` string. ``max_len``: cache slots per
    request (default ``n_positions``). ``grace``: seconds in-flight requests get to finish after SIGTERM.
    ``quantize="int8"``: int8 weight-only weights, quantized as they load (``gptj_jax.load``'s).
    ``kv_cache="int8"``: int8 K/V with per-head scales in the engine's cache (``cache.init_cache``).
    """
    from .cache import check_kv_cache

    check_kv_cache(kv_cache)
    import uvicorn

    from .convert.load import load
    from .tokenizer import load_tokenizer

    if isinstance(mesh, str):
        from .sharding import mesh_from_string

        mesh = mesh_from_string(mesh)
    tok = load_tokenizer(tokenizer if tokenizer is not None else getattr(model, "path", model))
    cfg, params = load(model, mesh=mesh, dtype=dtype, revision=revision, config=config, head="causal_lm",
                       quantize=quantize, quantize_embeddings=quantize_embeddings)
    llm = LLM(cfg, params, max_slots=max_slots, max_len=max_len, dtype=dtype, mesh=mesh, tokenizer=tok,
              max_waiting=max_waiting, kv_cache=kv_cache)
    name = served_model_name or str(getattr(model, "spec", model)).rstrip("/")
    state = ServerState(llm, model_name=name, tokenizer=tok)
    app = create_app(state)
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                                    access_log=False), state, grace)
    state.on_fatal = server.fatal
    if ready_message:
        logger.info("serving %s on http://%s:%d (max_slots %d, max_len %d)", name, host, port, llm.engine.max_slots,
                    llm.engine.max_len)
    server.run()
    return 1 if state.warm_error is not None else 0


try:
    import uvicorn as _uvicorn

    _ServerBase: Any = _uvicorn.Server
except ImportError:  # the [serve] extra is not installed: serve() fails at its import, with the name
    _ServerBase = object


class _Server(_ServerBase):  # type: ignore[misc, valid-type]
    """uvicorn's server with a graceful drain: the first SIGTERM / SIGINT refuses new requests (503), lets the
    engine finish what runs for ``grace`` seconds, cancels the rest, then exits (code 0); a second exits now."""

    def __init__(self, config: Any, state: ServerState, grace: float):
        super().__init__(config)
        self.state = state
        self.grace = grace
        self._draining = False

    def handle_exit(self, sig: int, frame: Any) -> None:  # signal handler (main thread)
        if self._draining:
            self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        self.state.draining = True
        logger.info("signal %d: draining (grace %.0f s)", sig, self.grace)
        threading.Thread(target=self._drain, name="gptj-jax-drain", daemon=True).start()

    def _drain(self) -> None:
        try:
            self.state.stop(self.grace)
        finally:
            self.should_exit = True

    def fatal(self) -> None:
        self.state.draining = True
        self.should_exit = True
