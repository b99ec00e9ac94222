"""LLaMA-Adapter V2 layers (Gao et al. 2023, https://arxiv.org/abs/2304.15010; spec `llama_adapter_v2.md`).

* `Linear`: bias, scale and optional LoRA on a linear layer (paper Eq. 1; spec §2d, §2e, §2g).
* `OutputProjection`: a `Linear` on `o_proj` that also holds the layer's adaption prompt and gate; the gated term
  itself is computed in `peft_mma.attention`, where the attention's query is (spec §2c).
* `Norm`: a tuned RMSNorm weight (spec §2f).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ..attention import gated_prompt_key_value, prompt_attention
from ..tuner_utils import MMATunerLayer, adapter_parameter_kwargs, unused_parameters_zero
from ..utils import apply_in_autocast_dtype
from ..utils import cast_to as _cast
from .config import LlamaAdapterV2Config
from .function import OutputScale, ScaledLinear, TunedRMSNorm

PREFIX = "mma_adapter_v2_"
_LLAMA_RMS_NORM = LlamaRMSNorm.forward  # the computation `Norm` reproduces with the tuned weight


class LlamaAdapterV2Layer(MMATunerLayer):
    """Mixin owning the adapter containers; concrete layers also subclass `nn.Module`."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def _safe_assign(self, tensors: dict[str, torch.Tensor], safe_merge: bool, adapter: str) -> None:
        """Check every merged tensor, then assign them all: a failed merge changes nothing."""
        if safe_merge and not all(torch.isfinite(t).all() for t in tensors.values()):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        base = self.get_base_layer()
        for name, tensor in tensors.items():
            if name == "weight":
                self.set_base_weight(tensor)
            elif getattr(base, name, None) is None:
                setattr(base, name, nn.Parameter(tensor, requires_grad=False))
            else:
                getattr(base, name).data = tensor


class Linear(nn.Module, LlamaAdapterV2Layer):
    """Bias, scale and LoRA on a frozen linear layer W (with its own bias b₀, if any):

        output side (paper Eq. 1):  y = s ⊙ ((W + γ·B A) x + b₀ + b)
        input side (chat-65B):      y = (W + γ·B A)(s ⊙ x) + b₀ + b

    b ∈ R^out init 0; s ∈ R^out (output side) or R^in (input side) init 1; A ∈ R^{r×in} Kaiming-uniform init,
    B ∈ R^{out×r} init 0, γ = α / r (1 in the official code). All trainable. With several active adapters the
    scales multiply and the bias and LoRA terms add.
    """

    adapter_layer_names = (PREFIX + "bias", PREFIX + "scale", PREFIX + "lora_A", PREFIX + "lora_B")
    other_param_names = ("scale_side", "lora_scaling", "prompt_path")

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer, adapter_name)
        self.mma_adapter_v2_bias = nn.ParameterDict()
        self.mma_adapter_v2_scale = nn.ParameterDict()
        self.mma_adapter_v2_lora_A = nn.ModuleDict()
        self.mma_adapter_v2_lora_B = nn.ModuleDict()
        self.scale_side: dict[str, str] = {}
        self.lora_scaling: dict[str, float] = {}
        # adapter → how the prompts of this layer's attention read this k_proj / v_proj: "base" (frozen W only) or
        # "adapted" (bias and scale, no LoRA); absent where no prompt reads it
        self.prompt_path: dict[str, str] = {}
        self._created_bias = False

    @property
    def in_features(self) -> int:
        return self.get_base_layer().in_features

    @property
    def out_features(self) -> int:
        return self.get_base_layer().out_features

    def update_layer(
        self, adapter_name: str, config: LlamaAdapterV2Config, name: str, prompt_path: str | None = None
    ) -> None:
        """Add `adapter_name`'s parameters for the linear called `name` (e.g. "q_proj")."""
        kw = adapter_parameter_kwargs(self.get_base_layer())
        if prompt_path is not None:
            self.prompt_path[adapter_name] = prompt_path
        if name in config.bias_modules:
            self.mma_adapter_v2_bias[adapter_name] = nn.Parameter(torch.zeros(self.out_features, **kw))
        if name in config.scale_modules:
            width = self.out_features if config.scale_side == "output" else self.in_features
            self.mma_adapter_v2_scale[adapter_name] = nn.Parameter(torch.ones(width, **kw))
        self.scale_side[adapter_name] = config.scale_side
        if name in config.lora_modules:
            self.mma_adapter_v2_lora_A[adapter_name] = nn.Linear(self.in_features, config.r, bias=False, **kw)
            self.mma_adapter_v2_lora_B[adapter_name] = nn.Linear(config.r, self.out_features, bias=False, **kw)
            self.lora_scaling[adapter_name] = config.lora_scaling
        self.reset_parameters(adapter_name, config.init_weights)
        self._finish_update(adapter_name, config)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """b = 0, s = 1, A Kaiming-uniform, B = 0 (identity); `init_weights=False` draws random values instead."""
        if adapter_name in self.mma_adapter_v2_lora_A:
            nn.init.kaiming_uniform_(self.mma_adapter_v2_lora_A[adapter_name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.mma_adapter_v2_lora_B[adapter_name].weight)
        if init_weights:
            return
        for container in (self.mma_adapter_v2_bias, self.mma_adapter_v2_lora_B):
            if adapter_name in container:
                param = container[adapter_name]
                param = param.weight if isinstance(param, nn.Module) else param
                param.normal_(0.0, 0.1)
        if adapter_name in self.mma_adapter_v2_scale:
            self.mma_adapter_v2_scale[adapter_name].uniform_(0.5, 1.5)

    def _active(self, container: nn.Module) -> list[str]:
        return [a for a in self.active_adapters if a in container]

    def forward(self, x: torch.Tensor, *args, use_lora: bool = True, **kwargs) -> torch.Tensor:
        if self.merged_adapters and not self._disable_adapters:  # the common merged case first: a decoding step
            return self.base_layer(x, *args, **kwargs)  # runs it for every linear, so it checks no property
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        dtype, active = x.dtype, self.active_adapters
        scale, bias, lora_A = self.mma_adapter_v2_scale, self.mma_adapter_v2_bias, self.mma_adapter_v2_lora_A
        scales = [(scale[a], self.scale_side[a]) for a in active if a in scale]
        biases = [bias[a] for a in active if a in bias]
        loras = [a for a in active if a in lora_A] if use_lora else []
        if len(scales) == 1 and not loras and self._plain_base(args, kwargs):  # the common case: one node
            s, side = scales[0]
            return apply_in_autocast_dtype(
                ScaledLinear, x, self.base_layer.weight, self._total_bias(biases), s, side == "output"
            )
        for s, side in scales:
            if side == "input":
                x = x * _cast(s, dtype)
        y = self._base_plus_bias(x, biases, *args, **kwargs)
        for a in loras:
            lora_B = self.mma_adapter_v2_lora_B[a]
            y = y + _cast(lora_B(lora_A[a](_cast(x, lora_B.weight.dtype))) * self.lora_scaling[a], y.dtype)
        for s, side in scales:
            if side == "output":
                y = OutputScale.apply(y, _cast(s, y.dtype)) if torch.is_grad_enabled() else y * _cast(s, y.dtype)
        return _cast(y, dtype)

    def _plain_base(self, args: tuple, kwargs: dict) -> bool:
        """A plain frozen `nn.Linear` base called without extras (no hooks, no quantization, no forward override)."""
        base = self.base_layer
        return (
            type(base) is nn.Linear
            and not (base._forward_hooks or base._forward_pre_hooks or args or kwargs)
            and "forward" not in base.__dict__
            and not self.quantization_backend
            and not base.weight.requires_grad
        )

    def _total_bias(self, biases: list[torch.Tensor]) -> torch.Tensor | None:
        """b₀ + Σ b in the base weight's dtype, or None when there is no bias at all."""
        total = self.base_layer.bias
        for b in biases:
            b = _cast(b, self.base_layer.weight.dtype)
            total = b if total is None else total + b
        return total

    def _base_plus_bias(self, x: torch.Tensor, biases: list[torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """W x + b₀ + Σ b. A plain `nn.Linear` (no hooks, no quantization) takes the biases into its own GEMM
        (one op instead of a matmul and an add per bias); any other base layer runs as it is, then adds them."""
        base = self.base_layer
        plain = type(base) is nn.Linear and not (base._forward_hooks or base._forward_pre_hooks or args or kwargs)
        if plain and biases and "forward" not in base.__dict__ and not self.quantization_backend:
            return F.linear(x, base.weight, self._total_bias(biases))
        y = base(x, *args, **kwargs)
        y = self.quantization_backend.maybe_clone_base_result(y) if self.quantization_backend else y
        for b in biases:
            y = y + _cast(b, y.dtype)
        return y

    def get_delta(self, adapter: str) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(s, b, γ·B A) of one adapter in fp32, each `None` where the adapter has none."""
        scale = self.mma_adapter_v2_scale[adapter].float() if adapter in self.mma_adapter_v2_scale else None
        bias = self.mma_adapter_v2_bias[adapter].float() if adapter in self.mma_adapter_v2_bias else None
        lora = None
        if adapter in self.mma_adapter_v2_lora_A:
            lora_A, lora_B = self.mma_adapter_v2_lora_A[adapter].weight, self.mma_adapter_v2_lora_B[adapter].weight
            lora = (lora_B.float() @ lora_A.float()) * self.lora_scaling[adapter]
        return scale, bias, lora

    def _foldable(self, adapters: list[str]) -> bool:
        """False where prompts read this k_proj / v_proj differently from the tokens, so that folding `adapters`
        would change what they read: through the frozen weights ("base") while an adapter has any part here, or
        with bias and scale but no LoRA ("adapted") while one has LoRA here."""
        paths = set(self.prompt_path.values())
        deltas = [self.get_delta(adapter) for adapter in adapters]
        if "base" in paths and any(part is not None for delta in deltas for part in delta):
            return False
        return "adapted" not in paths or all(lora is None for _, _, lora in deltas)

    def _behind_merged(
        self, bias: torch.Tensor | None, lora: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(P_out ⊙ b, diag(P_out) γBA diag(P_in)): an adapter's bias and LoRA term as the scales of the adapters
        merged before it act on them (P_out, P_in: the products of their output-side and input-side scales)."""
        for adapter in self.merged_adapters:
            if adapter not in self.mma_adapter_v2_scale:
                continue
            scale = self.mma_adapter_v2_scale[adapter].float()
            if self.scale_side[adapter] == "output":
                bias = None if bias is None else bias * scale
                lora = None if lora is None else lora * scale[:, None]
            elif lora is not None:
                lora = lora * scale[None, :]
        return bias, lora

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold into W and b₀, one adapter after another. With the scales of the adapters merged before it
        multiplied into P_out (output side) and P_in (input side), adapter a (s, b, γ·B A) gives

            W′ = diag(s_out) (W + diag(P_out) γBA diag(P_in)) diag(s_in),    b₀′ = s_out ⊙ (b₀ + P_out ⊙ b)

        (s_out = s on the output side, s_in on the input side, 1 otherwise): after every adapter, y = W′x + b₀′ is
        the forward of all of them, whose scales multiply and whose biases and LoRA terms add (`_behind_merged`).

        A prompted layer's k_proj / v_proj stay unmerged, for all the adapters at once, when its prompts read them
        without (some of) the adapters (`prompt_kv_adapted`, `_foldable`); their forward then applies the adapters
        as before, so the logits are kept."""
        adapters = check_adapters_to_merge(self, adapter_names)
        if not self._foldable(adapters):
            return
        for adapter in adapters:
            scale, bias, lora = self.get_delta(adapter)
            if scale is None and bias is None and lora is None:
                self.merged_adapters.append(adapter)
                continue
            bias, lora = self._behind_merged(bias, lora)
            weight = self.get_base_weight()
            base_bias = self.get_base_layer().bias
            w = weight.float() + (lora if lora is not None else 0)
            b = base_bias.float() if base_bias is not None else torch.zeros(self.out_features, device=w.device)
            b = b + (bias if bias is not None else 0)
            if scale is not None and self.scale_side[adapter] == "output":
                w, b = w * scale[:, None], b * scale
            elif scale is not None:
                w = w * scale[None, :]
            new = {"weight": w.to(weight.dtype)}
            if bias is not None or base_bias is not None:
                new["bias"] = b.to(weight.dtype if base_bias is None else base_bias.dtype)
            self._created_bias |= base_bias is None and "bias" in new
            self._safe_assign(new, safe_merge, adapter)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Invert `merge`, last merged adapter first (s must have no zero entries):
        W = diag(1/s_out) W′ diag(1/s_in) − diag(P_out) γBA diag(P_in),  b₀ = b₀′ / s_out − P_out ⊙ b."""
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            scale, bias, lora = self.get_delta(adapter)
            if scale is None and bias is None and lora is None:
                continue
            bias, lora = self._behind_merged(bias, lora)  # the adapters merged before this one
            weight, base_bias = self.get_base_weight(), self.get_base_layer().bias
            w = weight.float()
            b = base_bias.float() if base_bias is not None else None
            if scale is not None and self.scale_side[adapter] == "output":
                w = w / scale[:, None]
                b = b / scale if b is not None else None
            elif scale is not None:
                w = w / scale[None, :]
            w = w - (lora if lora is not None else 0)
            new = {"weight": w.to(weight.dtype)}
            if b is not None:
                new["bias"] = (b - (bias if bias is not None else 0)).to(base_bias.dtype)
            self._safe_assign(new, False, adapter)
        if self._created_bias:
            self.get_base_layer().bias = None
            self._created_bias = False


class OutputProjection(Linear):
    """`Linear` on `o_proj` that also holds the layer's adaption prompt P (K × C, N(0, 1) init), per-head gate g
    (H, zero init) and optional `new_gate` ν (1, one init). `gated_prompt_term` returns, summed over active
    adapters, the term that `peft_mma.attention` defines, with the prompt (plus the visual
    tokens V, where this layer is fused) projected by the layer's k_proj/v_proj:  k_p = W_k (P + V), v_p = W_v (P + V).
    """

    adapter_layer_names = Linear.adapter_layer_names + (PREFIX + "prompt", PREFIX + "gate", PREFIX + "gate_scale")
    other_param_names = Linear.other_param_names + ("gate_activation", "visual_fused", "prompt_kv_adapted")

    def __init__(self, base_layer: nn.Module, adapter_name: str, num_heads: int) -> None:
        super().__init__(base_layer, adapter_name)
        self.num_heads = num_heads
        self.mma_adapter_v2_prompt = nn.ParameterDict()
        self.mma_adapter_v2_gate = nn.ParameterDict()
        self.mma_adapter_v2_gate_scale = nn.ParameterDict()
        self.gate_activation: dict[str, str | None] = {}
        self.visual_fused: dict[str, bool] = {}
        self.prompt_kv_adapted: dict[str, bool] = {}

    def update_layer(
        self,
        adapter_name: str,
        config: LlamaAdapterV2Config,
        name: str,
        prompted: bool = False,
        gated: bool = False,
        visual_fused: bool = False,
    ) -> None:
        """Add the gate (where `gated`) and the prompt (where `prompted`), then the `Linear` parameters."""
        weight = self.get_base_layer().weight
        kw = adapter_parameter_kwargs(self.get_base_layer())
        if prompted:
            self.mma_adapter_v2_prompt[adapter_name] = nn.Parameter(
                torch.empty(config.prompt_length, self.out_features, **kw)
            )
        if gated:
            self.mma_adapter_v2_gate[adapter_name] = nn.Parameter(torch.zeros(self.num_heads, **kw))
        if gated and config.prompt_gate_scale:
            self.mma_adapter_v2_gate_scale[adapter_name] = nn.Parameter(torch.ones(1, **kw))
        self.gate_activation[adapter_name] = config.gate_activation
        self.visual_fused[adapter_name] = bool(visual_fused)
        self.prompt_kv_adapted[adapter_name] = config.prompt_kv_adapted
        with torch.no_grad():
            if prompted and weight.device.type != "meta":
                nn.init.normal_(self.mma_adapter_v2_prompt[adapter_name])
            if gated and not config.init_weights and weight.device.type != "meta":
                self.mma_adapter_v2_gate[adapter_name].normal_(0.0, 0.5)
        super().update_layer(adapter_name, config, name)

    def _gate(self, adapter: str) -> torch.Tensor:
        gate = self.mma_adapter_v2_gate[adapter]
        gate = torch.tanh(gate) if self.gate_activation[adapter] == "tanh" else gate
        if adapter in self.mma_adapter_v2_gate_scale:
            gate = gate * self.mma_adapter_v2_gate_scale[adapter]
        return gate

    def _project(self, linear: nn.Module, prompt: torch.Tensor, adapted: bool) -> torch.Tensor:
        """k_proj / v_proj of the prompt: the frozen base weights, or with this adapter's bias and scale (no LoRA)."""
        if adapted and isinstance(linear, Linear):
            return linear(prompt, use_lora=False)
        base = linear.get_base_layer() if isinstance(linear, BaseTunerLayer) else linear
        return base(prompt)

    def prompt_key_value(self, attention: nn.Module, adapter: str, state, dtype: torch.dtype):
        """(k_p, v_p), each (B or 1, H_kv, K, d); cached in the per-call `state` when no gradient is recorded."""
        cache = state.cache if state is not None and not torch.is_grad_enabled() else None
        key = (id(self), adapter) if cache is not None else None  # no id() under gradients: one compiled layer
        if cache is not None and key in cache:
            return cache[key]
        prompt = self.mma_adapter_v2_prompt[adapter][None]  # (1, K, C)
        visual = state.visual.get(adapter) if state is not None and self.visual_fused[adapter] else None
        if visual is not None:
            self._check_not_reentrant(adapter, visual, state)
            prompt = prompt + visual.to(prompt.dtype)  # (B, K, C)
        prompt = prompt.to(dtype)
        adapted = self.prompt_kv_adapted[adapter]
        head_dim = attention.head_dim
        k_p = self._project(attention.k_proj, prompt, adapted)  # (B, K, H_kv·d)
        v_p = self._project(attention.v_proj, prompt, adapted)
        k_p = k_p.view(*k_p.shape[:2], -1, head_dim).transpose(1, 2)  # (B, H_kv, K, d)
        v_p = v_p.view(*v_p.shape[:2], -1, head_dim).transpose(1, 2)
        if cache is not None:
            cache[key] = (k_p, v_p)
        return k_p, v_p

    @staticmethod
    def _check_not_reentrant(adapter: str, visual: torch.Tensor, state) -> None:
        """V carries the bridge's graph, but this layer records none: the first pass of reentrant gradient
        checkpointing. Its backward runs each layer's own `backward` and would go through the shared bridge once
        per fused layer, which torch allows once; refused from the second fused layer on, with what to do."""
        if not visual.requires_grad or torch.is_grad_enabled():
            return
        state.unrecorded[adapter] = state.unrecorded.get(adapter, 0) + 1
        if state.unrecorded[adapter] > 1:
            raise ValueError(
                f"Adapter {adapter!r} adds its visual tokens in several layers, and reentrant gradient checkpointing "
                "would run each layer's backward through the visual bridge they share, which torch can do only "
                "once. Enable checkpointing with `gradient_checkpointing_kwargs={'use_reentrant': False}` "
                "(transformers' default), or fuse into one layer (`visual_fusion='early'`, `early_fusion_layers=1`)."
            )

    def _gated_key_value(self, attention: nn.Module, adapter: str, state, query: torch.Tensor):
        """Per-head keys and gated values for `query`'s batch (`attention.gated_prompt_key_value`), (B, H, K, d);
        without gradients cached per call, so that a decoding step only runs the attention itself."""
        cache = state.cache if state is not None and not torch.is_grad_enabled() else None
        batch = query.shape[0]
        key = (id(self), adapter, "gated", batch, query.dtype) if cache is not None else None
        if cache is not None and key in cache:
            return cache[key]
        k_p, v_p = self.prompt_key_value(attention, adapter, state, query.dtype)
        if k_p.shape[0] not in (1, batch):  # beams / several samples per prompt in generate
            k_p = k_p.repeat_interleave(batch // k_p.shape[0], dim=0)
            v_p = v_p.repeat_interleave(batch // v_p.shape[0], dim=0)
        gated = gated_prompt_key_value(k_p, v_p, self._gate(adapter), query.shape[1], query.dtype)
        if gated[0].shape[0] != batch:  # text-only prompts, one for the batch: a view, no copy
            gated = tuple(t.expand(batch, -1, -1, -1) for t in gated)
        if cache is not None:
            cache[key] = gated
        return gated

    def gated_prompt_term(self, attention: nn.Module, query: torch.Tensor, state) -> torch.Tensor | None:
        """Σ_adapters a(g) · ν · softmax(q k_pᵀ / √d) v_p, (B, T, H, d); `None` when no prompt is active."""
        if self.disable_adapters:
            return None
        cache = state.cache if state is not None and not torch.is_grad_enabled() else None
        pairs = None
        if cache is not None:  # what a decoding step needs, looked up once
            step_key = (id(self), query.shape[0], query.dtype)
            pairs = cache.get(step_key)
        if pairs is None:
            adapters = self._active(self.mma_adapter_v2_prompt)
            if state is None and any(self.visual_fused[adapter] for adapter in adapters):
                raise ValueError(
                    "This LLaMA-Adapter V2 adapter has a visual path, which lives on its tuner: call the model "
                    "through its `PeftModel` (`PeftModel.from_pretrained`, `get_peft_model`), not the wrapped LLaMA. "
                    "transformers' `load_adapter` and `AutoModelForCausalLM.from_pretrained(adapter)` keep the "
                    "LLaMA only and would ignore the images."
                )
            pairs = [self._gated_key_value(attention, adapter, state, query) for adapter in adapters]
            if cache is not None:
                cache[step_key] = pairs
        term = None
        for key, value in pairs:
            out = prompt_attention(query, key, value, attention.scaling)
            term = out if term is None else term + out
        # a gate without a prompt (`gate_layers="all"`: every layer has one, the top L have prompts) is unused;
        # under DDP it gets an exact zero so that every rank uses every trainable parameter
        idle = [a for a in self._active(self.mma_adapter_v2_gate) if a not in self.mma_adapter_v2_prompt]
        idle_params = [
            c[a] for a in idle for c in (self.mma_adapter_v2_gate, self.mma_adapter_v2_gate_scale) if a in c
        ]
        zero = unused_parameters_zero(idle_params) if idle_params else None
        if zero is not None:
            term = zero if term is None else term + zero
        return term


class Norm(nn.Module, LlamaAdapterV2Layer):
    """Tuned RMSNorm: y = (w + Δ) ⊙ x / √(mean(x²) + ε), computed as base(x) + Δ ⊙ n(x) with n(x) the normalised
    input (on a `LlamaRMSNorm` from one normalisation shared by both terms), so Δ = 0 (init) is exactly the base
    norm. Δ ∈ R^C is trainable; the official checkpoints store w + Δ."""

    adapter_layer_names = (PREFIX + "norm",)

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer, adapter_name)
        self.mma_adapter_v2_norm = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: LlamaAdapterV2Config, name: str) -> None:
        weight = self.get_base_layer().weight
        kw = adapter_parameter_kwargs(self.get_base_layer())
        self.mma_adapter_v2_norm[adapter_name] = nn.Parameter(torch.zeros(weight.shape[-1], **kw))
        if not config.init_weights and weight.device.type != "meta":
            with torch.no_grad():
                self.mma_adapter_v2_norm[adapter_name].normal_(0.0, 0.1)
        self._finish_update(adapter_name, config)

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        eps = getattr(base, "variance_epsilon", getattr(base, "eps", 1e-6))
        return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        deltas = self.mma_adapter_v2_norm
        active = [a for a in self.active_adapters if a in deltas]
        base = self.base_layer
        if self.merged or not active:
            return base(x, *args, **kwargs)
        if type(base).forward is _LLAMA_RMS_NORM and not (base._forward_hooks or base._forward_pre_hooks or args):
            # LlamaRMSNorm's own computation, w ⊙ n, plus Δ ⊙ n on the same n: one normalisation, not two. Δ is not
            # rounded into a half-precision w, so a small Δ still counts in a bf16 forward.
            weight = base.weight + deltas[active[0]]  # in fp32 where Δ is: a small Δ still counts
            for a in active[1:]:  # (not `sum()`: its 0 + Δ would be one more op per norm, forward and backward)
                weight = weight + deltas[a]
            return TunedRMSNorm.apply(x, weight, base.variance_epsilon)  # keeps x, not n(x), for backward
        y, n = base(x, *args, **kwargs), self._normalized(x)
        for a in active:
            y = y + deltas[a].to(n.dtype) * n
        return y

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """w′ = w + Δ."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.mma_adapter_v2_norm:  # another adapter's norm
                continue
            weight = self.get_base_layer().weight
            new = (weight.float() + self.mma_adapter_v2_norm[adapter].float()).to(weight.dtype)
            self._safe_assign({"weight": new}, safe_merge, adapter)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            weight = self.get_base_layer().weight
            weight.data = (weight.float() - self.mma_adapter_v2_norm[adapter].float()).to(weight.dtype)
