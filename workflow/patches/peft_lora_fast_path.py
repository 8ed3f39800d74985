"""A faster LoRA layer for training: PEFT's ``Linear.forward`` with two passes fewer.

Applied by a Hugging Face callback that the train stage adds to LLaMA-Factory's run, only
with the PEFT versions in ``TESTED`` (it replaces forward methods and flags of PEFT's LoRA
layers); elsewhere PEFT's own forward runs, with one warning line. LoRA layers that read one
input (q/k/v, gate/up) also run as one group (``_LoraGroup``; ``WORKFLOW_LORA_GROUPS=0`` off);
those whose output is no wider than their input (o/down) with A stacked under the frozen weight
(``_LoraStack``; ``WORKFLOW_LORA_STACKED=0`` off).
"""

from __future__ import annotations

import functools
import os

from . import outside_tested, warn

PATCH = "workflow.patches.peft_lora_fast_path"
TESTED = {"peft": "==0.18.*"}
CONSEQUENCE = "PEFT's own LoRA forward runs (same results, ~13% fewer rows/s on an H100)"


def _fused_lora_linear_forward(self, x, *args, **kwargs):
    """PEFT's LoRA ``Linear.forward`` for one adapter without dropout, in fewer passes.

    PEFT computes ``result + lora_B(lora_A(x)) * scaling``: an output-sized multiply and add
    forward and another multiply backward, for each of the 196 adapted projections of a 7B
    model. Here the scaling goes into lora_B's (tiny) weight and the add into the matmul's
    epilogue (``torch.addmm``), the same sum up to rounding. Anything else (adapters off or
    merged, several adapters, mixed batches) takes PEFT's own path.
    """
    import torch

    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(self.active_adapters) != 1:
        return self._peft_forward(x, *args, **kwargs)
    (name,) = self.active_adapters
    result = self.base_layer(x, *args, **kwargs)
    low_rank = self.lora_A[name](x)
    weight_b = self.lora_B[name].weight * self.scaling[name]
    out = torch.addmm(result.reshape(-1, result.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]), weight_b.t())
    return out.view(result.shape)


# Projections that read the same input in every decoder layer (Qwen2, Llama, Mistral, ...):
# their LoRA layers run as one group (``_GroupLoraLinear``).
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _GroupLoraLinear:
    """Autograd function of a group of LoRA linears that share their input x (q/k/v, gate/up).

    PEFT runs, per projection i, ``x W_i^T + b_i + s_i (x A_i^T) B_i^T``: one read of x per
    A_i, and the rank-r product added to the output in a second pass over it (the output of
    gate/up is 5.3x the input's size). Here ``xa = x [A_1; A_2; ...]^T`` is one matmul, and
    each output is ONE matmul over the concatenated input ``[x | xa]`` with the weight
    ``[W_i | 0 .. s_i B_i .. 0]``: the frozen weight is stored with R extra columns (R = the
    group's summed ranks) that take the scaled B_i before every forward (``W_i`` is a view of
    its first columns, so no memory is added). Backward: ``d[x | xa]`` accumulates
    ``dy_i [W_i | .. s_i B_i ..]`` over the group in one buffer (no separate adds),
    ``dx + dxa [A_1; A_2; ...]`` in one matmul's epilogue, ``dA = dxa^T x`` in one matmul,
    ``dB_i = s_i dy_i^T xa_i``. Same sums as PEFT's up to rounding (in bf16 the LoRA term is
    now added before the output is rounded, where PEFT rounds the base output first). Tested
    against PEFT in fp64 (exact) and on a bf16 Qwen2 on an H100 (tests/patches/).
    """

    @staticmethod
    def build():
        import torch

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, group, x, *params):
                n = len(group.members)
                a_weights, b_weights = params[:n], params[n:]
                dtype = group.weights[0].dtype
                width = group.in_features
                x2 = x.reshape(-1, width)
                a_cat = torch.cat([a.to(dtype) for a in a_weights])
                xx = torch.cat([x2, x2 @ a_cat.t()], dim=1)  # [x | xa]
                outs = []
                for weight, b, bias, (lo, hi), scale in zip(group.weights, b_weights, group.biases,
                                                            group.spans, group.scales):
                    weight[:, width + lo:width + hi].copy_(b * scale)
                    y = torch.addmm(bias, xx, weight.t()) if bias is not None else xx @ weight.t()
                    outs.append(y.view(*x.shape[:-1], y.shape[-1]))
                ctx.group = group
                ctx.x_shape = x.shape
                ctx.a_dtypes = [a.dtype for a in a_weights]
                ctx.b_dtypes = [b.dtype for b in b_weights]
                ctx.save_for_backward(xx, a_cat)
                return tuple(outs)

            @staticmethod
            def backward(ctx, *grads):
                group = ctx.group
                xx, a_cat = ctx.saved_tensors
                width = group.in_features
                dxx = None
                grad_b = []
                for weight, dy, (lo, hi), scale, b_dtype in zip(group.weights, grads, group.spans, group.scales,
                                                                 ctx.b_dtypes):
                    if dy is None:
                        grad_b.append(None)
                        continue
                    dy = dy.reshape(-1, dy.shape[-1]).to(xx.dtype)
                    if dxx is None:
                        dxx = dy @ weight
                    else:
                        dxx.addmm_(dy, weight)
                    grad_b.append((dy.t() @ xx[:, width + lo:width + hi]).to(b_dtype) * scale)
                if dxx is None:
                    return (None, None) + (None,) * (2 * len(group.members))
                dx, dxa = dxx[:, :width], dxx[:, width:]
                grad_a_cat = dxa.t() @ xx[:, :width]
                grad_a = [grad_a_cat[lo:hi].to(a_dtype) for (lo, hi), a_dtype in zip(group.spans, ctx.a_dtypes)]
                dx = torch.addmm(dx, dxa, a_cat)  # a new, contiguous dx: the norm before needs one
                return (None, dx.view(ctx.x_shape)) + tuple(grad_a) + tuple(grad_b)

        return Fn


class _LoraGroup:
    """LoRA linears of one module that read the same input, run by ``_GroupLoraLinear``.

    The first member called with an input computes every member's output; the others return
    theirs when called with the same tensor (transformers calls q, k, v on one
    ``hidden_states``). Anything else (another input, adapters off, ...) takes the member's
    own forward.
    """

    fn = None

    def __init__(self, members: list):
        import torch

        if _LoraGroup.fn is None:
            _LoraGroup.fn = _GroupLoraLinear.build()
        self.members = members
        self.name = members[0].active_adapters[0]
        self.in_features = members[0].get_base_layer().in_features
        ranks = [m.lora_A[self.name].weight.shape[0] for m in members]
        self.rank = sum(ranks)
        starts = [sum(ranks[:i]) for i in range(len(ranks))]
        self.spans = [(lo, lo + r) for lo, r in zip(starts, ranks)]
        self.scales = [float(m.scaling[self.name]) for m in members]
        self.weights, self.biases = [], []
        for m in members:
            base = m.get_base_layer()
            old = base.weight.data
            wide = torch.zeros(old.shape[0], self.in_features + self.rank, dtype=old.dtype, device=old.device)
            wide[:, :self.in_features].copy_(old)
            base.weight.data = wide[:, :self.in_features]  # the frozen weight, now a view of the wide one
            del old
            self.weights.append(wide)
            self.biases.append(base.bias.detach() if base.bias is not None else None)
        self.pending_x = None
        self.pending: dict[int, object] = {}

    def usable(self, x) -> bool:
        return (x.dtype == self.weights[0].dtype and x.shape[-1] == self.in_features and all(
            not m.disable_adapters and not m.merged and list(m.active_adapters) == [self.name] for m in self.members))

    def forward(self, index: int, x, *args, **kwargs):
        if self.pending_x is x and index in self.pending:
            out = self.pending.pop(index)
            if not self.pending:
                self.pending_x = None
            return out
        member = self.members[index]
        if args or kwargs.get("adapter_names") is not None or not self.usable(x):
            return member._single_forward(x, *args, **kwargs)
        params = ([m.lora_A[self.name].weight for m in self.members]
                  + [m.lora_B[self.name].weight for m in self.members])
        outs = _LoraGroup.fn.apply(self, x, *params)
        self.pending_x = x
        self.pending = {i: out for i, out in enumerate(outs) if i != index}
        return outs[index]

    def restore(self) -> None:
        """Members back to their own forward, frozen weights back to plain contiguous tensors."""
        for m, wide in zip(self.members, self.weights):
            m.forward = m._single_forward
            del m._single_forward, m._lora_group
            base = m.get_base_layer()
            base.weight.data = wide[:, :self.in_features].contiguous()
        self.weights.clear()
        self.pending_x, self.pending = None, {}


class _StackedLoraLinear:
    """Autograd function of one LoRA linear whose frozen weight carries A as extra rows (o/down).

    PEFT's path for ``y = x W^T + s (x A^T) B^T`` reads x a second time for ``x A^T`` (for
    down_proj x is 5.3x the output's size), and backward writes ``dxa A`` input-sized and adds
    it to ``dy W`` in another pass (three input-sized reads and writes). Here the frozen weight
    is stored as ``[W; A]`` (A's rows under W's, padded to a multiple of 8 rows; ``W`` is a
    view of the first rows, so nothing is copied and no memory added): ``x [W; A]^T`` gives
    ``[x W^T | xa]`` in one matmul, the LoRA term is added into the output in place
    (``addmm_``), and backward computes ``dx = [dy | dxa] [W; A]`` in one matmul over the
    output gradient with ``dxa = s dy B`` as extra columns (a copy of dy, output-sized, which
    is why it is used only where the output is no wider than the input). ``dA = dxa^T x``,
    ``dB = s dy^T xa``. Same sums as PEFT's up to rounding (dx is rounded once, where PEFT
    rounds ``dy W`` and ``dxa A`` and adds them). Tested against PEFT in fp64 (exact) and on a
    bf16 Qwen2 on an H100 (tests/patches/).
    """

    @staticmethod
    def build():
        import torch

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, stack, x, a_weight, b_weight):
                tall, out_features, rank = stack.weight, stack.out_features, stack.rank
                tall[out_features:out_features + rank].copy_(a_weight)
                x2 = x.reshape(-1, stack.in_features)
                if stack.stacked_forward:
                    z = x2 @ tall.t()  # [x W^T | x A^T | 0]
                    y = z[:, :out_features]
                    xa = z[:, out_features:out_features + rank].contiguous()
                else:  # the base matmul at its own width, x A^T apart
                    y = x2 @ tall[:out_features].t()
                    xa = x2 @ tall[out_features:out_features + rank].t()
                sb = (b_weight * stack.scale).to(tall.dtype)
                y.addmm_(xa, sb.t())  # the LoRA term, in place (y may keep z's row stride)
                ctx.stack = stack
                ctx.x_shape = x.shape
                ctx.dtypes = (a_weight.dtype, b_weight.dtype)
                ctx.save_for_backward(x2, xa, sb)
                return y.view(*x.shape[:-1], out_features)

            @staticmethod
            def backward(ctx, dy):
                stack = ctx.stack
                x2, xa, sb = ctx.saved_tensors
                a_dtype, b_dtype = ctx.dtypes
                dy = dy.reshape(-1, stack.out_features).to(xa.dtype)
                dxa = dy @ sb  # s dy B
                grad_b = (dy.t() @ xa).to(b_dtype) * stack.scale
                grad_a = (dxa.t() @ x2).to(a_dtype)
                dx = None
                if ctx.needs_input_grad[1]:
                    rows = stack.out_features + stack.rank
                    dx = (torch.cat([dy, dxa], dim=1) @ stack.weight[:rows]).view(ctx.x_shape)
                return None, dx, grad_a, grad_b

        return Fn


class _LoraStack:
    """One LoRA linear run by ``_StackedLoraLinear``; the same interface as ``_LoraGroup``."""

    fn = None

    def __init__(self, member):
        import torch

        if _LoraStack.fn is None:
            _LoraStack.fn = _StackedLoraLinear.build()
        self.members = [member]
        self.name = member.active_adapters[0]
        base = member.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = member.lora_A[self.name].weight.shape[0]
        self.scale = float(member.scaling[self.name])
        self.stacked_forward = os.environ.get("WORKFLOW_LORA_STACKED", "1") != "backward"
        align = max(1, int(os.environ.get("WORKFLOW_LORA_STACKED_ALIGN", "8")))
        old = base.weight.data
        rows = self.out_features + self.rank + (-self.rank) % align  # 8: 16-byte aligned rows of z in bf16
        self.weight = torch.zeros(rows, self.in_features, dtype=old.dtype, device=old.device)
        self.weight[:self.out_features].copy_(old)
        base.weight.data = self.weight[:self.out_features]  # the frozen weight, a view of the tall one
        del old

    def usable(self, x) -> bool:
        m = self.members[0]
        return (x.dtype == self.weight.dtype and x.shape[-1] == self.in_features and not m.disable_adapters
                and not m.merged and list(m.active_adapters) == [self.name])

    def forward(self, index: int, x, *args, **kwargs):
        member = self.members[0]
        if args or kwargs.get("adapter_names") is not None or not self.usable(x):
            return member._single_forward(x, *args, **kwargs)
        return _LoraStack.fn.apply(self, x, member.lora_A[self.name].weight, member.lora_B[self.name].weight)

    def restore(self) -> None:
        """The member back to its own forward, the frozen weight back to a tensor of its own."""
        m = self.members[0]
        m.forward = m._single_forward
        del m._single_forward, m._lora_group
        m.get_base_layer().weight.data = self.weight[:self.out_features].clone()
        self.weight = None


def _group_reason(members: list) -> str | None:
    """None when these LoRA linears can run as one ``_LoraGroup``; else why not."""
    import torch

    first = members[0]
    if not all(hasattr(m, "_peft_forward") for m in members):
        return "a member is not on the fast path"
    names = {tuple(m.active_adapters) for m in members}
    if len(names) != 1 or len(next(iter(names))) != 1:
        return "not one active adapter"
    bases = [m.get_base_layer() for m in members]
    if not all(isinstance(b, torch.nn.Linear) for b in bases):
        return "a base layer is not torch.nn.Linear"
    if len({b.in_features for b in bases}) != 1 or len({b.weight.dtype for b in bases}) != 1:
        return "members differ in input width or dtype"
    if any(b.weight.requires_grad or (b.bias is not None and b.bias.requires_grad) for b in bases):
        return "a base weight is trained"
    if any(m.use_dora.get(first.active_adapters[0], False) for m in members if hasattr(m, "use_dora")):
        return "DoRA"
    return None


def lora_fast_path_callback():
    """A Hugging Face callback that takes two avoidable passes out of every LoRA layer.

    1. PEFT keeps adapter weights in fp32 and casts each adapted layer's input to that dtype
       before the LoRA matmuls; under bf16/fp16 autocast those matmuls cast it straight back,
       so every adapted projection paid two activation-sized copies forward and two backward
       for an identical result (17% of the GPU time of a Qwen2.5-7B step). Under autocast the
       input stays in the autocast dtype; the weights stay fp32 (the optimizer's copy).
    2. Plain LoRA layers (one adapter, no dropout, no DoRA-like variant, inputs and weights of
       one dtype or autocast on) run ``_fused_lora_linear_forward``.

    3. The LoRA layers of projections that read one input (q/k/v, gate/up: ``SHARED_INPUT_GROUPS``)
       run as one group (``_GroupLoraLinear``): one ``x A^T`` for the group, and each output in
       one matmul over ``[x | xa]`` (no second pass over the output to add the LoRA term).
       ``WORKFLOW_LORA_GROUPS=0`` keeps 1 and 2 only. The frozen weights of grouped projections
       are views of wider ones during training and plain tensors again at its end.
    4. Other LoRA layers whose output is no wider than their input and whose base has no bias
       (o/down) run with A stacked under the frozen weight (``_StackedLoraLinear``): ``x A^T``
       comes out of the base matmul, and backward's input gradient is one matmul, not two and
       an add. ``WORKFLOW_LORA_STACKED=0`` off; ``=backward`` stacks in the backward only (the
       forward multiplies by W and A apart); ``WORKFLOW_LORA_STACKED_ALIGN`` (8) pads the
       stacked rows to a multiple. The frozen weights are views of taller ones during training,
       as in 3.

    ``WORKFLOW_FUSED_LORA=0`` keeps PEFT's own forward (all four off).

    The callback also applies ``workflow.patches.liger_flce_nosync`` (Liger's fused linear
    cross-entropy without its two host waits a step) when Liger is in use: it is the one callback
    of the train stage that changes how a training step runs on any model.
    bench/train_throughput.py measures both (bench/README.md).
    """
    from transformers import TrainerCallback

    class LoraFastPath(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # Not LoRA, but a pass of the same step: Liger's loss without its host waits
            # (workflow.patches.liger_flce_nosync; WORKFLOW_LIGER_NOSYNC=0 keeps Liger's).
            from .liger_flce_nosync import apply as liger_nosync

            liger_nosync(getattr(args, "process_index", 0))
            if model is None or os.environ.get("WORKFLOW_FUSED_LORA", "1") == "0":
                return
            problem = outside_tested(TESTED)
            if problem:
                if args.process_index == 0:
                    warn(PATCH, f"{problem}; {CONSEQUENCE}")
                return
            import torch
            from peft.tuners.lora import Linear as LoraLinear

            autocast = bool(args.bf16 or args.fp16)
            for module in model.modules():
                if not isinstance(module, LoraLinear):
                    continue
                if autocast:
                    module.cast_input_dtype_enabled = False
                plain = (len(module.lora_A) == 1 and not module.lora_variant
                         and all(isinstance(d, torch.nn.Identity) for d in module.lora_dropout.values()))
                same_dtype = all(module.get_base_layer().weight.dtype == a.weight.dtype for a in module.lora_A.values())
                if plain and (autocast or same_dtype) and not hasattr(module, "_peft_forward"):
                    module._peft_forward = module.forward
                    module.forward = _fused_lora_linear_forward.__get__(module)
            self.groups = []
            if os.environ.get("WORKFLOW_LORA_GROUPS", "1") != "0":
                self.groups = shared_input_groups(model)
            if os.environ.get("WORKFLOW_LORA_STACKED", "1") != "0":
                self.groups += stacked_singles(model)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            for group in getattr(self, "groups", []):
                group.restore()
            self.groups = []

    return LoraFastPath()


def shared_input_groups(model) -> list:
    """Run the LoRA linears of ``SHARED_INPUT_GROUPS`` in every module as ``_LoraGroup`` s.

    Only members already on the fast path (``_fused_lora_linear_forward``), with one adapter,
    frozen ``torch.nn.Linear`` bases of one input width and dtype. Returns the groups made.
    """
    from peft.tuners.lora import Linear as LoraLinear

    groups = []
    for module in model.modules():
        for names in SHARED_INPUT_GROUPS:
            members = [getattr(module, n, None) for n in names]
            if not all(isinstance(m, LoraLinear) for m in members) or any(hasattr(m, "_lora_group") for m in members):
                continue
            if _group_reason(members) is not None:
                continue
            group = _LoraGroup(members)
            for index, m in enumerate(members):
                m._single_forward = m.forward
                m._lora_group = group
                m.forward = functools.partial(group.forward, index)
            groups.append(group)
    return groups


def stacked_singles(model) -> list:
    """Run the fast-path LoRA linears outside a group as ``_LoraStack`` s, where it saves passes.

    Only where the output is no wider than the input (o/down: the backward's copy of the output
    gradient is then cheaper than the input-sized pass it saves), the base has no bias, and
    ``_group_reason`` would accept it alone. Returns the stacks made.
    """
    from peft.tuners.lora import Linear as LoraLinear

    stacks = []
    for module in model.modules():
        if not isinstance(module, LoraLinear) or hasattr(module, "_lora_group") or _group_reason([module]) is not None:
            continue
        base = module.get_base_layer()
        if base.bias is not None or base.out_features > base.in_features:
            continue
        stack = _LoraStack(module)
        module._single_forward = module.forward
        module._lora_group = stack
        module.forward = functools.partial(stack.forward, 0)
        stacks.append(stack)
    return stacks
