"""Run causal and seq2seq Hugging Face models in-process, batched, on CPU or GPU."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refinery.models.backends.base import BackendError, GenRequest, GenResult, apply_stop

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_DTYPES = ("float32", "float16", "bfloat16")
DTYPE_CHOICES = ("auto", *_DTYPES)
_BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16 / AMX; aarch64 'bf16' feature


def cpu_has_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether the CPU reports native bfloat16 arithmetic (Linux /proc/cpuinfo flags; False if unreadable)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and _BF16_CPU_FLAGS & set(value.split()):
            return True
    return False


def resolve_dtype(dtype: str, *, cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """Resolve a dtype choice for the CPU: 'auto' is bfloat16 where the CPU computes it natively, else float32.

    Where the CPU computes bfloat16 natively (e.g. AVX512-BF16), bfloat16 batches run faster than float32
    (docs/measurements.md, teacher dtype). Without native support bfloat16 is emulated and slower than float32,
    hence the check.
    """
    if dtype not in DTYPE_CHOICES:
        raise BackendError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if cpu_has_bf16(cpuinfo) else "float32"


def weights_digest(folder: str | os.PathLike, *, length: int = 16) -> str:
    """Hash a model folder's weight files (names and bytes, sorted by relative path).

    Args:
        folder: local model folder.
        length: number of hex characters to keep.

    Returns:
        A short sha256 hex digest.

    Raises:
        BackendError: when the folder holds no weight file.
    """
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise BackendError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in model folder {root}")
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode("utf-8") + b"\0")
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:length]


class TransformersBackend:
    """A Backend over a local (or cached) transformers model, loaded once per instance.

    Batching and determinism: requests are grouped by their sampling parameters (max_new_tokens,
    temperature, top_p, stop), sorted by prompt token length (stable, ties by input position) and
    cut into batches of ``batch_size``. Greedy requests (temperature == 0) take the argmax.
    Sampled requests (temperature > 0) each draw from their own ``torch.Generator`` seeded with
    ``request.seed`` (inside a logits processor), so a sampled output depends on the request and
    its seed, not on its batch neighbours (up to floating-point effects of padding) nor on the
    global torch RNG. Stop strings halt a row as soon as its decoded completion contains one; the
    text is cut before it and finish_reason is 'stop'. 'length' means max_new_tokens were used
    without EOS or stop string. completion_tokens counts generated tokens, a final EOS included.
    ``revision`` is a sha256 (16 hex) of the folder's weight files for a local folder, else the
    hub commit hash of the cached model.

    Args:
        path_or_id: local model folder, or a model id already in the Hugging Face cache.
        batch_size: requests per forward batch.
        threads: torch intra-op threads (``torch.set_num_threads``); None leaves torch's default.
        dtype: 'float32' | 'float16' | 'bfloat16'.
        max_length: cap on prompt + completion tokens; prompts are left-truncated to fit.
            None takes the model's max_position_embeddings (at most 8192).
        device: auto | cpu | cuda[:n] | mps (:func:`refinery.core.device.resolve_device`); None picks 'cpu'.
    """

    def __init__(
        self,
        path_or_id: str,
        *,
        batch_size: int = 8,
        threads: int | None = None,
        dtype: str = "float32",
        max_length: int | None = None,
        device: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        if batch_size < 1:
            raise BackendError(f"batch_size must be >= 1, got {batch_size}")
        if dtype not in _DTYPES:
            raise BackendError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if threads is not None:
            if threads < 1:
                raise BackendError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        self.model_id = str(path_or_id)
        self.batch_size = batch_size
        self.threads = threads
        self.dtype = dtype
        from refinery.core.device import resolve_device

        self.device = torch.device(resolve_device(device or "cpu", f"{path_or_id}: device"))
        is_local = os.path.isdir(self.model_id)
        try:
            config = AutoConfig.from_pretrained(self.model_id)
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_id)
            self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
            auto = AutoModelForSeq2SeqLM if self.is_encoder_decoder else AutoModelForCausalLM
            self.model = auto.from_pretrained(self.model_id, dtype=getattr(torch, dtype))
        except (OSError, ValueError, KeyError) as exc:
            msg = " ".join(str(exc).split())[:300]
            raise BackendError(f"cannot load model {self.model_id}: {msg}") from None
        self.model.to(self.device).eval()
        if is_local:
            self.revision = weights_digest(self.model_id)
        else:
            self.revision = str(getattr(config, "_commit_hash", None) or "unknown")

        tok = self.tokenizer
        if tok.pad_token_id is None:
            if tok.eos_token_id is None:
                raise BackendError(f"model {self.model_id} has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
        if not self.is_encoder_decoder:
            tok.padding_side = "left"
        self.pad_id = int(tok.pad_token_id)
        eos: set[int] = set()
        for cand in (getattr(self.model.generation_config, "eos_token_id", None), tok.eos_token_id):
            if isinstance(cand, int):
                eos.add(cand)
            elif isinstance(cand, (list, tuple)):
                eos.update(int(c) for c in cand)
        self.eos_ids = frozenset(eos)
        if max_length is None:
            max_length = min(int(getattr(config, "max_position_embeddings", None) or 2048), 8192)
        self.max_length = int(max_length)
        self._no_text: list[int] | None = None  # token ids require_text suppresses (built on first use)

    def __repr__(self) -> str:
        return f"TransformersBackend(model_id={self.model_id!r}, revision={self.revision!r}, batch_size={self.batch_size})"

    # ----- prompts -----

    def _render(self, req: GenRequest) -> str:
        """Return the text fed to the model for a request (chat template applied to messages)."""
        if req.prompt is not None:
            return req.prompt
        msgs = [{"role": r, "content": c} for r, c in req.messages or ()]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        # No template (e.g. many seq2seq models): plain 'role: content' lines.
        lines = [f"{m['role']}: {m['content']}" for m in msgs]
        return "\n".join(lines) + ("" if self.is_encoder_decoder else "\nassistant:")

    def _encode_prompt(self, req: GenRequest) -> list[int]:
        """Tokenize a request's prompt, left-truncated to leave room for max_new_tokens."""
        text = self._render(req)
        # A rendered chat template already carries its special tokens.
        add_special = req.messages is None or not getattr(self.tokenizer, "chat_template", None)
        ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
        budget = max(1, self.max_length - (0 if self.is_encoder_decoder else req.max_new_tokens))
        if len(ids) > budget:
            ids = ids[-budget:]
        if not ids:
            ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.pad_id]
        return ids

    def _pad(self, seqs: list[list[int]], *, left: bool):
        """Pad token lists into (input_ids, attention_mask) tensors."""
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if left:
                ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
                mask[i, width - len(s) :] = 1
            else:
                ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                mask[i, : len(s)] = 1
        return ids.to(self.device), mask.to(self.device)

    # ----- generation -----

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Generate one result per request, in input order.

        Args:
            requests: the requests; any mix of sampling parameters.

        Returns:
            One GenResult per request, in the same order.
        """
        encoded = [self._encode_prompt(r) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.sampling_key, []).append(i)
        results: list[GenResult | None] = [None] * len(requests)
        for key in sorted(groups, key=repr):
            idxs = sorted(groups[key], key=lambda i: (len(encoded[i]), i))
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start : start + self.batch_size]
                batch_out = self._generate_batch([requests[i] for i in chunk], [encoded[i] for i in chunk])
                for i, res in zip(chunk, batch_out, strict=True):
                    results[i] = res
        return [r for r in results if r is not None]

    def _generate_batch(self, reqs: list[GenRequest], prompts: list[list[int]]) -> list[GenResult]:
        """Run one model.generate call for requests that share their sampling parameters."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        t0 = time.perf_counter()
        head = reqs[0]
        ids, mask = self._pad(prompts, left=not self.is_encoder_decoder)
        gen_offset = 1 if self.is_encoder_decoder else ids.shape[1]
        eos = sorted(self.eos_ids)
        gcfg = GenerationConfig(
            max_new_tokens=head.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=eos or None,
            bos_token_id=self.model.generation_config.bos_token_id,
            decoder_start_token_id=getattr(self.model.generation_config, "decoder_start_token_id", None),
        )
        processors = LogitsProcessorList()
        if head.require_text:  # before the sampler, so it never draws a suppressed token
            from transformers.generation.logits_process import SuppressTokensAtBeginLogitsProcessor

            processors.append(SuppressTokensAtBeginLogitsProcessor(self._no_text_ids(), gen_offset,
                                                                   device=str(self.device)))
        if head.require:  # before the sampler too: the required line is forced, never sampled past
            processors.append(_RequireLine(self.tokenizer, head.require, sorted(self.eos_ids), gen_offset))
        if head.temperature > 0:
            processors.append(_SeededSampler([r.seed for r in reqs], head.temperature, head.top_p))
        stopper = _StopStrings(self.tokenizer, head.stop, gen_offset, len(reqs), head.require) if head.stop else None
        criteria = StoppingCriteriaList([stopper] if stopper else [])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=gcfg,
                logits_processor=processors,
                stopping_criteria=criteria,
            )
        out = out[:, gen_offset:].tolist()
        latency = time.perf_counter() - t0
        results = []
        for row, (req, prompt) in enumerate(zip(reqs, prompts, strict=True)):
            gen = out[row]
            if stopper is not None and row in stopper.stopped_at:
                gen = gen[: stopper.stopped_at[row]]
            hit_eos = False
            for j, t in enumerate(gen):
                if t in self.eos_ids:
                    gen, hit_eos = gen[: j + 1], True
                    break
            body = gen[:-1] if hit_eos else gen
            text = self.tokenizer.decode(body, skip_special_tokens=True)
            text, stopped = apply_stop(text, req.stop, req.require)
            if stopped or hit_eos:
                reason = "stop"
            elif len(gen) >= req.max_new_tokens:
                reason = "length"
            else:
                reason = "stop"
            results.append(
                GenResult(
                    text=text,
                    finish_reason=reason,
                    prompt_tokens=len(prompt),
                    completion_tokens=len(gen),
                    latency_s=latency,
                )
            )
        return results

    def _no_text_ids(self) -> list[int]:
        """Return the ids of tokens that open no visible text: end-of-sequence, special, whitespace-only."""
        if self._no_text is None:
            tok = self.tokenizer
            ids = set(self.eos_ids) | set(tok.all_special_ids)
            ids |= {i for i in range(len(tok)) if not tok.decode([i]).strip()}
            self._no_text = sorted(ids)
        return self._no_text

    # ----- scoring -----

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokenize context and continuation separately (continuation without special tokens)."""
        ctx = self.tokenizer(context, add_special_tokens=True)["input_ids"] if context else []
        cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not ctx and not self.is_encoder_decoder:
            start = self.tokenizer.bos_token_id
            ctx = [start if start is not None else next(iter(sorted(self.eos_ids)), self.pad_id)]
        return ctx, cont

    def loglikelihood(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[tuple[float, int]]:
        """Score each continuation given its context.

        Args:
            contexts: conditioning texts.
            continuations: texts to score, one per context.

        Returns:
            (sum of continuation token log-probs, continuation token count) per pair, in order.
            An empty continuation scores (0.0, 0).
        """
        return [(float(t.sum()), len(t)) for t in self.token_logprobs(contexts, continuations)]

    def token_offsets(self, continuations: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Return the character span of each token of each continuation, as ``token_logprobs`` tokenizes it.

        ``token_logprobs`` scores the last tokens of a continuation longer than ``max_length``: align from the end.
        """
        if not getattr(self.tokenizer, "is_fast", False):
            raise BackendError(f"{self.model_id}: token offsets need a fast tokenizer (tokenizer.json)")
        enc = self.tokenizer(list(continuations), add_special_tokens=False, return_offsets_mapping=True)
        return [[(int(a), int(b)) for a, b in spans] for spans in enc["offset_mapping"]]

    def token_logprobs(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[np.ndarray]:
        """Return the log-prob of every continuation token given its context (an empty array when empty).

        Args:
            contexts: conditioning texts.
            continuations: texts to score, one per context.

        Returns:
            One float64 array per pair, in order.
        """
        import torch

        if len(contexts) != len(continuations):
            raise BackendError(f"loglikelihood got {len(contexts)} contexts but {len(continuations)} continuations")
        pairs = [self._encode_pair(c, k) for c, k in zip(contexts, continuations, strict=True)]
        out: list[np.ndarray | None] = [None] * len(pairs)
        todo = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                out[i] = np.zeros(0)
            else:
                todo.append(i)
        todo.sort(key=lambda i: (len(pairs[i][0]) + len(pairs[i][1]), i))
        with torch.inference_mode():
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                scores = (
                    self._score_seq2seq([pairs[i] for i in chunk])
                    if self.is_encoder_decoder
                    else self._score_causal([pairs[i] for i in chunk])
                )
                for i, s in zip(chunk, scores, strict=True):
                    out[i] = s
        return [o for o in out if o is not None]

    def _score_causal(self, pairs: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
        """Score a batch with a causal LM (right padding, context left-truncated to max_length)."""
        import torch

        seqs, conts = [], []
        for ctx, cont in pairs:
            cont = cont[-self.max_length :]
            full = (ctx + cont)[-(self.max_length + 1) :]
            seqs.append(full[:-1])
            conts.append(cont)
        ids, mask = self._pad(seqs, left=False)
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        res = []
        for row, (seq, cont) in enumerate(zip(seqs, conts, strict=True)):
            n = len(cont)
            # Position p predicts token p+1 of ctx+cont: the continuation's tokens come last.
            pos = torch.arange(len(seq) - n, len(seq), device=logp.device)
            tgt = torch.tensor(cont, device=logp.device)
            res.append(logp[row, pos, tgt].double().cpu().numpy())
        return res

    def _score_seq2seq(self, pairs: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
        """Score a batch with an encoder-decoder model (context to encoder, continuation as labels)."""
        import torch

        enc = [(ctx or [self.pad_id])[-self.max_length :] for ctx, _ in pairs]
        conts = [cont[: self.max_length] for _, cont in pairs]
        ids, mask = self._pad(enc, left=False)
        labels, _ = self._pad(conts, left=False)
        for row, cont in enumerate(conts):
            labels[row, len(cont) :] = -100
        logits = self.model(input_ids=ids, attention_mask=mask, labels=labels).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        res = []
        for row, cont in enumerate(conts):
            n = len(cont)
            tgt = torch.tensor(cont, device=logp.device)
            res.append(logp[row, torch.arange(n, device=logp.device), tgt].double().cpu().numpy())
        return res


class _SeededSampler:
    """Sample each row from its own seeded generator and turn the choice into a one-hot score row.

    Used with greedy decoding, so ``generate`` picks exactly the sampled token. Temperature scales
    the logits, then top-p keeps the smallest set of tokens whose mass reaches ``top_p``.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        import torch

        self.generators = [torch.Generator(device="cpu").manual_seed(int(s) & 0xFFFF_FFFF_FFFF_FFFF) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            drop = (cum - sorted_p) >= self.top_p  # keeps at least the top token
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        out = torch.full_like(scores, float("-inf"))
        cpu_probs = probs.cpu()
        for row, gen in enumerate(self.generators):
            tok = torch.multinomial(cpu_probs[row], 1, generator=gen)
            out[row, tok.to(out.device)] = 0.0
        return out


class _RequireLine:
    """Make each row's completion reach ``require`` at the start of a line.

    Until the decoded completion holds it: end-of-sequence tokens are forbidden, and once a line of text is
    ended (the completion ends with a newline) the next tokens are forced to spell ``require``.
    """

    def __init__(self, tokenizer: Any, require: str, eos_ids: list[int], gen_offset: int) -> None:
        self.tokenizer = tokenizer
        self.require = require
        self.eos_ids = eos_ids
        self.forced = tokenizer(require, add_special_tokens=False)["input_ids"]
        self.gen_offset = gen_offset
        self.done: set[int] = set()  # rows whose completion already holds it
        self.at: dict[int, int] = {}  # row -> index of the next forced token

    def __call__(self, input_ids, scores):
        for row in range(input_ids.shape[0]):
            if row in self.done:
                continue
            text = self.tokenizer.decode(input_ids[row, self.gen_offset:].tolist(), skip_special_tokens=True)
            if self.require in text:
                self.done.add(row)
                continue
            k = self.at.get(row)
            if k is None and text.endswith("\n") and text.strip():
                k = 0
            if k is not None and k < len(self.forced):
                scores[row, :] = float("-inf")
                scores[row, self.forced[k]] = 0.0
                self.at[row] = k + 1
            elif self.eos_ids:
                scores[row, self.eos_ids] = float("-inf")
        return scores


class _StopStrings:
    """Stop each row once its decoded completion contains a stop string (after ``require``); remember where."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], gen_offset: int, rows: int, require: str = "") -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.gen_offset = gen_offset
        self.stopped_at: dict[int, int] = {}
        self.rows = rows
        self.require = require

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        n_gen = input_ids.shape[1] - self.gen_offset
        for row in range(input_ids.shape[0]):
            if row in self.stopped_at:
                done[row] = True
                continue
            text = self.tokenizer.decode(input_ids[row, self.gen_offset :].tolist(), skip_special_tokens=True)
            if apply_stop(text, self.stop, self.require)[1]:
                self.stopped_at[row] = n_gen
                done[row] = True
        return done
