"""``Recipe``: every option of ``moefx.convert``, documented and validated in one place.

``convert(model, calibration, recipe)`` and ``convert(model, num_experts, top_k, calibration,
**options)`` build the same object; the converted model carries it (``moefx_recipe``),
``save_pretrained`` writes it (``to_dict``) and ``load_pretrained`` rebuilds from it
(``from_dict``). Stages read it and never re-check it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from moefx.fit.carve import CARVERS
from moefx.fit.routers import FITTED_ROUTERS, ROUTERS

METHODS = ("upcycle", *CARVERS)
IMPORTANCES = ("activation", "taylor")
GATINGS = ("unit", "softmax", "sigmoid")
PREGATES = ("block",)


def _option(default: Any, help: str, choices: Optional[tuple] = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Recipe:
    """How ``moefx.convert`` turns each dense FFN into an MoE layer."""

    num_experts: int = _option(8, "experts per layer, shared ones included; the FFN width must divide by it "
                                  "(method='upcycle': copies of the FFN). With no structure or method option given, "
                                  "convert uses Recipe.measured: 64 experts, half the active share shared, "
                                  "co-activation, least-squares router, refit, at active=0.5")
    top_k: Optional[int] = _option(None, "routed experts active per token, besides the num_shared shared ones "
                                         "(default 2, or what active= asks for)")
    method: str = _option("split", "'split' (MoEfication: balanced k-means on W_in rows), 'coactivation' (neurons "
                                   "clustered by activation pattern on the calibration data), 'random' "
                                   "(MoEfication's baseline), or 'upcycle' (copies of the FFN; sparse upcycling)",
                                   choices=METHODS)
    num_shared: int = _option(0, "always-active experts made of the most important neurons (DeepSeekMoE, CMoE)")
    importance: str = _option("activation", "what puts a neuron in a shared expert: 'activation' (how often it "
                                            "fires, CMoE) or 'taylor' (sum of |dL/dh * h|, Dense2MoE / LLaMA-MoE)",
                                            choices=IMPORTANCES)
    router: str = _option("centroid", "how carved experts are scored: 'centroid' (mean W_in row of the expert's "
                                      "neurons), 'representative' (CMoE), 'least_squares' (closed-form ridge "
                                      "regression of the oracle's choice) or 'distilled' (the same target, Adam)",
                                      choices=tuple(ROUTERS))
    compensate: bool = _option(False, "give every expert its mean output over the tokens that skip it as a bias")
    refit: bool = _option(False, "closed-form ridge least-squares fit of the experts' output weights and biases to "
                                 "the dense FFN's output under the final routing")
    gating: str = _option("unit", "weight of a carved expert: 'unit' (1: all experts active reproduce the dense FFN "
                                  "exactly) or the router's 'softmax' / 'sigmoid' probability (Mixtral, Qwen-MoE; what "
                                  "serving engines compute), with the output weights refit under those gates (needs a "
                                  "fitted router and refit=True). With top_k = the routed experts every combination is "
                                  "exact: the router is zeroed, so all gates are equal (1/E, or 1/2 for unrenormalised "
                                  "sigmoid), and the output weights are divided by that gate",
                                  choices=GATINGS)
    renormalize: bool = _option(False, "gating='softmax' | 'sigmoid': divide the top_k gates by their sum (Mixtral, "
                                       "norm_topk_prob=True)")
    biases: bool = _option(True, "False: router fit and refit add no bias terms (router, expert-output and layer "
                                 "biases), which the transformers MoE layouts (save_pretrained layout='mixtral', "
                                 "'qwen2_moe', 'qwen3_moe') cannot hold")
    top_p: float = _option(1.0, "dynamic-k (Huang et al. 2024): keep routed experts while the router's softmax "
                                "mass before them is below top_p")
    min_k: int = _option(1, "dynamic-k: at least this many routed experts per token")
    granularity: int = _option(1, "method='upcycle': cut every copy into this many shards (fine-grained "
                                  "upcycling, arXiv 2410.07524)")
    drop_rate: float = _option(0.0, "method='upcycle': Drop-Upcycling (arXiv 2502.19261), share of each expert's "
                                    "neurons re-drawn")
    num_zero: int = _option(0, "zero experts (MoE++): output 0, no FLOPs")
    num_copy: int = _option(0, "copy experts (MoE++): output x")
    num_const: int = _option(0, "constant experts (MoE++): output a learned vector")
    pregate: Optional[str] = _option(None, "'block': Read-ME pre-gating, each layer routed from the input of its "
                                           "transformer block",
                                           choices=PREGATES)
    distill_steps: int = _option(0, "end-to-end distillation steps against the dense model after the "
                                    "training-free stages (moefx.distill)")
    sample_tokens: int = _option(2048, "hidden-activation rows kept per FFN for co-activation clustering")
    fit_tokens: int = _option(16384, "calibration tokens kept per layer for the router fit, compensation and refit")
    seed: int = _option(0, "seed of every random choice (clustering, routers, Drop-Upcycling)")
    holdout: float = _option(0.2, "share of the calibration data held out to choose by: of the sequences "
                                  "(sentences), for the ridge strength of the least-squares router and the refit "
                                  "(from a small grid, by held-out error, then solved on all rows; the conversion "
                                  "report shows the choice), and of the batches, for the state distillation keeps; "
                                  "0 keeps fixed ridges (router 1e-3, refit 1e-2)")
    active: Optional[float] = _option(None, "the share of each layer's experts a token uses, (num_shared + top_k) "
                                            "/ num_experts (for a carved layer: the share of the dense FFN), "
                                            "instead of top_k: active=0.25 with num_experts=32 is top_k=8")
    distill_seconds: Optional[float] = _option(None, "time budget of the distillation in seconds (it stops there and "
                                                     "keeps its best state); None: distill_steps decides")

    def __post_init__(self):
        self._resolve_top_k()
        self._check_types()
        self._check_counts()
        self._check_method()
        self._check_routing()
        self._check_gating()

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type.removeprefix("Optional[").removesuffix("]")
            if value is None and f.type.startswith("Optional["):
                continue
            if kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                fail(f"{f.name}={value!r} must be a whole number" +
                     (f" (int({value!r}))" if isinstance(value, float) and value == int(value) else ""))
            if kind == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                fail(f"{f.name}={value!r} must be a number")
            if kind == "bool" and not isinstance(value, bool):
                fail(f"{f.name}={value!r} must be True or False")

    def _resolve_top_k(self) -> None:
        """top_k from active= when given (it must name a whole number of experts), else 2 by default."""
        if self.active is None:
            if self.top_k is None:
                object.__setattr__(self, "top_k", 2)
            return
        if isinstance(self.active, bool) or not isinstance(self.active, (int, float)) or not 0 < self.active <= 1:
            fail(f"active={self.active!r} is the share of each layer's experts a token uses; pick it in (0, 1], "
                 "e.g. active=0.25")
        if not isinstance(self.num_experts, int) or not isinstance(self.num_shared, int):
            return  # _check_types names the bad count
        top_k = round(self.active * self.num_experts) - self.num_shared
        choices = {(self.num_shared + k) / self.num_experts: k for k in range(1, self.num_experts - self.num_shared + 1)}
        if abs(self.active * self.num_experts - round(self.active * self.num_experts)) > 1e-9 or top_k < 1:
            near = sorted(choices, key=lambda a: abs(a - self.active))[:3]
            fail(f"active={self.active} is not a whole number of experts out of num_experts={self.num_experts} "
                 f"(num_shared={self.num_shared} always active, at least 1 routed); the nearest choices are "
                 + ", ".join(f"active={a:g} (top_k={choices[a]})" for a in sorted(near))
                 + "; or change num_experts")
        if self.top_k is not None and self.top_k != top_k:
            fail(f"active={self.active} means top_k={top_k} with num_experts={self.num_experts} and num_shared="
                 f"{self.num_shared}, but top_k={self.top_k} was given; pass only one of them")
        object.__setattr__(self, "top_k", top_k)

    def _check_counts(self) -> None:
        if self.num_experts < 1:
            fail(f"num_experts={self.num_experts} must be at least 1")
        if not 0 <= self.num_shared < self.num_experts:
            fail(f"num_shared={self.num_shared} must be between 0 and num_experts - 1 ({self.num_experts - 1}): at "
                 "least one expert must be routed")
        routed = self.num_experts - self.num_shared
        if not 1 <= self.top_k <= routed:
            fail(f"top_k={self.top_k} must be between 1 and the number of routed experts ({routed} = num_experts "
                 f"{self.num_experts} - num_shared {self.num_shared}); use top_k={routed} to activate all of them")
        for name in ("num_zero", "num_copy", "num_const", "distill_steps"):
            if getattr(self, name) < 0:
                fail(f"{name}={getattr(self, name)} must be a whole number >= 0")
        if self.sample_tokens < 1 or self.fit_tokens < 1:
            fail(f"sample_tokens={self.sample_tokens} and fit_tokens={self.fit_tokens} must be at least 1")
        if self.distill_seconds is not None and self.distill_seconds <= 0:
            fail(f"distill_seconds={self.distill_seconds} must be > 0 (or None for no time budget)")
        if not 0 <= self.holdout < 1:
            fail(f"holdout={self.holdout} is the share of calibration sequences held out to choose the ridge; "
                 "pick it in [0, 1) (0.2 by default, 0 for the fixed ridges)")

    def _check_method(self) -> None:
        if self.method not in METHODS:
            fail(f"method={self.method!r} is not one of {METHODS}")
        if self.importance not in IMPORTANCES:
            fail(f"importance={self.importance!r} is not one of {IMPORTANCES}")
        if self.importance != "activation" and not self.num_shared:
            fail("importance chooses the neurons of the shared experts; set num_shared >= 1 or leave "
                 "importance='activation'")
        if self.method == "upcycle":
            if self.num_shared:
                fail("method='upcycle' copies the whole FFN into each expert; num_shared applies to the carving "
                     "methods 'split' and 'coactivation'")
            if self.router != "centroid" or self.compensate or self.refit:
                fail("router, compensate and refit tune carved experts; method='upcycle' keeps whole copies of the "
                     "FFN behind a softmax router: use method='split' or 'coactivation'")
        elif self.granularity != 1 or self.drop_rate:
            fail(f"granularity and drop_rate shape the copies of method='upcycle'; method={self.method!r} already "
                 "cuts the FFN into num_experts parts")
        if self.granularity < 1:
            fail(f"granularity={self.granularity} must be a whole number of shards per copy, >= 1")
        if not 0.0 <= self.drop_rate <= 1.0:
            fail(f"drop_rate={self.drop_rate} is the share of neurons each expert re-draws; pick it in [0, 1] "
                 "(Drop-Upcycling uses 0.5)")

    def _check_routing(self) -> None:
        if self.router not in ROUTERS:
            fail(f"router={self.router!r} is not one of {tuple(ROUTERS)}")
        fitted = self.router in FITTED_ROUTERS
        if self.compensate and not self.refit and not fitted:
            fail("compensate needs router='least_squares' or 'distilled' (or refit=True): it corrects for the "
                 "experts a token skips, which helps only when the router skips the experts that contribute least "
                 "(the centroid router often picks the opposite)")
        if not 0.0 < self.top_p <= 1.0 or not 1 <= self.min_k <= self.top_k:
            fail(f"dynamic-k needs 0 < top_p <= 1 and 1 <= min_k <= top_k; got top_p={self.top_p}, "
                 f"min_k={self.min_k}, top_k={self.top_k}")
        if self.granularity > 1 and self.top_p < 1.0:
            fail("dynamic-k (top_p < 1) could keep only some shards of a copy when granularity > 1; use top_p=1 or "
                 "granularity=1")
        if self.zero_computation and self.method != "upcycle" and not fitted:
            fail("zero-computation experts (num_zero, num_copy, num_const) in carved layers need "
                 "router='least_squares' or 'distilled', which learns which slots they can take over; the analytic "
                 f"router={self.router!r} has no score for them")
        if (self.num_copy or self.num_const) and (self.compensate or self.refit):
            fail("compensate and refit model a layer as its real experts only; with copy or constant experts use "
                 "num_zero alone, or drop compensate/refit")
        if self.pregate is not None:
            if self.pregate not in PREGATES:
                fail(f"pregate={self.pregate!r} is not one of {PREGATES} (or None)")
            if not fitted:
                fail("pregate='block' routes each MoE layer from the input of its block, so the router must be "
                     f"fitted to that input: pass router='least_squares' or 'distilled' (not {self.router!r})")
            if self.compensate or self.refit:
                fail("compensate and refit fit the experts under the routing of the FFN's own input; with pregate "
                     "use neither")

    def _check_gating(self) -> None:
        if self.gating not in GATINGS:
            fail(f"gating={self.gating!r} is not one of {GATINGS}")
        if self.upcycle and (self.gating != "unit" or self.renormalize or not self.biases):
            fail("gating, renormalize and biases shape carved experts; method='upcycle' always weights its copies by "
                 "renormalised softmax gates: leave them at their defaults, or use method='split' or 'coactivation'")
        if self.gating == "unit":
            if self.renormalize:
                fail("renormalize divides router probabilities by their sum; unit gates are 1 each: set "
                     "gating='softmax' or 'sigmoid' (or renormalize=False)")
        elif not (self.fitted_router and self.refit):
            fail(f"gating={self.gating!r} weights each expert by the router's probability, which makes sense only for a "
                 "router fitted to the experts (router='least_squares' or 'distilled') and scales every expert's "
                 "output, which the output weights must be refit under (refit=True); pass both, or gating='unit'")
        if not self.biases and (self.compensate or self.zero_computation):
            fail("biases=False leaves the layers without bias terms, but compensate is an expert-output bias and "
                 "zero-computation experts are switched off by a router bias; drop those options or keep biases=True")

    @property
    def zero_computation(self) -> int:
        return self.num_zero + self.num_copy + self.num_const

    @property
    def upcycle(self) -> bool:
        return self.method == "upcycle"

    @property
    def fitted_router(self) -> bool:
        return self.router in FITTED_ROUTERS

    def check_width(self, name: str, width: int) -> None:
        """Refuse FFN ``name`` of ``width`` neurons if this recipe's experts do not split it evenly."""
        if self.upcycle and width % self.granularity:
            fail(f"{name} has {width} neurons, which do not split into granularity={self.granularity} equal shards")
        if not self.upcycle and width % self.num_experts:
            divisors = [d for d in range(2, min(width, 128) + 1) if width % d == 0]
            fix = (f"pick num_experts from {divisors}" if divisors else
                   f"{width} has no divisor from 2 to 128, so no carving splits it evenly; convert with "
                   "method='upcycle' (each expert a copy of the whole FFN)")
            fail(f"{name} has {width} neurons, which do not split into num_experts={self.num_experts} equal "
                 f"experts; {fix}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "the recipe", only_known: bool = False):
        """The recipe of ``values``; ``only_known``: just check that every key is an option, and return them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            fail(f"{source} has unknown option(s) {unknown}; the options are {sorted(known)}")
        return dict(values) if only_known else cls(**values)

    @classmethod
    def measured(cls, active: Optional[float] = None, shared: bool = True, **options: Any) -> "Recipe":
        """The best training-free recipe ``bench/bench_llm.py`` measured on a real LLM (SmolLM2-135M, WikiText-2),
        at ``active`` (default 0.5): ``MEASURED_EXPERTS`` fine-grained experts, half of the active share in
        always-active shared experts, co-activation carving, least-squares router, closed-form refit
        (DeepSeekMoE's fine and shared experts, MoEfication's co-activation split, CMoE's shared experts).
        What ``convert`` and ``moefx convert`` use when no option of ``STRUCTURE_OPTIONS`` is given; ``options``
        are the other fields (seed, holdout, gating, ...). ``shared`` False: every active expert routed (the
        Mixtral / Qwen3-MoE layouts hold no shared expert)."""
        chosen = sorted(set(options) & set(MEASURED_SETS))
        if chosen:
            fail(f"Recipe.measured sets {chosen} itself; build Recipe(...) to choose them")
        active = MEASURED_ACTIVE if active is None else active
        experts = MEASURED_EXPERTS
        routed_and_shared = round(active * experts)
        return cls(num_experts=experts, num_shared=routed_and_shared // 2 if shared and routed_and_shared > 1 else 0,
                   active=active, method="coactivation", router="least_squares", refit=True, **options)

    @classmethod
    def help(cls) -> dict[str, str]:
        """{option: its help text}."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}


def resolve(options: dict[str, Any], layout: str = "moefx") -> Recipe:
    """The recipe ``options`` (``Recipe`` fields) ask for: ``Recipe.measured`` when none of them chooses the
    structure or the fitting method (``STRUCTURE_OPTIONS``), else ``Recipe(**options)``. For a transformers MoE
    ``layout`` of carved experts the options left open are set to what it holds: softmax gates over a fitted
    router with refit, no bias terms, top-k gates renormalised for mixtral / qwen3_moe (not for qwen2_moe), and
    no shared expert in mixtral / qwen3_moe (the measured recipe routes every active expert there)."""
    measured = not set(options) & set(STRUCTURE_OPTIONS)
    if layout != "moefx" and options.get("method") != "upcycle":
        options = {"gating": "softmax", "biases": False, "renormalize": layout != "qwen2_moe", **options}
        if not measured:
            options = {"router": "least_squares", "refit": True, **options}
    if measured:
        return Recipe.measured(shared=layout not in ("mixtral", "qwen3_moe"), **options)
    return Recipe(**options)


# the measured default (``Recipe.measured``): the share of each FFN a token runs, and the experts per layer
MEASURED_ACTIVE = 0.5
MEASURED_EXPERTS = 64
# what Recipe.measured chooses itself
MEASURED_SETS = ("num_experts", "top_k", "method", "num_shared", "router", "refit")
# options that decide the structure or the fitting method: with none of them given, convert uses Recipe.measured
STRUCTURE_OPTIONS = ("num_experts", "top_k", "method", "num_shared", "importance", "router", "compensate", "refit",
                     "gating", "renormalize", "biases", "granularity", "drop_rate", "num_zero", "num_copy",
                     "num_const", "pregate")


def fail(message: str):
    raise ValueError(f"moefx.convert: {message}")
