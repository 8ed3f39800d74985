"""The tiny model: loads and generates in transformers (train env) and in vLLM (serve env)."""

import os
import subprocess
import sys
import textwrap

import pytest


@pytest.mark.train_env
def test_transformers_loads_and_generates_in_the_train_env(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 1e7
    ids = tok.apply_chat_template([{"role": "user", "content": "Diablo II is great."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5


def test_tokenizer_is_trained_on_the_data(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    # Frequent ViGGO words are whole tokens; special tokens are never split.
    assert len(tok("inform")["input_ids"]) == 1
    ids = tok("<|im_start|>hello<|im_end|>")["input_ids"]
    assert (ids[0], ids[-1]) == (tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>"))


@pytest.mark.heavy
def test_vllm_generates_in_the_serve_env(tiny_model, tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(textwrap.dedent(f"""
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM(model={str(tiny_model)!r}, dtype="float32", max_model_len=512, enforce_eager=True)
            out = llm.chat([{{"role": "user", "content": "Diablo II is great."}}],
                           SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
            print("TOKENS", len(out[0].outputs[0].token_ids))
    """))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TOKENS 8" in proc.stdout


def test_both_environments_tokenize_prompts_identically(tiny_model, viggo_alpaca):
    """transformers 5.19 (serve env) rebuilds a qwen2 tokenizer with Qwen's pre-tokenizer while 5.6 (train env)
    reads tokenizer.json as is: the tiny tokenizer must be Qwen-shaped for both to give the same ids."""
    import json

    from workflow.core import envs

    row = json.loads((viggo_alpaca / "test.jsonl").read_text().splitlines()[0])
    code = ("import json, sys\nfrom transformers import AutoTokenizer\n"
            "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "text = t.apply_chat_template([{'role': 'user', 'content': sys.argv[2]}], add_generation_prompt=True, tokenize=False)\n"
            "print('IDS', json.dumps(t(text)['input_ids']))\n")
    ids = {}
    for env in (envs.TRAIN, envs.SERVE):
        proc = subprocess.run([envs.python_for(env), "-c", code, str(tiny_model), row["instruction"] + "\n" + row["input"]],
                              capture_output=True, text=True, env=envs.stage_environment(env), timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        ids[env] = json.loads(proc.stdout.split("IDS ", 1)[1])
    assert ids[envs.TRAIN] == ids[envs.SERVE] and len(ids[envs.TRAIN]) > 150
