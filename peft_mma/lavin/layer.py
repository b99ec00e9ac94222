"""LaVIN's MM-adapter as a PEFT tuner layer (`lavin_mma.md` §2, §3).

Paper: "Cheap and Quick: Efficient Vision-Language Instruction Tuning for Large Language Models",
https://arxiv.org/abs/2305.15023.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..attention import STATE_KWARG
from ..tuner_utils import MMATunerLayer, adapter_parameter_kwargs
from ..utils import apply_in_autocast_dtype, cast_to
from .function import RoutedAdapter, mixed_per_sample, paths, with_ones
from .inputs import LaVINCall


class GroupedLinear(nn.Module):
    """A block-diagonal Linear h → C with g groups (the official `Conv1d(h, C, 1, groups=g)`, §2).

    y[..., gC/g + j] = Σ_k W[g, j, k] · z[..., g·h/g + k] + b;  W: (g, C/g, h/g), b: (C,) or None (`bias=False`).
    Output group g reads only hidden group g.
    """

    def __init__(
        self, in_features: int, out_features: int, groups: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.groups = groups
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.zeros(groups, out_features // groups, in_features // groups, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        grouped = z.unflatten(-1, (self.groups, -1))  # (..., g, h/g)
        y = torch.einsum("...gk,gjk->...gj", grouped, self.weight).flatten(-2)  # (..., C)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        """The (C, h) block-diagonal matrix."""
        return torch.block_diag(*self.weight)


class LaVINLayer(MMATunerLayer):
    """Owns the MM-adapter containers of one wrapped module (a reader of a normalised input), keyed by adapter name.

    out(x) = x + s·w0·(B z + b) + s·w1·(D z + d),  z = Dropout(A x + a),  w = softmax(router(t) / τ)

    x: (…, C) the norm's output. A = `mma_lavin_down` (C → h, xavier, bias 0, shared by both paths);
    B, D = `mma_lavin_up0`, `mma_lavin_up1` (h → C block-diagonal with g groups, weight and bias 0, so the adapter
    starts as the identity; no biases with `adapter_bias=False`); router = `mma_lavin_router` (C → 2, PyTorch
    default init). No nonlinearity: the adapter is linear, and folds into the consumers of its output (see `merge`).
    All four are trainable. With `LaVINConfig(router="modality")` the decoder's adapters have no router: w = (1, 0)
    for a text-only sample and (0, 1) for one with an image (the call's `fixed` weights).

    Routing input t (`routing`):
      * ``"sample"`` (decoder): the adapter's own input at position 0, the modality token (`lavin.inputs`), giving
        one (B, 2) weight per sample; recorded in the call's `LaVINCall`, whose decoding steps (no token) reuse it.
      * ``"token"`` (vision encoder): t = x per token, so each image routes from its own tokens.
    """

    adapter_layer_names = ("mma_lavin_down", "mma_lavin_up0", "mma_lavin_up1", "mma_lavin_router")
    other_param_names = ("mma_lavin_dropout", "scale", "temperature")

    def __init__(self, base_layer: nn.Module, adapter_name: str, width: int, routing: str) -> None:
        self._init_tuner_layer(base_layer, adapter_name)
        self.width = width
        self.routing = routing
        self.mma_lavin_down = nn.ModuleDict()
        self.mma_lavin_up0 = nn.ModuleDict()
        self.mma_lavin_up1 = nn.ModuleDict()
        self.mma_lavin_router = nn.ModuleDict()
        self.mma_lavin_dropout = nn.ModuleDict()
        self.scale: dict[str, float] = {}
        self.temperature: dict[str, float] = {}
        # Merge state: the Linears that read the input (q/k/v or gate/up), the (2,) weights to fold, created biases.
        self.consumers: list[nn.Linear] = []
        self.merge_routing: dict[str, torch.Tensor] = {}
        self._created_bias: dict[str, list[nn.Linear]] = {}

    def update_layer(self, adapter_name: str, config) -> None:
        c, h, g = self.width, config.adapter_dim, config.adapter_groups
        if c % g:
            raise ValueError(f"`adapter_groups`={g} must divide the adapted width {c}; pick a divisor of {c}.")
        kw = adapter_parameter_kwargs(self.get_base_layer())
        self.mma_lavin_down[adapter_name] = nn.Linear(c, h, **kw)
        self.mma_lavin_up0[adapter_name] = GroupedLinear(h, c, g, bias=config.adapter_bias, **kw)
        self.mma_lavin_up1[adapter_name] = GroupedLinear(h, c, g, bias=config.adapter_bias, **kw)
        if self.routing == "token" or config.router == "learnt":  # `router="modality"`: the decoder has none
            self.mma_lavin_router[adapter_name] = nn.Linear(c, 2, **kw)
        p = config.adapter_dropout
        self.mma_lavin_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.scale[adapter_name] = config.adapter_scale
        self.temperature[adapter_name] = config.temperature
        self.reset_lavin_parameters(adapter_name, config.init_weights)
        self._finish_update(adapter_name, config)

    @torch.no_grad()
    def reset_lavin_parameters(self, adapter_name: str, init_weights: bool) -> None:
        down = self.mma_lavin_down[adapter_name]
        if down.weight.device.type == "meta":
            return
        nn.init.xavier_uniform_(down.weight)
        nn.init.zeros_(down.bias)
        for up in (self.mma_lavin_up0[adapter_name], self.mma_lavin_up1[adapter_name]):
            if init_weights:
                nn.init.zeros_(up.weight)
            else:
                nn.init.normal_(up.weight, std=0.5)
            if up.bias is not None:
                nn.init.zeros_(up.bias) if init_weights else nn.init.normal_(up.bias, std=0.1)
        if not init_weights and adapter_name in self.mma_lavin_router:
            nn.init.normal_(self.mma_lavin_router[adapter_name].weight, std=1.0)

    def adapted(self, name: str, x: torch.Tensor, call: LaVINCall | None = None) -> torch.Tensor:
        """out(x) of adapter `name` (the equation above), x: (B, T, C), computed in x's dtype.

        Encoder adapters (routing "token") route every token from itself. Decoder adapters route each sample from
        its modality token, x[:, 0], and record the weights in `call`; on a decoding step (the call's input no
        longer holds the token) they reuse them. With `router="modality"` they take the call's `fixed` weights
        instead. All go through one autograd node, `lavin.function.RoutedAdapter`, except a step without gradients
        on given weights, which reuses the call's mixed up-path (`_decoding_step`).
        """
        per_token = self.routing == "token"
        fixed = None if per_token or call is None else call.fixed  # `router="modality"`: weights by modality
        if fixed is not None and len(fixed) != len(x):  # `generate` repeats each sample for its beams / sequences
            fixed = call.fixed = fixed.repeat_interleave(len(x) // len(fixed), dim=0)  # once, for every layer
        routed = not per_token and call is not None and fixed is None
        decoding = routed and not call.modality_token  # routing from the prefill
        records = routed and not torch.is_grad_enabled()  # kept for decoding steps
        # the layer's own key only where read or written: under gradients every layer runs the same code (one graph
        # for all of them under regional compilation)
        mixes = fixed is not None and not torch.is_grad_enabled()  # `_decoding_step` keeps the mixed up-path
        key = f"{self.lavin_key}.{name}" if decoding or records or mixes else None
        given = None
        if fixed is not None:
            given = fixed
        elif decoding:
            given = call.routing.get(key)
        if decoding and given is None:
            raise ValueError(
                f"No routing weights for `{key}`: the call's first forward held no modality token. Call the model "
                "through its `PeftModel` (or `base_model`), which puts the token in front of every sequence."
            )
        down, up0, up1 = self.mma_lavin_down[name], self.mma_lavin_up0[name], self.mma_lavin_up1[name]
        router = self.mma_lavin_router[name] if name in self.mma_lavin_router else None  # None: `given` weights
        dropout = self.mma_lavin_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        if given is not None and p == 0 and not torch.is_grad_enabled():
            return self._decoding_step(name, key, x, given, call)
        out, w = apply_in_autocast_dtype(
            RoutedAdapter, x, down.weight, down.bias, up0.weight, up0.bias, up1.weight, up1.bias,
            None if router is None else router.weight, None if router is None else router.bias,
            self.temperature[name], self.scale[name], p, per_token, given,
        )  # fmt: skip
        if records and given is None:
            call.routing[key] = w
        return out

    def _decoding_step(
        self, name: str, key: str, x: torch.Tensor, given: torch.Tensor, call: LaVINCall
    ) -> torch.Tensor:
        """out(x) on a decoding step (no gradients, no dropout), equal to `RoutedAdapter`'s forward with `given`:

            out = x + z̄ U_b,    z̄ = [A x + a, 1, …, 1],    U_b = s·(w0·P_0 + w1·P_1)    (B, r, C)

        U_b is fixed for the whole `generate` call, so it is mixed at the first step and kept in the call
        (`LaVINCall.mixed`); every later step costs one Linear, the columns of ones and one batched matmul."""
        mixed = call.mixed.get(key)
        if mixed is None:
            up0, up1 = self.mma_lavin_up0[name], self.mma_lavin_up1[name]
            packed, _ = paths(up0.weight, up0.bias, up1.weight, up1.bias)  # (2, r·C)
            ws = cast_to(given, x.dtype) * self.scale[name]
            mixed = call.mixed[key] = mixed_per_sample(ws, cast_to(packed, x.dtype), x.shape[-1])
        down = self.mma_lavin_down[name]
        z = F.linear(x, cast_to(down.weight, x.dtype), cast_to(down.bias, x.dtype))
        return torch.baddbmm(x, with_ones(z), mixed)

    def fold(self, name: str, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, V, c) in float64 with out(x) = (I + U V) x + c for fixed routing weights (2,), dropout off.

        U = s·(w0·B + w1·D): (C, h);  V = A: (h, C);  c = U a + s·(w0·b + w1·d): (C,) (b = d = 0 without biases).
        """
        w0, w1 = weights.double().tolist()
        s = self.scale[name]
        down, up0, up1 = self.mma_lavin_down[name], self.mma_lavin_up0[name], self.mma_lavin_up1[name]
        u = s * (w0 * up0.dense().double() + w1 * up1.dense().double())
        c = u @ down.bias.double()
        if up0.bias is not None:
            c = c + s * (w0 * up0.bias.double() + w1 * up1.bias.double())
        return u, down.weight.double(), c


class MMAdapter(nn.Module, LaVINLayer):
    """A module that reads a normalised input (`self_attn`, `mlp`, a ViT block's `attn`), with MM-adapters on it.

    Placement (§2): `h = x + Attn(MMA(Norm(x)))`, so q, k and v all read the adapted input and the residual does
    not; `mlp` gives the `"block"` variant `FFN(MMA(Norm(h)))`. The equation is in `LaVINLayer`. Wrapping the reader
    rather than the norm gives the same numbers and lets the attention adapters take the call's `LaVINCall` as a
    forward keyword, which gradient checkpointing replays on recompute. Transformers calls `mlp` without keywords:
    an `mlp` adapter routes from its input's modality token, and gets the call (to record and reuse its weights in
    `generate`) through `attention.state_handed_to`.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, width: int, routing: str) -> None:
        super().__init__()
        LaVINLayer.__init__(self, base_layer, adapter_name, width, routing)
        self.lavin_key = ""  # the module's path, naming its routing weights in a `LaVINCall`
        self.keyword_call = routing == "sample" and hasattr(base_layer, "o_proj")  # an attention: gets the keyword
        self.update_layer(adapter_name, config)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        # the call's `LaVINCall`: attention passes it on to the attention function; `mlp` takes no keywords, merged
        # or not (`generate` hands the state to every `mlp` adapter)
        call = kwargs.get(STATE_KWARG) if self.keyword_call else kwargs.pop(STATE_KWARG, None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(hidden_states, *args, **kwargs)
        if self.merged:
            return self.base_layer(hidden_states, *args, **kwargs)
        if not any(name in self.mma_lavin_down for name in self.active_adapters):  # none active (all deleted)
            return self.base_layer(hidden_states, *args, **kwargs)
        if self.keyword_call and call is None:
            raise ValueError(
                "LaVIN's adapters need the call's modality token: call the model through its `PeftModel` (or "
                "`base_model`), which puts the token in front of every sequence, not the wrapped LLaMA directly."
            )
        x = hidden_states
        for name in self.active_adapters:
            if name in self.mma_lavin_down:
                x = self.adapted(name, x, call)  # in x's dtype, whatever the adapter's (`RoutedAdapter`)
        return self.base_layer(x, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapter into the Linears that read its output, for the routing weights in `merge_routing`.

        With y = W·out(x) + β and out(x) = (I + U V) x + c:  W′ = W + (W U) V,  β′ = β + W c (β = 0 when the
        Linear had no bias; one is created). `LaVINModel.merge_adapter` fills `merge_routing` for a modality.
        """
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.mma_lavin_down]
        for name in adapter_names:
            if self.merged_adapters or len(adapter_names) > 1:
                raise ValueError("LaVIN folds one adapter per layer; merge a single adapter (`adapter_names`).")
            if name not in self.merge_routing:
                raise ValueError(f"No routing weights to fold for adapter {name!r}; merge through `LaVINModel`.")
            u, v, c = self.fold(name, self.merge_routing[name])
            new = []
            for linear in self.consumers:
                if type(linear) is not nn.Linear:
                    raise TypeError(f"Cannot fold a LaVIN adapter into {type(linear).__name__}; only nn.Linear.")
                w = linear.weight.double()
                beta = linear.bias.double() if linear.bias is not None else 0.0
                new.append((linear, w + (w @ u) @ v, beta + w @ c))
            if safe_merge and not all(torch.isfinite(t).all() for _, w, b in new for t in (w, b)):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            self._created_bias[name] = [linear for linear in self.consumers if linear.bias is None]
            for linear, w, b in new:
                _assign(linear, w, b)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """W = W′ − (W′ U)(I + V U)⁻¹ V  (Woodbury: (I + U V)⁻¹ = I − U (I_h + V U)⁻¹ V),  β = β′ − W c."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            u, v, c = self.fold(name, self.merge_routing[name])
            inner = torch.linalg.inv(torch.eye(v.shape[0], dtype=v.dtype, device=v.device) + v @ u)
            for linear in self.consumers:
                w_merged = linear.weight.double()
                w = w_merged - (w_merged @ u) @ inner @ v
                if linear in self._created_bias.get(name, []):
                    _assign(linear, w, None)
                else:
                    _assign(linear, w, linear.bias.double() - w @ c)
            self._created_bias.pop(name, None)


@torch.no_grad()
def _assign(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight.data = weight.to(linear.weight.dtype)
    if bias is None:
        linear.bias = None
    elif linear.bias is None:
        linear.bias = nn.Parameter(bias.to(linear.weight.dtype), requires_grad=False)
    else:
        linear.bias.data = bias.to(linear.bias.dtype)
