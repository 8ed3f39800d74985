"""The prompt-format guard: LLaMA-Factory's qwen template and the tiny model's chat template agree token for token."""

import copy

import pytest

from workflow.core.errors import WorkflowError
from workflow.prompts import guard as prompt_format

ROW = {"instruction": "Given a target sentence construct the meaning representation.",
       "input": "Diablo II is a great game.", "output": "give_opinion(name[Diablo II], rating[good])"}

pytestmark = pytest.mark.train_env


def test_training_and_serving_render_the_same_prompt(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rec = prompt_format.record(tok, "qwen", ROW)
    assert rec["prompt_text"].endswith("<|im_start|>user\n" + ROW["instruction"] + "\n" + ROW["input"]
                                       + "<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_format.check(rec, AutoTokenizer.from_pretrained(tiny_model), where="evaluate")


def test_a_different_template_is_refused_with_the_first_differing_token(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rec = prompt_format.record(tok, "qwen", ROW)
    other = copy.deepcopy(tok)
    # A template without the default system prompt: the classic silent mismatch.
    other.chat_template = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                           "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
                           "{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    with pytest.raises(WorkflowError, match=r"serve: the prompt differs .* at token 1 .*training had '[^']+', this tokenizer's chat template gives '[^']+'.*"
                                            r"template 'qwen'.*allow_prompt_mismatch"):
        prompt_format.check(rec, other, where="serve")
    assert prompt_format.check(rec, other, where="serve", allow_mismatch=True) is False


def test_first_difference():
    assert prompt_format.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert prompt_format.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert prompt_format.first_difference([1, 2], [1, 2, 3]) == 2


def test_the_serve_environments_tokenizer_renders_what_training_recorded(tiny_model, tmp_path):
    """The record is made here (train env: LLaMA-Factory, its transformers), the check runs in the serve
    environment (vLLM's transformers), as evaluate and serve do: the cross-environment drift the guard exists for."""
    import json
    import subprocess

    import transformers
    from transformers import AutoTokenizer

    from workflow.core import envs

    record = prompt_format.record(AutoTokenizer.from_pretrained(tiny_model), "qwen", ROW)
    (tmp_path / prompt_format.FILE).write_text(json.dumps(record))
    check = ("import sys, transformers; from workflow.prompts import guard; "
             "guard.check_adapter(sys.argv[1], sys.argv[2], where='serve'); print('transformers', transformers.__version__)")
    proc = subprocess.run([envs.python_for(envs.SERVE), "-c", check, str(tmp_path), str(tiny_model)],
                          env=envs.stage_environment(envs.SERVE), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prompt format matches training (template 'qwen')" in proc.stdout
    # The two environments do pin different transformers releases: the check is across them.
    assert f"transformers {transformers.__version__}" not in proc.stdout
