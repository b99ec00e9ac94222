"""LaVIN's MM-adapter as a PEFT tuner layer (`lavin_mma.md` §2, §3).

Paper: "Cheap and Quick: Efficient Vision-Language Instruction Tuning for Large Language Models",
https://arxiv.org/abs/2305.15023.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..router import SELF_ROUTED, is_lone_token_attention, lone_token_attention, route
from ..tuner_utils import MMATunerLayer, adapter_parameter_kwargs


class GroupedLinear(nn.Module):
    """A block-diagonal Linear h → C with g groups (the official `Conv1d(h, C, 1, groups=g)`, §2).

    y[..., gC/g + j] = Σ_k W[g, j, k] · z[..., g·h/g + k] + b;  W: (g, C/g, h/g), b: (C,). Output group g reads only
    hidden group g.
    """

    def __init__(self, in_features: int, out_features: int, groups: int, device=None, dtype=None) -> None:
        super().__init__()
        self.groups = groups
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.zeros(groups, out_features // groups, in_features // groups, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        grouped = z.unflatten(-1, (self.groups, -1))  # (..., g, h/g)
        y = torch.einsum("...gk,gjk->...gj", grouped, self.weight)  # (..., g, C/g)
        return y.flatten(-2) + self.bias  # (..., C)

    def dense(self) -> torch.Tensor:
        """The (C, h) block-diagonal matrix."""
        return torch.block_diag(*self.weight)


class LaVINLayer(MMATunerLayer):
    """Owns the MM-adapter containers of one wrapped module (a reader of a normalised input), keyed by adapter name.

    out(x) = x + s·w0·(B z + b) + s·w1·(D z + d),  z = Dropout(A x + a),  w = softmax(router(t) / τ)

    x: (…, C) the norm's output. A = `mma_lavin_down` (C → h, xavier, bias 0, shared by both paths);
    B, D = `mma_lavin_up0`, `mma_lavin_up1` (h → C block-diagonal with g groups, weight and bias 0, so the adapter
    starts as the identity); router = `mma_lavin_router` (C → 2, PyTorch default init). No nonlinearity: the adapter
    is linear, and folds into the consumers of its output (see `merge`). All four are trainable.

    Routing input t (`routing`):
      * ``"sample"`` (decoder): one (B, 2) weight per sample, given per call by `LaVINModel` from the modality side
        pass (`peft_mma.router`); in the side pass itself (`SELF_ROUTED`), from its own input at position 0.
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
        # Per-call state, never saved: weights given by the tuner (or SELF_ROUTED), and a dict to record into.
        self.lavin_routing: dict[str, torch.Tensor] | str | None = None
        self.lavin_record: dict[str, torch.Tensor] | None = None
        self._mixed: dict[str, tuple] = {}  # adapter → (routing weights given, U, c), see `_mixed_up`
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
        self.mma_lavin_up0[adapter_name] = GroupedLinear(h, c, g, **kw)
        self.mma_lavin_up1[adapter_name] = GroupedLinear(h, c, g, **kw)
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
                nn.init.zeros_(up.weight), nn.init.zeros_(up.bias)
            else:
                nn.init.normal_(up.weight, std=0.5), nn.init.normal_(up.bias, std=0.1)
        if not init_weights:
            nn.init.normal_(self.mma_lavin_router[adapter_name].weight, std=1.0)

    def _weights(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The routing weights, shaped to broadcast against the adapter terms (…, 2)."""
        router, tau = self.mma_lavin_router[name], self.temperature[name]
        if self.routing == "token":
            return route(router, x, tau)  # (B, N, 2)
        if self.lavin_routing == SELF_ROUTED:  # official formulation: route from own input at position 0
            w = route(router, x[:, 0], tau)  # (B, 2)
            if self.lavin_record is not None:
                self.lavin_record[name] = w
            return w[:, None]
        if self.lavin_routing is None or name not in self.lavin_routing:
            raise ValueError(
                "LaVIN router weights are missing: call the model through the `PeftModel` (or its `base_model`), "
                "which computes them from the modality embedding before the decoder runs."
            )
        return self.lavin_routing[name].to(x.dtype)[:, None]  # (B, 1, 2)

    def adapter_term(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s·w0·(B z + b) + s·w1·(D z + d) for adapter `name`; x in the adapter dtype.

        With one routing weight per sample (the decoder), the two paths are mixed in weight space first:
        U_b = s·(w0·B + w1·D)ᵀ (h × C) and c_b = s·(w0·b + w1·d) per sample, then one batched matmul
        c_b + z U_b, instead of two grouped matmuls and three mixing passes over (B, T, C) activations (which
        autograd would also keep). Sequences no longer than h (the side pass) mix the outputs as written, which is
        then the smaller graph; without gradients, the mixed weights are reused across decoding steps.
        """
        w = self._weights(name, x)
        z = self.mma_lavin_dropout[name](self.mma_lavin_down[name](x))  # (…, h)
        s = self.scale[name]
        short = torch.is_grad_enabled() and x.shape[-2] <= z.shape[-1]
        if self.routing == "token" or x.ndim != 3 or short:
            return s * (w[..., :1] * self.mma_lavin_up0[name](z) + w[..., 1:] * self.mma_lavin_up1[name](z))
        u, c = self._mixed_up(name, w.reshape(-1, 2), s)
        return torch.baddbmm(c[:, None], z, u)  # (B, T, C)

    def _mixed_up(self, name: str, w: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        """U = s·(w0·B + w1·D)ᵀ (B, h, C) and c = s·(w0·b + w1·d) (B, C) for per-sample weights w (B, 2).

        Without gradients they are kept while the tuner hands down the same weights (every decoding step of one
        `generate` call), so that a step costs one batched matmul."""
        given = self.lavin_routing.get(name) if isinstance(self.lavin_routing, dict) else None
        cached = self._mixed.get(name)
        if cached is not None and given is not None and cached[0] is given and not torch.is_grad_enabled():
            return cached[1], cached[2]
        up0, up1 = self.mma_lavin_up0[name], self.mma_lavin_up1[name]
        ups = torch.stack([up0.dense().T, up1.dense().T])  # (2, h, C)
        u = torch.einsum("bp,phc->bhc", w * s, ups)  # (B, h, C)
        c = (w * s) @ torch.stack([up0.bias, up1.bias])  # (B, C)
        if given is not None and not torch.is_grad_enabled():
            self._mixed[name] = (given, u, c)
        return u, c

    def fold(self, name: str, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, V, c) in float64 with out(x) = (I + U V) x + c for fixed routing weights (2,), dropout off.

        U = s·(w0·B + w1·D): (C, h);  V = A: (h, C);  c = U a + s·(w0·b + w1·d): (C,).
        """
        w0, w1 = weights.double().tolist()
        s = self.scale[name]
        down, up0, up1 = self.mma_lavin_down[name], self.mma_lavin_up0[name], self.mma_lavin_up1[name]
        u = s * (w0 * up0.dense().double() + w1 * up1.dense().double())
        c = u @ down.bias.double() + s * (w0 * up0.bias.double() + w1 * up1.bias.double())
        return u, down.weight.double(), c


class MMAdapter(nn.Module, LaVINLayer):
    """A module that reads a normalised input (`self_attn`, `mlp`, a ViT block's `attn`), with MM-adapters on it.

    Placement (§2): `h = x + Attn(MMA(Norm(x)))`, so q, k and v all read the adapted input and the residual does
    not; `mlp` gives the `"block"` variant `FFN(MMA(Norm(h)))`. The equation is in `LaVINLayer`. Wrapping the reader
    rather than the norm gives the same numbers and lets the decoder pass the router weights as a forward kwarg
    (`lavin_routing`), which gradient checkpointing replays on recompute (module pre-hooks are not replayed).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, width: int, routing: str) -> None:
        super().__init__()
        LaVINLayer.__init__(self, base_layer, adapter_name, width, routing)
        self.lavin_key = ""
        self.siblings: list[MMAdapter] = []  # adapters of the same decoder layer that this one hands routing to
        self.update_layer(adapter_name, config)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        routing = kwargs.pop("lavin_routing", None)
        for layer in self.siblings:  # set afresh on every call, so no stale weights survive a call without them
            layer.lavin_routing = routing if routing in (None, SELF_ROUTED) else routing.get(layer.lavin_key)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(hidden_states, *args, **kwargs)
        if self.merged:
            return self.base_layer(hidden_states, *args, **kwargs)
        x = hidden_states
        for name in self.active_adapters:
            if name in self.mma_lavin_down:
                xa = hidden_states.to(self.mma_lavin_down[name].weight.dtype)
                x = x + self.adapter_term(name, xa).to(hidden_states.dtype)
        if routing == SELF_ROUTED and not args and is_lone_token_attention(self.base_layer, x, kwargs):
            return lone_token_attention(self.base_layer, x), None  # the side pass: (output, attention weights)
        return self.base_layer(x, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapter into the Linears that read its output, for the routing weights in `merge_routing`.

        With y = W·out(x) + β and out(x) = (I + U V) x + c:  W′ = W + (W U) V,  β′ = β + W c (β = 0 when the
        Linear had no bias; one is created). `LaVINModel.merge_adapter` fills `merge_routing` for a modality.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
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
