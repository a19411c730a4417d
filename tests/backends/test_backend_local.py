"""Test TransformersBackend on a real SmolLM2 model (and a tiny random seq2seq model)."""

from __future__ import annotations

import re

import pytest

from refinery.models.backends import Backend, BackendError, GenRequest, make_backend
from refinery.models.backends.local import cpu_has_bf16, resolve_dtype, weights_digest
from refinery.generation.prompts import load_template
from tests.conftest import ROOT

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far far away, there lived a",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Water boils at",
]


def test_loads_once_with_provenance(local_backend, smol_dir):
    assert isinstance(local_backend, Backend)
    assert not local_backend.is_encoder_decoder
    assert re.fullmatch(r"[0-9a-f]{16}", local_backend.revision)
    assert local_backend.revision == weights_digest(smol_dir)
    assert local_backend.tokenizer.padding_side == "left"
    assert local_backend.pad_id is not None


def test_batched_greedy_equals_one_by_one(local_backend):
    reqs = [GenRequest(prompt=p, max_new_tokens=4) for p in PROMPTS]
    batched = local_backend.generate(reqs)
    single = [local_backend.generate([r])[0] for r in reqs]
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in single]
    tok = local_backend.tokenizer
    assert [r.prompt_tokens for r in batched] == [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert "Paris" in batched[0].text
    assert all(r.finish_reason == "length" and r.completion_tokens == 4 for r in batched)


def test_stop_strings_cut_and_finish_stop(local_backend):
    (r,) = local_backend.generate([GenRequest(prompt="1, 2, 3, 4,", max_new_tokens=16, stop=(" 7", "\n"))])
    assert r.finish_reason == "stop"
    assert " 7" not in r.text and r.text.startswith(" 5, 6,")
    assert r.completion_tokens < 16  # generation halted early, not just truncated


def test_eos_gives_stop_and_chat_template(local_backend):
    msgs = (("user", "What is the capital of France? One word."),)
    (r,) = local_backend.generate([GenRequest(messages=msgs, max_new_tokens=24)])
    assert r.finish_reason == "stop" and r.completion_tokens < 24
    assert "Paris" in r.text and "<|im_end|>" not in r.text
    tmpl = local_backend.tokenizer.apply_chat_template(
        [{"role": "user", "content": msgs[0][1]}], tokenize=False, add_generation_prompt=True
    )
    assert r.prompt_tokens == len(local_backend.tokenizer(tmpl, add_special_tokens=False)["input_ids"])


def test_mixed_sampling_params_keep_order(local_backend):
    reqs = [
        GenRequest(prompt=PROMPTS[0], max_new_tokens=2),
        GenRequest(prompt=PROMPTS[2], max_new_tokens=8, stop=(" 6",)),
        GenRequest(prompt=PROMPTS[0], max_new_tokens=4),
    ]
    a, b, c = local_backend.generate(reqs)
    assert a.completion_tokens == 2 and c.completion_tokens == 4 and c.text.startswith(a.text)
    assert b.text == " 5," and b.finish_reason == "stop" and b.completion_tokens < 8


def test_sampling_is_deterministic_per_seed(local_backend):
    def req(seed: int, prompt: str = "Once upon a time") -> GenRequest:
        return GenRequest(prompt=prompt, max_new_tokens=4, temperature=1.0, top_p=0.95, seed=seed)

    first = local_backend.generate([req(1), req(2), req(3), req(1)])
    again = local_backend.generate([req(3), req(1, "Water boils at"), req(1)])
    assert first[0].text == first[3].text == again[2].text  # seed decides, not batch neighbours
    assert first[2].text == again[0].text
    assert len({r.text for r in first[:3]}) > 1


def test_loglikelihood_orders_plausible_above_garbage(local_backend):
    ctx = ["The capital of France is", "The capital of France is", "1, 2, 3, 4,"]
    cont = [" Paris", " xqz blorft", " 5"]
    scores = local_backend.loglikelihood(ctx, cont)
    assert scores[0][0] > scores[1][0] and scores[2][0] > -2.0
    tok = local_backend.tokenizer
    assert [n for _, n in scores] == [len(tok(c, add_special_tokens=False)["input_ids"]) for c in cont]
    single = [local_backend.loglikelihood([c], [k])[0] for c, k in zip(ctx, cont, strict=True)]
    for (s1, n1), (s2, n2) in zip(scores, single, strict=True):
        assert n1 == n2 and s1 == pytest.approx(s2, abs=1e-3)
    assert local_backend.loglikelihood(["x"], [""]) == [(0.0, 0)]
    assert local_backend.loglikelihood([""], [" Paris"])[0][1] == 1
    # per-token log-probs: one per continuation token, summing to the pair's log-likelihood
    tokens = local_backend.token_logprobs(ctx, cont)
    assert [len(t) for t in tokens] == [n for _, n in scores]
    assert [float(t.sum()) for t in tokens] == pytest.approx([s for s, _ in scores], abs=1e-6)
    assert (tokens[1] <= 0).all() and len(local_backend.token_logprobs(["x"], [""])[0]) == 0


def test_factory_local_and_bad_path(tmp_path):
    with pytest.raises(BackendError) as ei:
        make_backend({"kind": "local", "path": str(tmp_path / "nope"), "threads": 2})
    assert "\n" not in str(ei.value) and "nope" in str(ei.value)
    with pytest.raises(BackendError, match="dtype"):
        make_backend({"kind": "local", "path": str(tmp_path), "dtype": "int3"})


def test_auto_dtype_follows_the_cpu_flags(tmp_path):
    x86_bf16 = tmp_path / "epyc"
    x86_bf16.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    x86_old = tmp_path / "old"
    x86_old.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert cpu_has_bf16(x86_bf16) and cpu_has_bf16(arm) and not cpu_has_bf16(x86_old)
    assert not cpu_has_bf16(tmp_path / "missing")  # unreadable: no claim of support
    assert resolve_dtype("auto", cpuinfo=x86_bf16) == "bfloat16"
    assert resolve_dtype("auto", cpuinfo=x86_old) == "float32"
    assert resolve_dtype("float32", cpuinfo=x86_bf16) == "float32"  # an explicit choice is kept
    with pytest.raises(BackendError, match="dtype must be one of auto"):
        resolve_dtype("fp8")


def test_bfloat16_backend_still_answers(smol_dir):
    import torch

    be = make_backend({"kind": "local", "path": str(smol_dir), "threads": 2, "dtype": "bfloat16"})
    assert next(be.model.parameters()).dtype == torch.bfloat16
    (r,) = be.generate([GenRequest(prompt=PROMPTS[0], max_new_tokens=4)])
    assert "Paris" in r.text and r.completion_tokens == 4


def test_require_text_keeps_a_completion_from_opening_with_its_stop_string(local_backend):
    # given a prompt whose greedy continuation opens with a newline, which the stop string cuts to nothing
    prompt = "The capital of France is Paris.\n"
    (plain,) = local_backend.generate([GenRequest(prompt=prompt, max_new_tokens=6, stop=("\n",))])
    assert plain.text == "" and plain.completion_tokens == 1
    # when visible text is required, the first token is a word and the completion holds text
    (strict,) = local_backend.generate([GenRequest(prompt=prompt, max_new_tokens=6, stop=("\n",),
                                                   require_text=True)])
    assert strict.text.strip() and strict.completion_tokens > 1
    # and a sampled request honours it too
    (sampled,) = local_backend.generate([GenRequest(prompt=prompt, max_new_tokens=6, stop=("\n",),
                                                    temperature=0.7, seed=3, require_text=True)])
    assert sampled.text.strip()


@pytest.mark.slow
def test_require_writes_the_answer_line_a_completion_would_have_left_out(local_backend):
    # given a question-and-answer prompt whose sampled completion (seeds 3 and 6) ends after the question line
    passage = "We could not find a church that we loved, so we kept looking."
    prompt = load_template(ROOT / "prompts" / "recover_question.txt").render(
        {"evidence": passage, "passage": passage, "question": "", "answer": "", "title": ""}, [])

    def ask(seed, require=""):
        (r,) = local_backend.generate([GenRequest(prompt=prompt, max_new_tokens=40, temperature=0.7, top_p=0.95,
                                                  seed=seed, stop=("\n\n", "\nPassage:", "\nQuestion:"),
                                                  require_text=True, require=require)])
        return r.text
    for seed in (3, 6):
        plain, required = ask(seed), ask(seed, "Answer:")
        assert "Answer:" not in plain
        # when the answer line is required, it is written after the question and answered
        question, answer = required.split("\nAnswer:")
        assert question == plain and answer.strip()
    # and a completion that already holds it is unchanged
    assert ask(0, "Answer:") == ask(0) and "\nAnswer:" in ask(0)


@pytest.fixture(scope="module")
def tiny_seq2seq(smol_dir, tmp_path_factory):
    """Save a tiny random T5 that reuses the SmolLM2 tokenizer (no download)."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    cfg = T5Config(
        vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_t5")
    T5ForConditionalGeneration(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_seq2seq_detected_batched_and_scored(tiny_seq2seq):
    be = make_backend({"kind": "local", "path": str(tiny_seq2seq), "batch_size": 3, "threads": 2})
    assert be.is_encoder_decoder
    reqs = [GenRequest(prompt=p, max_new_tokens=4) for p in PROMPTS[:3]]
    batched = be.generate(reqs)
    single = [be.generate([r])[0] for r in reqs]
    assert [(r.text, r.completion_tokens) for r in batched] == [(r.text, r.completion_tokens) for r in single]
    assert all(r.finish_reason in ("stop", "length") and 1 <= r.completion_tokens <= 4 for r in batched)
    (chat,) = be.generate([GenRequest(messages=(("user", "hi"),), max_new_tokens=2)])
    assert chat.ok
    scores = be.loglikelihood(["a", "b"], [" c d", " e"])
    assert all(s < 0 and n > 0 for s, n in scores)
