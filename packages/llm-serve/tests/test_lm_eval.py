"""lm-evaluation-harness against `llm-serve serve`, as its users run it.

A tiny random Llama is written by transformers (with the tiny BPE tokenizer as a
PreTrainedTokenizerFast) and served from that Hugging Face folder. lm-eval's `local-completions`
model then runs two tasks of the test's own (local JSONL, no downloads) against the server: a
multiple-choice task (log-likelihoods through `echo` + `logprobs` on token-id prompts) and a
`generate_until` task (greedy, stop strings). The same tasks run through lm-eval's `hf` backend on
the same folder: the per-sample log-likelihoods agree within 1e-4 and the generated strings are
identical. lm-eval runs in a subprocess with the Hugging Face hub and datasets offline."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import ServerProcess, hf_tokenizer

pytestmark = pytest.mark.slow

CHOICE_DOCS = [
    {"question": "the quick brown", "choices": [" fox", " dog", " words"], "answer": 0},
    {"question": "Hello world! How are", "choices": [" you", " the", " numbers"], "answer": 0},
    {"question": "numbers: 0 1 2", "choices": [" 3", " 10", " story"], "answer": 0},
    {"question": "a small model writes", "choices": [" small words", " the lazy dog"], "answer": 0},
]
GEN_DOCS = [
    {"prompt": "the quick brown fox", "target": " jumps"},
    {"prompt": "Hello world!", "target": " How"},
    {"prompt": "numbers: 0 1", "target": " 2"},
]

TASKS = """
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/choice.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
---
task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""

RUNNER = textwrap.dedent(
    """
    import json, sys
    import lm_eval
    from lm_eval.tasks import TaskManager
    model, model_args, include, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    result = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=["tiny_choice", "tiny_gen"],
        task_manager=TaskManager(include_path=include), log_samples=True, batch_size=1,
    )
    samples = {
        task: [{"doc_id": s["doc_id"], "resps": s["resps"]} for s in rows]
        for task, rows in result["samples"].items()
    }
    json.dump(samples, open(out, "w"))
    """
)


def build_hf_llama(folder) -> None:
    import torch
    import transformers

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer(), eos_token="</s>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.2,  # distinct logits: greedy choices far from ties
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)


def run_lm_eval(model: str, model_args: dict, tasks, out) -> dict:
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    import os

    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, model, json.dumps(model_args), str(tasks), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_lm_eval_local_completions_matches_its_hf_backend(tmp_path):
    hf = tmp_path / "hf"
    build_hf_llama(hf)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "choice.jsonl").write_text("".join(json.dumps(d) + "\n" for d in CHOICE_DOCS))
    (tasks / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in GEN_DOCS))
    for i, text in enumerate(TASKS.format(folder=tasks).split("---")):
        (tasks / f"task{i}.yaml").write_text(text)
    server = ServerProcess(hf, "kv_cache_max_length=256", "max_queue_size=8")
    try:
        served = run_lm_eval(
            "local-completions",
            {
                "base_url": server.url + "/v1/completions",
                "model": "tiny",
                "tokenizer_backend": "huggingface",
                "tokenizer": str(hf),
                "tokenized_requests": True,
                "max_retries": 1,
            },
            tasks,
            tmp_path / "served.json",
        )
    finally:
        server.close()
    reference = run_lm_eval(
        "hf",
        {"pretrained": str(hf), "device": "cpu", "dtype": "float32"},
        tasks,
        tmp_path / "hf.json",
    )
    choice = {s["doc_id"]: s["resps"] for s in served["tiny_choice"]}
    want = {s["doc_id"]: s["resps"] for s in reference["tiny_choice"]}
    assert sorted(choice) == sorted(want) == list(range(len(CHOICE_DOCS)))
    for doc, resps in want.items():
        assert len(choice[doc]) == len(resps)
        for (ll, greedy), (ll_ref, greedy_ref) in zip(
            (r[0] for r in choice[doc]), (r[0] for r in resps)
        ):
            assert ll == pytest.approx(ll_ref, abs=1e-4), (doc, ll, ll_ref)
            assert greedy == greedy_ref
    gen = {s["doc_id"]: s["resps"][0][0] for s in served["tiny_gen"]}
    gen_ref = {s["doc_id"]: s["resps"][0][0] for s in reference["tiny_gen"]}
    assert gen == gen_ref and len(gen) == len(GEN_DOCS)
    assert any(text for text in gen.values())  # something was generated
