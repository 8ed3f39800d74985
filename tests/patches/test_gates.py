"""workflow.patches: each patch refuses, with one warning line, outside the versions it was tested on.

Runs in the serve environment, against the real vLLM and Ray modules the patches replace; the
installed version is what the tests change (``installed_version``), nothing else is stubbed.
(The PEFT fast path's refusal is tested in test_peft_lora_fast_path.py, in the train environment.)
"""

from __future__ import annotations

import os
import time
import types

import pytest

import workflow.patches as patches


@pytest.fixture
def old_versions(monkeypatch):
    """Every package reads as 0.1.0, outside every patch's tested versions; warnings start afresh."""
    monkeypatch.setattr(patches, "installed_version", lambda package: "0.1.0")
    monkeypatch.setattr(patches, "_warned", set())


def _one_warning(capsys) -> str:
    """The one line the gate printed (importing vLLM prints log records of its own)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_installed_versions_are_inside_every_patch_of_this_environment():
    from workflow.patches import (
        ray_serve_direct_streaming,
        ray_serve_http_options,
        ray_token_auth,
        vllm_cpu_lora,
        vllm_cpu_placement,
        vllm_model_registry,
        vllm_offline_batch_defaults,
    )
    from workflow.patches import ray_serve_haproxy_listeners as listeners
    from workflow.serving import app

    for tested in (vllm_cpu_lora.TESTED, vllm_cpu_placement.TESTED, ray_serve_direct_streaming.TESTED,
                   listeners.TESTED, app.INGRESS_TESTED, ray_serve_http_options.TESTED, ray_token_auth.TESTED,
                   vllm_model_registry.TESTED, vllm_offline_batch_defaults.TESTED):
        assert patches.outside_tested(tested) is None, tested


def test_supported_warns_once_per_patch(old_versions, capsys):
    assert not patches.supported("p", {"ray": "==2.60.*"}, "it is slower")
    assert not patches.supported("p", {"ray": "==2.60.*"}, "it is slower")
    line = _one_warning(capsys)
    assert line == "warning: p not applied: ray 0.1.0 is outside the versions it was tested on (==2.60.*); it is slower"


def test_a_package_that_is_not_installed_is_outside():
    assert "(not installed)" in patches.outside_tested({"no-such-package-here": ">=1"})


def test_replace_attribute_refuses_an_attribute_that_is_not_there():
    target = types.SimpleNamespace(flag=False)
    assert patches.replace_attribute(target, "flag", True) is False and target.flag is True
    with pytest.raises(patches.PatchTargetMissing, match="flg"):
        patches.replace_attribute(target, "flg", True)
    assert not hasattr(target, "flg")


def test_cpu_lora_ops_are_left_to_vllm_outside_the_tested_versions(old_versions, capsys, monkeypatch):
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    from workflow.patches import vllm_cpu_lora

    monkeypatch.setattr(punica_cpu, "bgmv_shrink", punica_cpu.bgmv_shrink)  # restored after the test
    before = punica_cpu.bgmv_shrink
    vllm_cpu_lora.register()
    assert punica_cpu.bgmv_shrink is before and before is not vllm_cpu_lora.bgmv_shrink
    line = _one_warning(capsys)
    assert "workflow.patches.vllm_cpu_lora not applied: vllm 0.1.0" in line and "adapter prompts" in line


def test_cpu_lora_ops_are_all_or_none_when_one_is_missing(capsys, monkeypatch):
    import vllm.lora.ops.torch_ops as package
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    from workflow.patches import vllm_cpu_lora

    monkeypatch.setattr(patches, "_warned", set())
    for module in (ops, package, punica_cpu):
        for name in vllm_cpu_lora.OPS:
            monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    monkeypatch.delattr(package, "bgmv_expand_slice")
    before = punica_cpu.bgmv_shrink
    vllm_cpu_lora.register()
    assert punica_cpu.bgmv_shrink is before
    assert "vllm.lora.ops.torch_ops.bgmv_expand_slice does not exist" in _one_warning(capsys)


def test_engine_core_placement_is_left_to_vllm_outside_the_tested_versions(old_versions, capsys):
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    from workflow.patches import vllm_cpu_placement

    before = OMPProcessManager.__init__
    vllm_cpu_placement.register()
    assert OMPProcessManager.__init__ is before
    assert "workflow.patches.vllm_cpu_placement not applied: vllm 0.1.0" in _one_warning(capsys)


def test_direct_streaming_is_off_outside_the_tested_ray(old_versions, capsys):
    from workflow.patches import ray_serve_direct_streaming

    assert not ray_serve_direct_streaming.available()
    assert "serve.direct_streaming is off" in _one_warning(capsys)


def test_direct_streaming_is_off_when_a_global_is_gone(capsys, monkeypatch):
    from ray.serve._private import build_app

    from workflow.patches import ray_serve_direct_streaming

    monkeypatch.setattr(patches, "_warned", set())
    assert ray_serve_direct_streaming.available()
    monkeypatch.delattr(build_app, "RAY_SERVE_ENABLE_HA_PROXY")
    assert not ray_serve_direct_streaming.available()
    assert "build_app.RAY_SERVE_ENABLE_HA_PROXY does not exist" in _one_warning(capsys)
    with pytest.raises(patches.PatchTargetMissing):
        ray_serve_direct_streaming.set_direct_streaming(True)


def test_direct_streaming_switch_sets_and_resets_the_builder(monkeypatch):
    import importlib

    from ray.llm._internal.serve.core.ingress import builder

    from workflow.patches import ray_serve_direct_streaming

    for module, name in ray_serve_direct_streaming.TARGETS:  # restored after the test
        module = importlib.import_module(module)
        monkeypatch.setattr(module, name, getattr(module, name))
    ray_serve_direct_streaming.set_direct_streaming(True)
    assert builder.RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING is True
    ray_serve_direct_streaming.set_direct_streaming(False)
    assert builder.RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING is False


def test_direct_streaming_off_runs_nothing_of_the_patch_on_another_ray(old_versions, capsys, monkeypatch):
    """Off (the default), a deploy on another Ray touches none of Ray's modules and prints nothing."""
    from workflow.patches import ray_serve_direct_streaming

    def no_modules():
        raise AssertionError("the patch reached for Ray's modules")

    monkeypatch.setattr(ray_serve_direct_streaming, "_modules", no_modules)
    monkeypatch.setattr(ray_serve_direct_streaming, "_switched_on", False)
    monkeypatch.delenv("RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING", raising=False)
    ray_serve_direct_streaming.set_direct_streaming(False)
    assert capsys.readouterr().err == ""
    # Switched on by the environment (Ray reads it at import) on another Ray: one warning, Ray's modules untouched.
    monkeypatch.setenv("RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING", "1")
    ray_serve_direct_streaming.set_direct_streaming(False)
    assert "serve.direct_streaming is off" in _one_warning(capsys)


def test_direct_streaming_off_resets_the_builder_only_after_it_was_on(monkeypatch):
    import importlib

    from ray.llm._internal.serve.core.ingress import builder

    from workflow.patches import ray_serve_direct_streaming

    for module, name in ray_serve_direct_streaming.TARGETS:  # restored after the test
        module = importlib.import_module(module)
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(ray_serve_direct_streaming, "_switched_on", False)
    monkeypatch.delenv("RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING", raising=False)
    monkeypatch.setattr(builder, "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING", "left alone")
    ray_serve_direct_streaming.set_direct_streaming(False)
    assert builder.RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING == "left alone"
    ray_serve_direct_streaming.set_direct_streaming(True)
    ray_serve_direct_streaming.set_direct_streaming(False)
    assert builder.RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING is False


def test_workflow_ingress_only_with_the_tested_ray(old_versions, capsys):
    from workflow.core.errors import WorkflowError
    from workflow.serving import app

    assert app.ingress_cls_config(None) is None  # Ray's own ingress
    assert "no API key check" in _one_warning(capsys)
    with pytest.raises(WorkflowError, match="serve.api_key_env needs the workflow ingress"):
        app.ingress_cls_config("a-key")


def test_packed_attention_says_why_it_is_not_used_outside_the_tested_versions(old_versions):
    from workflow.patches import packed_attention

    neat = types.SimpleNamespace(neat_packing=True, block_diag_attn=True)
    reason = packed_attention.why_not_varlen(model=None, collate_fn=neat)
    assert reason.startswith("workflow.patches.packed_attention not applied: llamafactory 0.1.0 is outside")


@pytest.mark.heavy
def test_the_train_cleaner_reads_the_controllers_state_from_the_gcs(monkeypatch):
    """Without a dashboard (this Ray has none), the GCS actor table says whether an actor lives."""
    import ray
    from ray.train.v2._internal.execution.controller import placement_group_cleaner as cleaner

    from workflow.patches import ray_train_controller_state as patch

    monkeypatch.setattr(cleaner, "is_actor_alive", cleaner.is_actor_alive)  # restored after the test
    patch.apply()
    assert cleaner.is_actor_alive is patch.controller_alive
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        actor = ray.remote(num_cpus=0)(type("Controller", (), {"ping": lambda self: 1})).remote()
        ray.get(actor.ping.remote())
        actor_id = actor._actor_id.hex()
        assert cleaner.is_actor_alive(actor_id, timeout=5) is True
        ray.kill(actor)
        deadline = time.monotonic() + 30
        while cleaner.is_actor_alive(actor_id, timeout=5) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cleaner.is_actor_alive(actor_id, timeout=5) is False
    finally:
        ray.shutdown()


def test_the_train_cleaner_is_left_as_ray_ships_it_outside_the_tested_versions(old_versions, capsys, monkeypatch):
    from ray.train.v2._internal.execution.controller import placement_group_cleaner as cleaner

    from workflow.patches import ray_train_controller_state as patch

    monkeypatch.setattr(cleaner, "is_actor_alive", cleaner.is_actor_alive)
    before = cleaner.is_actor_alive
    patch.apply()
    assert cleaner.is_actor_alive is before
    line = _one_warning(capsys)
    assert "ray_train_controller_state not applied: ray 0.1.0" in line and "dashboard" in line


def test_haproxy_listeners_stay_as_ray_binds_them_outside_the_tested_ray(old_versions, capsys):
    from ray.serve._private import controller

    from workflow.patches import ray_serve_haproxy_listeners as patch

    rays = controller.HAProxyManager
    assert patch.cluster_env() == {}
    patch.in_controller()
    assert controller.HAProxyManager is rays
    assert "listen on every interface" in _one_warning(capsys)


def test_haproxy_listeners_are_left_where_the_template_lacks_its_bind_lines(capsys, monkeypatch):
    from ray.serve._private import haproxy

    from workflow.patches import ray_serve_haproxy_listeners as patch

    monkeypatch.setattr(patches, "_warned", set())
    monkeypatch.setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", "listen stats\n  bind *:8404\n")
    assert not patch.bind_listeners_to_loopback()
    assert haproxy.HAPROXY_CONFIG_TEMPLATE == "listen stats\n  bind *:8404\n"
    assert "has no line" in _one_warning(capsys)


def test_lm_head_adapters_are_left_to_vllm_outside_the_tested_vllm(old_versions, capsys):
    from workflow.inference import adapters

    tensors = {"base_model.model.lm_head.lora_A.weight": {}}
    assert adapters.modules_vllm_does_not_adapt(tensors, ["Qwen2ForCausalLM"]) == []  # inside: ["lm_head"]
    line = _one_warning(capsys)
    assert "vllm_model_registry not applied: vllm 0.1.0" in line and "not refused before an engine loads" in line


def test_lm_head_adapters_are_left_to_vllm_where_the_registry_lacks_its_loader(capsys, monkeypatch):
    from vllm.model_executor.models import ModelRegistry

    from workflow.inference import adapters

    monkeypatch.setattr(patches, "_warned", set())
    tensors = {"base_model.model.lm_head.lora_A.weight": {}}
    assert adapters.modules_vllm_does_not_adapt(tensors, ["Qwen2ForCausalLM"]) == ["lm_head"]
    monkeypatch.delattr(type(ModelRegistry), "_try_load_model_cls")
    assert adapters.modules_vllm_does_not_adapt(tensors, ["Qwen2ForCausalLM"]) == []
    assert "ModelRegistry._try_load_model_cls does not exist" in _one_warning(capsys)


def test_cpu_engines_keep_rays_scheduler_limits_outside_the_tested_vllm(old_versions, capsys):
    from workflow.inference import processor

    cpu = {"placement_group_config": {"bundles": [{"CPU": 1}]}}
    assert processor.offline_scheduler_limits({"tensor_parallel_size": 2}, cpu) == {"tensor_parallel_size": 2}
    line = _one_warning(capsys)
    assert "vllm_offline_batch_defaults not applied: vllm 0.1.0" in line and "max_num_seqs" in line


def test_running_serves_http_options_are_not_read_outside_the_tested_ray(old_versions, capsys, monkeypatch):
    from ray.serve import context

    from workflow.serving import app

    def no_client(**kwargs):
        raise AssertionError("read Serve's private client")

    monkeypatch.setattr(context, "_get_global_client", no_client)
    assert app.running_http_options() is None
    assert "ray_serve_http_options not applied: ray 0.1.0" in _one_warning(capsys)


def test_running_serves_http_options_without_serve(capsys, monkeypatch):
    """No Serve on the connected cluster (none is connected here): None, without a warning."""
    from ray.serve import context

    from workflow.serving import app

    monkeypatch.setattr(patches, "_warned", set())
    monkeypatch.setattr(context, "_get_global_client", lambda **kwargs: None)  # Ray's answer without a controller
    assert app.running_http_options() is None
    assert capsys.readouterr().err == ""
    monkeypatch.delattr(context, "_get_global_client")
    assert app.running_http_options() is None
    assert "_get_global_client does not exist" in _one_warning(capsys)


def test_token_auth_is_only_set_in_the_environment_outside_the_tested_ray(old_versions, capsys, monkeypatch):
    from ray import _raylet

    from workflow.patches import ray_token_auth

    class Config:
        @staticmethod
        def initialize(text):
            raise AssertionError("re-read Ray's config through its private Config")

    monkeypatch.setattr(_raylet, "Config", Config)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    ray_token_auth.use_token_auth()
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert "ray_token_auth not applied: ray 0.1.0" in _one_warning(capsys)


def test_token_auth_is_re_read_on_the_tested_ray():
    """Ray imported before RAY_AUTH_MODE is set: the mode is token after (in a process of its own, as Ray's
    config is process-wide)."""
    import subprocess
    import sys

    script = ("import ray\n"
              "from ray._raylet import AuthenticationMode, get_authentication_mode\n"
              "from workflow.patches import ray_token_auth\n"
              "before = get_authentication_mode()\n"
              "ray_token_auth.use_token_auth()\n"
              "print(before == AuthenticationMode.TOKEN, get_authentication_mode() == AuthenticationMode.TOKEN)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"], out.stderr
