"""serving/adapter_fit.py: an adapter's rank and base model against the served model, on the tiny model and adapter."""

from __future__ import annotations

import json

from workflow.serving.adapter_fit import misfit


def test_the_tiny_adapter_fits_its_model_and_not_another(tiny_model, tiny_adapter, tmp_path):
    config = json.loads((tiny_adapter / "adapter_config.json").read_text())
    assert misfit("a", tiny_adapter, config, max_lora_rank=8, model_source=str(tiny_model)) is None
    assert misfit("a", tiny_adapter, config, max_lora_rank=None, model_source="s3://bucket/model") is None

    assert misfit("a", tiny_adapter, config, max_lora_rank=4, model_source=str(tiny_model)) == (
        "adapter 'a' has LoRA rank 8, over the served model's max_lora_rank 4 "
        "(serve.llm_config.engine_kwargs.max_lora_rank)")
    model = json.loads((tiny_model / "config.json").read_text())
    for change, expected in (({"hidden_size": model["hidden_size"] * 2},
                              f"adapter 'a' was trained on a model of hidden size {model['hidden_size']}"),
                             ({"num_hidden_layers": 1}, "adapter 'a' has weights for layer 1; the served model has 1 "
                                                        "layers (another base model)")):
        other = tmp_path / f"other-{next(iter(change))}"
        other.mkdir()
        (other / "config.json").write_text(json.dumps({**model, **change}))
        reason = misfit("a", tiny_adapter, config, max_lora_rank=8, model_source=str(other))
        assert reason is not None and reason.startswith(expected), reason
    assert model["num_hidden_layers"] > 1
