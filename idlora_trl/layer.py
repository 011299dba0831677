"""The ID-LoRA layer: the adapted forward of the paper's Eq. 3 and 4, on `nn.Linear` and transformers' `Conv1D`.

State per adapter `a` (names are part of the public state-dict format):
- `idlora_B[a]`: `nn.Linear(r/f -> d_out/f, bias=False)`, trainable, shared by all clusters and all f blocks.
- `idlora_T[a]`: the router. Token router: `nn.Linear(r -> 1, bias=False)`; static router: `ClusterWeights`,
  one weight per cluster (`[k]`). Trainable.
- `idlora_indices[a]`: `[k, r]` int64 rows of the frozen weight, a persistent buffer. `-1` until computed.

What depends on the router (its state and initialisation, the mix, merging, the overflow check) is the adapter's
variant, `idlora_variant[a]` (`variants.py`), chosen once in `update_layer`, as PEFT's LoRA does with `lora_variant`.

`B` and `T` stay float32 on a half-precision base, after `.to(torch.bfloat16)` and under `torch.autocast`
(`precision.py`); the base output is cast back to the base dtype at the end.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from peft import PeftModel
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import IDLoRAConfig
from .decomposition import CLUSTERED
from .fused import adapted_output
from .loading import check_layer_state, checked_table, missing_indices_error
from .precision import adapter_dtype, float32_region, keep_float32
from .variants import RouterVariant, variant_for

PLACEHOLDER = -1


def layer_shape(base_layer: nn.Module) -> tuple[int, int]:
    """`(d_out, d_in)` of a supported base layer, valid under ZeRO-3 (where `weight.shape` is `(0,)`)."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.out_features, base_layer.in_features
    if isinstance(base_layer, Conv1D):  # weight stored as [d_in, d_out]
        d_in, d_out = getattr(base_layer.weight, "ds_shape", base_layer.weight.shape)
        return d_out, d_in
    raise TypeError(f"unsupported layer type {type(base_layer).__name__}")


def weight_rows(base_layer: nn.Module, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The base weight (or `weight`, stored alike) as `[d_out, d_in]` rows (a view; Conv1D stores the transpose)."""
    weight = base_layer.weight if weight is None else weight
    return weight.T if isinstance(base_layer, Conv1D) else weight


class IDLoRALayer(BaseTunerLayer):
    adapter_layer_names = ("idlora_B", "idlora_T")
    other_param_names = ("idlora_indices", "idlora_dropout", "r", "num_clusters", "rank_boost", "scaling", "router",
                         "router_norm", "idlora_variant")

    def __init__(self, base_layer: nn.Module, module_name: str = "", **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.module_name = module_name
        self.out_features, self.in_features = layer_shape(base_layer)
        # A bitsandbytes layer returns a view made under no_grad: the update is added out of place there.
        self._fusable = not type(base_layer.weight).__module__.startswith("bitsandbytes")
        self.idlora_B = nn.ModuleDict({})
        self.idlora_T = nn.ModuleDict({})
        self.idlora_indices = BufferDict({}, persistent=True)
        self.idlora_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.num_clusters: dict[str, int] = {}
        self.rank_boost: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.router: dict[str, str] = {}
        self.router_norm: dict[str, str] = {}
        self.idlora_variant: dict[str, RouterVariant] = {}  # the router's behaviour per adapter (`variants.py`)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # Skeleton rows of the *unmerged* weight, per merged adapter: unmerging recomputes the exact delta.
        self._merged_rows: dict[str, torch.Tensor] = {}
        # Adapters whose index table was checked when it was set or loaded (`loading.py`): the forward reads this
        # Python set, never the table (that would be a host sync per module per forward, and a compile break).
        self._indices_ready: set[str] = set()
        self.loaded_now: set[str] = set()  # adapters this layer received in the state dict being loaded
        self._failed_load: set[str] = set()  # adapters whose last load failed: refused until set or loaded again
        self.sources: dict[str, str] = {}  # adapter -> the directory it was loaded from, for error messages
        # Set by `overflow.overflow_check` only: the forward then checks each update for inf/NaN (host syncs).
        self.check_overflow = False
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config: IDLoRAConfig, inference_mode: bool = False) -> None:
        r, k, f = config.r, config.num_clusters, config.rank_boost
        self._check_shapes(r, k, f, config.min_cluster_size if config.selection in CLUSTERED else r)
        self.r[adapter_name] = r
        self.num_clusters[adapter_name] = k
        self.rank_boost[adapter_name] = f
        self.scaling[adapter_name] = config.scaling
        self.router[adapter_name] = config.router
        self.router_norm[adapter_name] = config.router_norm
        self.idlora_variant[adapter_name] = variant = variant_for(config.router, config.router_norm)
        if getattr(config, "loaded_from", None):
            self.sources[adapter_name] = config.loaded_from
        self.idlora_B[adapter_name] = nn.Linear(r // f, self.out_features // f, bias=False)
        variant.init(self, adapter_name, config)  # idlora_T[adapter_name]
        dropout = config.idlora_dropout
        self.idlora_dropout[adapter_name] = nn.Dropout(dropout) if dropout else nn.Identity()
        self.idlora_indices[adapter_name] = torch.full((k, r), PLACEHOLDER, dtype=torch.long)
        self._indices_ready.discard(adapter_name)
        self.reset_idlora_parameters(adapter_name, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _check_shapes(self, r: int, k: int, f: int, min_size: int) -> None:
        d_out, where = self.out_features, f"module {self.module_name!r} (d_out={self.out_features})"
        if k * min_size > d_out:
            raise ValueError(
                f"ID-LoRA cannot split the {d_out} rows of {where} into num_clusters={k} clusters of at least "
                f"{min_size} rows (r={r}). Lower r or num_clusters so that num_clusters * r <= {d_out}, or "
                f"leave this module out with exclude_modules."
            )
        if d_out % f:
            raise ValueError(
                f"rank_boost={f} must divide d_out of {where}. Use a rank_boost that divides {d_out} "
                f"(1 always does), or exclude the module."
            )

    @torch.no_grad()
    def reset_idlora_parameters(self, adapter_name: str, config: IDLoRAConfig) -> None:
        B = self.idlora_B[adapter_name].weight
        if config.init_weights:
            nn.init.zeros_(B)
        else:  # non-identity start, for tests
            nn.init.normal_(B, std=1.0 / math.sqrt(B.shape[1]))
        self.idlora_variant[adapter_name].reset(self, adapter_name, config)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Move the adapter to the base layer's device, keeping it in (at least) float32 (PEFT's version also casts
        to the base dtype; ID-LoRA's update is quadratic in the activations: float32 even on a bf16 base, choice)."""
        weight = self.get_base_layer().weight
        target = device if device is not None else weight.device
        if target.type == "meta":
            return
        dtype = adapter_dtype(weight.dtype)
        for name in self.adapter_layer_names + ("idlora_indices", "idlora_dropout"):
            container = getattr(self, name)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, torch.Tensor):  # the integer index table: device only
                container[adapter_name] = item.to(target)
            elif not any(p.is_meta for p in item.parameters()):
                item.to(device=target, dtype=dtype)

    def set_indices(self, adapter_name: str, indices: torch.Tensor) -> None:
        """Install a `[k, r]` index table, checked against this layer."""
        indices = checked_table(self, adapter_name, torch.as_tensor(indices), "Index table")
        device = self.idlora_indices[adapter_name].device
        self.idlora_indices[adapter_name] = indices.to(dtype=torch.long, device=device)
        self.mark_indices_ready(adapter_name)

    def mark_indices_ready(self, adapter_name: str, loaded: bool = False) -> None:
        """`adapter_name`'s table was checked (set, or being loaded): the forward may use it."""
        self._indices_ready.add(adapter_name)
        self._failed_load.discard(adapter_name)
        if loaded:
            self.loaded_now.add(adapter_name)

    def unready(self, adapter_name: str) -> None:
        """After a failed load: the forward refuses `adapter_name` here until its table is set or loaded again."""
        self._indices_ready.discard(adapter_name)
        self._failed_load.add(adapter_name)

    def has_indices(self, adapter_name: str) -> bool:
        """Whether `adapter_name` has a computed table (reads the table: a host sync; never called by forward)."""
        indices = self.idlora_indices[adapter_name]
        return not indices.is_meta and bool((indices != PLACEHOLDER).all())

    def _checked_indices(self, adapter_name: str) -> torch.Tensor:
        """The table, whose check the forward reads as a flag. A table that a loader wrote around
        `load_state_dict` (transformers' `load_adapter`, accelerate's `set_module_tensor_to_device`) is checked
        here once, a host sync, outside compiled code (which traces the checked path only)."""
        if adapter_name not in self._indices_ready and not torch.compiler.is_compiling():
            if adapter_name in self._failed_load or not self.has_indices(adapter_name):
                raise RuntimeError(missing_indices_error(self, adapter_name, adapter_name in self._failed_load))
            checked_table(self, adapter_name, self.idlora_indices[adapter_name], "The index table")
            self.mark_indices_ready(adapter_name)
        return self.idlora_indices[adapter_name]

    # ------------------------------------------------------------------ forward

    def _mixed(self, adapter_name: str, gathered: torch.Tensor) -> torch.Tensor:
        """`v = sum_i alpha_i x_i` from the gathered skeleton outputs `[..., k, r]`, by the adapter's variant's
        `mix` (`variants.py`: the paper's token router, its rms form, or the static router)."""
        k, r = gathered.shape[-2:]
        weight = self.idlora_T[adapter_name].weight.view(-1)  # T is nn.Linear(r, 1) for its state-dict name
        v = self.idlora_variant[adapter_name].mix(gathered.reshape(-1, k, r), weight)[0]
        return v.view(*gathered.shape[:-2], r)

    def _mixed_input(self, adapter_name: str, base_out: torch.Tensor) -> torch.Tensor:
        """`v` (float32, `[..., r]`, after dropout) from the base layer's output `W h + b`."""
        indices = self._checked_indices(adapter_name)
        k, r = self.num_clusters[adapter_name], self.r[adapter_name]
        flat = indices.reshape(-1)
        gathered = base_out.index_select(-1, flat).float()  # (W h + b)[idx]
        bias = self.base_layer.bias  # an nn.Linear or Conv1D (layer_shape refuses anything else)
        if bias is not None:
            gathered = gathered - bias.index_select(0, flat).float()
        gathered = gathered.unflatten(-1, (k, r))  # x_i = A_i h, [..., k, r]
        v = self._mixed(adapter_name, gathered)
        if self.check_overflow:  # set by `overflow.overflow_check` only: the check syncs
            self.idlora_variant[adapter_name].check_overflow(self, adapter_name, base_out, v)
        return self.idlora_dropout[adapter_name](v)

    def _update(self, adapter_name: str, base_out: torch.Tensor) -> torch.Tensor:
        """`s * concat_j(B v_j)` in float32, from the base layer's output `W h + b`."""
        f, r = self.rank_boost[adapter_name], self.r[adapter_name]
        with float32_region(base_out):  # the adapter's arithmetic stays float32 under torch.autocast
            v = self._mixed_input(adapter_name, base_out)
            B = self.idlora_B[adapter_name]
            return B(v.unflatten(-1, (f, r // f)).to(B.weight.dtype)).flatten(-2) * self.scaling[adapter_name]

    def _fused_forward(self, adapter_name: str, base_out: torch.Tensor) -> Optional[torch.Tensor]:
        """`base_out + s * concat_j(B v_j)`, added into `base_out` (fresh from the base layer) in place by one
        autograd node (`fused.GatherMixAdd`). `None` where that does not apply: active dropout, a base output
        that is not contiguous, a trainable base bias, the overflow check."""
        dropout, bias = self.idlora_dropout[adapter_name], self.base_layer.bias
        if (isinstance(dropout, nn.Dropout) and dropout.training) or not base_out.is_contiguous() \
                or (bias is not None and bias.requires_grad and torch.is_grad_enabled()) or self.check_overflow:
            return None
        flat = self._checked_indices(adapter_name).reshape(-1)
        with float32_region(base_out):
            return adapted_output(
                base_out, flat, None if bias is None else bias.detach().index_select(0, flat).float(),
                self.idlora_B[adapter_name].weight, self.idlora_T[adapter_name].weight,
                self.idlora_variant[adapter_name], self.num_clusters[adapter_name], self.scaling[adapter_name])

    def idlora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("ID-LoRA does not support mixed-adapter batches (adapter_names=...).")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        base_out = self.base_layer(x, *args, **kwargs)
        adapters = self.idlora_B
        active = [name for name in self.active_adapters if name in adapters]
        if not active:
            return base_out
        if (len(active) == 1 and self._fusable and base_out.dtype == torch.float32
                and adapters[active[0]].weight.dtype == torch.float32):
            out = self._fused_forward(active[0], base_out)  # one float32 adapter
            if out is not None:
                return out
        update = None
        for name in active:
            delta = self._update(name, base_out)  # every adapter reads the base output, never another's
            update = delta if update is None else update + delta
        return base_out + update.to(base_out.dtype)

    # ------------------------------------------------------------------ merging (static router only)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's update as a `[d_out, d_in]` matrix, from the unmerged weight. Static router only."""
        variant = self.idlora_variant[adapter_name]
        variant.check_mergeable(self, adapter_name)
        return variant.delta_weight(self, adapter_name, self._unmerged_rows(adapter_name))

    def _unmerged_rows(self, adapter_name: str) -> torch.Tensor:
        flat = self._checked_indices(adapter_name).reshape(-1)
        rows = weight_rows(self.get_base_layer()).detach().index_select(0, flat).float()
        for merged in self.merged_adapters:  # remove what earlier merges added to these rows
            delta = self.idlora_variant[merged].delta_weight(self, merged, self._merged_rows[merged])
            rows = rows - delta.index_select(0, flat)
        return rows

    def check_mergeable(self, adapter_names: Optional[list[str]] = None) -> list[str]:
        """The adapters a merge would act on here (not yet merged); raises, changing nothing, if one cannot be
        merged. `IDLoRAModel` runs it on every layer before any layer merges."""
        names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.idlora_B]
        for name in names:
            self.idlora_variant[name].check_mergeable(self, name)
            self._checked_indices(name)
        return names

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for name in self.check_mergeable(adapter_names):
            variant, rows = self.idlora_variant[name], self._unmerged_rows(name)
            weight = weight_rows(self.get_base_layer()).data
            if safe_merge:
                weight.copy_(variant.merge_safe(self, name, rows, weight))
            else:
                variant.merge_unsafe(self, name, rows, weight)
            self._merged_rows[name] = rows
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = weight_rows(self.get_base_layer()).data
            self.idlora_variant[name].unmerge(self, name, self._merged_rows.pop(name), weight)


class Linear(nn.Module, IDLoRALayer):
    """ID-LoRA on an `nn.Linear` or a transformers `Conv1D`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: IDLoRAConfig, module_name: str = "",
                 **kwargs: Any) -> None:
        super().__init__()
        IDLoRALayer.__init__(self, base_layer, module_name=module_name, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.idlora_forward(x, *args, **kwargs)

    def _apply(self, fn, *args: Any, **kwargs: Any):
        """`.to(dtype)`, `.half()`, `.bfloat16()` cast the base layer; the adapter stays (at least) float32."""
        super()._apply(fn, *args, **kwargs)
        keep_float32(self.idlora_B)
        keep_float32(self.idlora_T)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        """An adapter's B, T and index table are checked as they load (the children copy them right after this):
        a missing part or a table out of range is an error here, naming the file and the module (`loading.py`)."""
        check_layer_state(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __repr__(self) -> str:
        return "idlora." + super().__repr__()


def idlora_layers(model: nn.Module, adapter_name: Optional[str] = None) -> list[tuple[str, IDLoRALayer]]:
    """`(module name in the base model, layer)` for every ID-LoRA layer (holding `adapter_name`, if given)."""
    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, IDLoRALayer) and (adapter_name is None or adapter_name in module.idlora_indices)
    ]
