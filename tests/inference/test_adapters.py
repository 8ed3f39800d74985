"""The adapter lint: LoRA weights on modules vLLM does not adapt are refused before an engine loads them."""

import pytest
from conftest import with_lm_head_lora

from workflow.core import storage
from workflow.core.errors import WorkflowError
from workflow.inference import adapters


def test_lora_weights_on_the_lm_head_are_refused_in_one_line(tiny_adapter, tmp_path):
    adapters.lint_adapters({"viggo": str(tiny_adapter)}, "evaluate", ["Qwen2ForCausalLM"])  # linear layers only

    planted = with_lm_head_lora(tiny_adapter, tmp_path / "lm-head")
    with pytest.raises(WorkflowError) as err:
        adapters.lint_adapters({"viggo": str(tiny_adapter), "lm-head": str(planted)}, "serve", ["Qwen2ForCausalLM"])
    text = str(err.value)
    assert "serve: adapter 'lm-head' has LoRA weights on ['lm_head'], which vLLM does not adapt in Qwen2ForCausalLM" in text
    assert "(train again with train.llamafactory.lora_target" in text and "\n" not in text


def test_which_modules_vllm_adapts_follows_the_model_class():
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {},
               "base_model.model.lm_head.lora_A.weight": {},
               "base_model.model.transformer.wte.lora_embedding_A": {}}
    assert adapters.modules_vllm_does_not_adapt(tensors, ["Qwen2ForCausalLM"]) == ["lm_head", "wte"]
    # vLLM's Exaone class declares both as embedding modules it adapts.
    assert adapters.modules_vllm_does_not_adapt(tensors, ["ExaoneForCausalLM"]) == []
    assert adapters.modules_vllm_does_not_adapt(tensors, []) == []  # an architecture not known here: no refusal


def test_the_architecture_is_read_from_the_models_config(tiny_model, s3_bucket):
    assert adapters.model_architectures(str(tiny_model)) == ["Qwen2ForCausalLM"]
    storage.upload_dir(tiny_model, f"{s3_bucket}/model", last=["config.json"])
    assert adapters.model_architectures(f"{s3_bucket}/model") == ["Qwen2ForCausalLM"]


def test_the_header_is_read_alone_from_object_storage(tiny_adapter, s3_bucket):
    storage.upload_dir(tiny_adapter, f"{s3_bucket}/adapters/viggo", last=["adapter_config.json"])
    found = adapters.adapter_tensors(f"{s3_bucket}/adapters/viggo")
    assert found == adapters.adapter_tensors(tiny_adapter) and found
    assert all(t["dtype"] == "F32" and len(t["shape"]) == 2 for t in found.values())
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in found} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_a_bfloat16_adapter_in_a_float16_engine_is_refused_and_other_casts_are_said(tiny_adapter, tmp_path, capsys):
    import json
    import shutil
    import struct

    import numpy as np
    from safetensors.numpy import load_file

    adapters.lint_adapters({"viggo": str(tiny_adapter)}, "serve", engine_dtype="bfloat16",
                           dtype_key="serve.llm_config.engine_kwargs.dtype")
    assert "adapter 'viggo': LoRA weights in float32, cast to the engine's bfloat16" in capsys.readouterr().out
    adapters.lint_adapters({"viggo": str(tiny_adapter)}, "serve", engine_dtype="float32")
    assert "cast" not in capsys.readouterr().out

    bf16 = tmp_path / "bf16"  # the same weights in bfloat16 (numpy has none: the top 16 bits of each float32)
    shutil.copytree(tiny_adapter, bf16)
    header, data = {}, b""
    for key, value in load_file(bf16 / "adapter_model.safetensors").items():
        raw = (value.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
        header[key] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    (bf16 / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)
    assert {t["dtype"] for t in adapters.adapter_tensors(bf16).values()} == {"BF16"}
    with pytest.raises(WorkflowError) as err:
        adapters.lint_adapters({"bf16": str(bf16)}, "evaluate", engine_dtype="half",
                               dtype_key="evaluate.processor.engine_kwargs.dtype")
    assert ("evaluate: adapter 'bf16' has bfloat16 LoRA weights and the engine computes in float16 "
            "(evaluate.processor.engine_kwargs.dtype)") in str(err.value)
    assert "(set evaluate.processor.engine_kwargs.dtype: bfloat16)" in str(err.value)
