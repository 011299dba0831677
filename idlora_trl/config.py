"""`IDLoRAConfig`: the hyper-parameters of ID-LoRA (arXiv 2602.20727) as a PEFT config.

Every field names the symbol the paper uses for it; "choice" marks what the paper leaves open and this
project decides (see `docs/METHOD.md`).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from typing import Literal, Optional, Union, get_args

from peft.config import PeftConfig

from .decomposition import DISTANCES, SELECTIONS, Distance
from .peft_type import IDLoRAPeftType

# The one definition of each choice of the adapter (the layer, CLI and Axolotl read these).
Router = Literal["token", "static"]
ROUTERS: tuple[str, ...] = get_args(Router)
RouterNorm = Literal["none", "rms"]
ROUTER_NORMS: tuple[str, ...] = get_args(RouterNorm)
# Named settings, one switch each: "paper" is the paper's exact method (its router, rows, k, f and scale), so it
# stays one switch away whatever the defaults become (docs/METHOD.md, "How the defaults are chosen").
Preset = Literal["paper"]
PRESETS: dict[str, dict] = {
    "paper": dict(router="token", router_norm="none", selection="pmrc", distance="euclidean", num_clusters=4,
                  rank_boost=2, idlora_alpha=None, init_router_std=None),
}

__all__ = ["DISTANCES", "PRESETS", "ROUTERS", "ROUTER_NORMS", "SELECTIONS", "IDLoRAConfig"]


@dataclass
class IDLoRAConfig(PeftConfig):
    """Configuration of an ID-LoRA adapter.

    ID-LoRA clusters the rows of each frozen weight `W` (`[d_out, d_in]`) into `k` clusters, keeps the `r` rows
    nearest each centroid (the skeleton rows `A_i = W[idx_i]`, never copied or trained), and trains one shared
    low-rank matrix `B` plus a router `T` over them:

        x_i = (W h)[idx_i];  alpha_i = <T, x_i>;  v = sum_i alpha_i x_i
        y   = W h + b + s * concat_j(B v_j)          # v split into f chunks of r/f ("rank boosting")

    Args:
        r (`int`): Rank `r`: rows kept per cluster, and the length of the router `T`. Must be divisible by
            `rank_boost`. The paper compares ID-LoRA at rank `4p` with LoRA at rank `p`.
        num_clusters (`int`): Number of clusters `k` of the rows of `W` (paper: 4). Needs `k * r <= d_out`.
        rank_boost (`int`): Rank-boost factor `f` (paper's "RB", default 2). `B` has shape
            `[d_out / f, r / f]` and is applied block-diagonally `f` times. `f = 1` is the paper's Eq. 3.
            Needs `d_out % f == 0` and `r % f == 0`.
        idlora_alpha (`float`, *optional*): Scaling numerator: the update is multiplied by
            `s = idlora_alpha / r`. Defaults to `r` (so `s = 1`; choice).
        idlora_dropout (`float`): Dropout probability applied to the mixed vector `v` (choice: never a second
            pass through `W`).
        router (`str`): `"token"`: the paper's `alpha_i = <T, x_i>`, with a trainable `T` of length `r`;
            the update depends on the token and cannot be merged. `"static"`: one learned `alpha_i` per
            cluster (choice, §5 of the method notes); the update is then a fixed matrix that merges.
        router_norm (`str`): Scale of the token router (choice). `"none"`: the paper's `alpha_i = <T, x_i>`,
            so `v = sum_i alpha_i x_i` is quadratic in the activations and the update's size follows each
            module's activation scale. `"rms"`: `alpha_i = <T, x_i> / (sqrt(r) rms(x))`, with `rms(x)` over
            the token's `k * r` gathered values: `alpha_i` is scale-free and the update linear in the
            activations, as LoRA's is.
        selection (`str`): How skeleton rows are chosen. `"pmrc"`: the paper's size-constrained k-means of the
            rows, keeping the `r` rows nearest each centroid. `"pmrc-qr"` (choice): the same clusters, with the `r`
            rows a column-pivoted QR picks in each (well-conditioned, as in the interpolative decomposition).
            `"random"` and `"sequential"`: the paper's
            ablation baselines (`k * r` random rows; the first `r` rows of `k` contiguous row blocks). Plugins
            can add strategies (`idlora_trl.hookspecs.idlora_select_rows`). Built-in names are checked here (a near
            miss such as `"pmcr"` is refused); other names when the rows are selected.
        distance (`str`): `"euclidean"` (paper) or `"cosine"` (k-means on L2-normalised rows; choice).
        min_cluster_size (`int`, *optional*): Minimum number of rows per cluster in PMRC. Defaults to `r`
            (choice: the paper does not give it; it must be at least `r`).
        seed (`int`): Seed of the clustering (k-means++ initialisation, random selection). The decomposition
            is deterministic for a given weight and seed.
        init_weights (`bool`): `True` (default): `B = 0`, so the model is unchanged at step 0, and `T` small
            and random so gradients reach `B`. `False`: `B` random too (for tests only).
        init_router_std (`float`, *optional*): Standard deviation of the token router's initial `T`.
            Defaults to `1 / r` with `router_norm="none"` and `1 / k` with `"rms"` (then each `alpha_i` starts
            with standard deviation `1 / k`). The static router starts at `alpha_i = 1 / k`.
        indices_path (`str`, *optional*): A precomputed index file (written by `idlora_trl.save_indices` or
            `idlora-trl decompose`). When set, no clustering runs: each module's `[k, r]` table is read from it.
        preset (`str`, *optional*): `"paper"`: the paper's exact setting (token router with `router_norm="none"`,
            PMRC rows, euclidean distance, k = 4, f = 2, `idlora_alpha = r`, the default router init), whatever the
            defaults are. Fields left at their defaults take the preset's values; a field set to another value
            than the preset's is an error.
        target_modules (`Union[list[str], str]`): Module names or a regex to adapt, or `"all-linear"` (default:
            every linear layer except the output layer), as in PEFT's LoRA.
        exclude_modules (`Union[list[str], str]`, *optional*): Module names or a regex not to adapt.
        layers_to_transform (`Union[list[int], int]`, *optional*): Only adapt these layer indices.
        layers_pattern (`Union[list[str], str]`, *optional*): Name of the layer list, with `layers_to_transform`.
        modules_to_save (`list[str]`, *optional*): Extra modules to train and save in full, as in PEFT.
        bias (`str`): Must be `"none"`: ID-LoRA trains no bias.
    """

    r: int = field(default=32, metadata={"help": "Rank r: skeleton rows kept per cluster."})
    num_clusters: int = field(default=4, metadata={"help": "Number of row clusters k (paper: 4)."})
    rank_boost: int = field(default=2, metadata={"help": "Rank-boost factor f (paper: 2)."})
    idlora_alpha: Optional[float] = field(default=None, metadata={"help": "Scaling s = idlora_alpha / r; default r."})
    idlora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the mixed vector v."})
    router: Router = field(default="token", metadata={"help": "'token' (paper) or 'static' (mergeable)."})
    router_norm: RouterNorm = field(
        default="none", metadata={"help": "Token router scale: 'none' (paper, alpha = <T, x>) or 'rms' (scale-free)."}
    )
    selection: str = field(
        default="pmrc", metadata={"help": f"Skeleton rows: one of {', '.join(SELECTIONS)} ('pmrc' is the paper's), "
                                          "or a plugin's strategy."}
    )
    distance: Distance = field(default="euclidean", metadata={"help": "Clustering distance (paper: euclidean)."})
    min_cluster_size: Optional[int] = field(default=None, metadata={"help": "Minimum rows per cluster; default r."})
    seed: int = field(default=0, metadata={"help": "Seed of the clustering."})
    init_weights: bool = field(default=True, metadata={"help": "B = 0 and a small random T (identity at step 0)."})
    init_router_std: Optional[float] = field(
        default=None, metadata={"help": "Std of the initial T; default 1/r ('none') or 1/k ('rms')."}
    )
    indices_path: Optional[str] = field(default=None, metadata={"help": "Precomputed index file; skips clustering."})
    preset: Optional[Preset] = field(
        default=None,
        metadata={"help": "'paper': the paper's exact router, rows, k, f and scale, whatever the defaults."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear", metadata={"help": "Modules to adapt: names, a regex, or 'all-linear'."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules not to adapt."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra modules trained in full."})
    bias: str = field(default="none", metadata={"help": "Only 'none' is supported."})
    # Read and written by PEFT and TRL for every tuner (TRL sets it when it adds chat-template tokens).
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(default=None)
    target_parameters: Optional[list[str]] = field(default=None)

    def __post_init__(self) -> None:
        # PEFT's loaders rebuild a saved config by passing its whole dict, `peft_type` included; a user never
        # passes it. Such a config restores an adapter whose indices come with its weights, so the model
        # must not cluster when it is injected (`IDLoRAModel` consumes this flag once).
        self._restored_from_checkpoint = self.peft_type is not None
        super().__post_init__()
        self.peft_type = IDLoRAPeftType.IDLORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.preset is not None:
            self._apply_preset()
        if self.idlora_alpha is None:
            self.idlora_alpha = float(self.r)
        if self.min_cluster_size is None:
            self.min_cluster_size = self.r
        self._validate()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs) -> "IDLoRAConfig":
        """PEFT's loader, remembering the directory (not a field: never saved) so that an error in the adapter's
        tensors can name the file (`loading.py`)."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.loaded_from = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        return config

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """PEFT's writer, then the ID-LoRA section of the folder's README.md (`model_card.py`)."""
        super().save_pretrained(save_directory, **kwargs)
        from .model_card import write_section

        write_section(save_directory, self)

    def _apply_preset(self) -> None:
        """The preset's values replace fields left at their defaults; a field set to a third value is an error
        (a saved config, whose `idlora_alpha` became `r`, loads again)."""
        if self.preset not in PRESETS:
            raise ValueError(f"IDLoRAConfig: invalid preset={self.preset!r}. Choose one of {tuple(PRESETS)}, or "
                             "leave it unset.")
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in PRESETS[self.preset].items():
            given = getattr(self, name)
            if given not in (value, defaults[name]) and not (name == "idlora_alpha" and given == float(self.r)):
                raise ValueError(f"IDLoRAConfig: invalid {name}={given!r} with preset={self.preset!r}, which sets "
                                 f"{name}={value!r}. Leave {name} unset, or drop the preset to change it.")
            setattr(self, name, value)

    def _validate(self) -> None:
        def bad(name: str, value, fix: str) -> ValueError:
            return ValueError(f"IDLoRAConfig: invalid {name}={value!r}. {fix}")

        for name in ("r", "num_clusters", "rank_boost"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, value, "It must be a positive integer.")
        if self.r % self.rank_boost:
            raise bad("r", self.r, f"r must be divisible by rank_boost={self.rank_boost}; use e.g. "
                      f"r={self.r - self.r % self.rank_boost or self.rank_boost}.")
        if self.router not in ROUTERS:
            raise bad("router", self.router, f"Choose one of {ROUTERS}.")
        if self.router_norm not in ROUTER_NORMS:
            raise bad("router_norm", self.router_norm, f"Choose one of {ROUTER_NORMS}.")
        self._check_selection_name(bad)
        if self.distance not in DISTANCES:
            raise bad("distance", self.distance, f"Choose one of {DISTANCES}.")
        if not isinstance(self.min_cluster_size, int) or self.min_cluster_size < self.r:
            raise bad("min_cluster_size", self.min_cluster_size,
                      f"Each cluster must keep at least r={self.r} rows; use a value >= r (or leave it unset).")
        if not 0.0 <= float(self.idlora_dropout) < 1.0:
            raise bad("idlora_dropout", self.idlora_dropout, "Use a probability in [0, 1).")
        if self.init_router_std is not None and not self.init_router_std > 0:
            raise bad("init_router_std", self.init_router_std, "Use a positive standard deviation.")
        if self.bias != "none":
            raise bad("bias", self.bias, "ID-LoRA trains no bias; use bias='none'.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("IDLoRAConfig: layers_pattern needs layers_to_transform as well.")
        if self.target_parameters:
            raise bad("target_parameters", self.target_parameters,
                      "ID-LoRA adapts whole modules; use target_modules instead.")

    def _check_selection_name(self, bad) -> None:
        """Built-in names are a constant, checked here; any other name must come from a plugin and is checked
        when rows are selected (`plugins.check_selection`), so a config never starts the plugin manager. A
        near miss of a built-in name (`"PMRC"`, `"pmrc_qr"`) is taken for a typo and refused now."""
        name = self.selection
        if not isinstance(name, str) or not name:
            raise bad("selection", name, f"Choose one of {SELECTIONS}, or a plugin's strategy name.")
        if name in SELECTIONS:
            return
        near = difflib.get_close_matches(name.lower().replace("_", "-"), SELECTIONS, n=1, cutoff=0.75)
        if near:
            raise bad("selection", name, f"Did you mean {near[0]!r}? Built-in strategies: {SELECTIONS}; plugin "
                      "strategies must not be spelt like a built-in one.")

    @property
    def scaling(self) -> float:
        """The factor `s = idlora_alpha / r` on the update."""
        return float(self.idlora_alpha) / self.r

    @property
    def router_std(self) -> float:
        """The standard deviation of the token router's initial `T`."""
        if self.init_router_std is not None:
            return float(self.init_router_std)
        return 1.0 / (self.r if self.router_norm == "none" else self.num_clusters)

    def decomposition_spec(self) -> dict:
        """The settings that determine the indices: two adapters with equal specs share their indices."""
        return {
            "r": self.r,
            "num_clusters": self.num_clusters,
            "selection": self.selection,
            "distance": self.distance,
            "min_cluster_size": self.min_cluster_size,
            "seed": self.seed,
        }
