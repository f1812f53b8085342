"""The in-process experiment: agreement against budget for each defense and strategy.

    stealguard-attack experiment --dataset mnist --out attacks/results/mnist

reads top to bottom like Sec. IV:
 1. the base model M (the model owner's, trained by stealguard.modelserver.training and
    cached, so it is the very model the model server serves);
 2. Sample against M, undefended, at every budget (Fig. 4's top curve, S(M));
 3. calibration of Reverse Sigmoid (the paper's rule, calibrate.py);
 4. Sample against P(M, Reverse Sigmoid) at every budget;
 5. ArgmaxSample at every budget and beyond, to see how many more queries labels need;
 6. Sample against the paper's other defenses at the table budget (Table I);
 7. the defense-aware attacks against Reverse Sigmoid (Table IV);
 8. the other query strategies against M (Fig. 2): Random, Jacobian augmentation;
 9. on iris, Tramèr's equation solving against the logistic regression.
Every run is one record in results.json; report.py turns them into report.md and figures.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from stealguard.attacks import strategies
from stealguard.attacks.metrics import accuracy, agreement, distortion
from stealguard.attacks.oracles import LocalOracle
from stealguard.attacks.strategies import Attacker
from stealguard.attacks.training import TrainConfig, predict
from stealguard.modelserver.architectures import build_model
from stealguard.modelserver.datasets import Dataset
from torch import nn
from tqdm import tqdm

SECRET = b"stealguard-experiment"  # key of the random defenses in these experiments


@dataclass(frozen=True)
class DefenseSpec:
    """A defense by registry name and parameters (stealguard.server.defenses)."""

    name: str
    params: dict = field(default_factory=dict)

    def _make(self):
        from stealguard.server.defenses import make_defense

        return make_defense(self.name, secret=SECRET, **self.params)

    def build(self) -> Callable[[np.ndarray], np.ndarray]:
        """The defense as a callable probs -> probs that leaves torch's thread count alone:
        numba's OpenMP layer resets the process-wide OpenMP thread count after a parallel
        kernel, which would silently give torch more threads than we set."""
        defense = self._make()

        def protect(probs: np.ndarray) -> np.ndarray:
            threads = torch.get_num_threads()
            try:
                return defense(probs)
            finally:
                torch.set_num_threads(threads)

        return protect

    def describe(self) -> dict:
        """{"name": ..., "params": {...}} with every parameter, defaults filled in."""
        return {"name": self.name, "params": dict(self._make().params)}


NO_DEFENSE = DefenseSpec("none")


@dataclass(frozen=True)
class Profile:
    """The sizes of one experiment. `full` is what attacks/results/ was made with."""

    budgets: tuple[int, ...]  # Sample against M and against P(M, Reverse Sigmoid)
    argmax_budgets: tuple[int, ...]  # ArgmaxSample against M
    table_budget: int  # Tables I, II and IV
    strategy_budget: int  # Random and Jacobian (Fig. 2)
    calibration_budget: int
    betas: tuple[float, ...]
    gammas: tuple[float, ...]
    train: TrainConfig
    inversion_pairs: int
    inverter_steps: int
    other_defenses: tuple[DefenseSpec, ...]
    architecture: str = "allconv"  # the attacker's (Sec. IV-B uses AllConv)
    # Attacker seeds of every curve point (Fig. 4): the report averages them, so that a
    # one-sample wobble of one training run does not decide a target.
    curve_seeds: tuple[int, ...] = (0,)


PAPER_DEFENSES = (  # Table I's other rows, at the defense library's default parameters
    DefenseSpec("uniform_random"),
    DefenseSpec("uniform_random_concave"),
    DefenseSpec("uniform_random_convex"),
    DefenseSpec("ranking_preserving_uniform_random"),
    DefenseSpec("sine"),
)

IMAGE_FULL = Profile(
    budgets=(250, 500, 1000, 2000, 4000),
    argmax_budgets=(250, 500, 1000, 2000, 4000, 8000, 16000),
    table_budget=4000,
    strategy_budget=1000,
    calibration_budget=4000,
    betas=(0.5, 1.0, 1.5),
    gammas=(0.25, 0.5),
    # The attacker distils at T = 4: a confident model's answers are nearly one-hot, and
    # plain cross-entropy on them learns little more than the labels would.
    train=TrainConfig(epochs=10, min_steps=200, batch_size=128, lr=2e-3, temperature=4.0),
    inversion_pairs=4000,
    inverter_steps=3000,
    other_defenses=PAPER_DEFENSES,
    curve_seeds=(0, 1, 2),
)
IMAGE_QUICK = Profile(
    budgets=(100, 200),
    argmax_budgets=(100, 200, 400),
    table_budget=200,
    strategy_budget=100,
    calibration_budget=200,
    betas=(1.5,),
    gammas=(0.3, 0.5),
    train=TrainConfig(epochs=3, min_steps=40, batch_size=128, lr=2e-3, temperature=4.0),
    inversion_pairs=400,
    inverter_steps=300,
    other_defenses=PAPER_DEFENSES[:1],
)
TABULAR_FULL = replace(
    IMAGE_FULL,
    budgets=(15, 30, 60, 150, 300, 1500),
    argmax_budgets=(15, 30, 60, 150, 300, 1500),
    table_budget=300,
    strategy_budget=150,
    calibration_budget=300,
    train=TrainConfig(epochs=50, min_steps=300, batch_size=16, lr=1e-2),
    inversion_pairs=1500,
    architecture="logreg",
    curve_seeds=(0,),
)
TABULAR_QUICK = replace(
    IMAGE_QUICK,
    budgets=(15, 60),
    argmax_budgets=(15, 60),
    table_budget=60,
    strategy_budget=60,
    calibration_budget=60,
    train=TrainConfig(epochs=20, min_steps=100, batch_size=16, lr=1e-2),
    architecture="logreg",
)


def profile_for(ds: Dataset, quick: bool) -> Profile:
    if ds.is_image:
        return IMAGE_QUICK if quick else IMAGE_FULL
    return TABULAR_QUICK if quick else TABULAR_FULL


# The model owner's recipes (stealguard.modelserver.training caches what they train).
BASE_RECIPES = {
    "mnist": {"architecture": "simple"},  # the model server's default model
    "digits": {"architecture": "simple", "epochs": 30},
    "iris": {"architecture": "logreg", "epochs": 300, "learning_rate": 0.05},
}


def base_model(dataset: str, seed: int = 0, log: Callable[[str], None] = print):
    """The model owner's trained model M for `dataset` (torch module returning logits),
    trained with stealguard.modelserver.training (cached on disk) and its metadata."""
    from stealguard.modelserver.training import Recipe, trained_model

    recipe = Recipe(dataset=dataset, seed=seed, **BASE_RECIPES[dataset])
    trained = trained_model(recipe, log=log)
    model = build_model(recipe.architecture, trained.input_shape, trained.num_classes)
    model.load_state_dict(torch.load(trained.weights, weights_only=True))
    info = {"architecture": recipe.architecture, "recipe": asdict(recipe),
            "weights": str(trained.weights)}
    return model.eval(), info


@dataclass
class Run:
    """One planned attack: strategy against a defended base model at a budget."""

    stage: str
    strategy: str
    defense: DefenseSpec
    budget: int
    options: dict = field(default_factory=dict)  # extra keyword arguments of the strategy
    seed: int = 0  # added to the experiment's seed for the attacker of this run


class Experiment:
    """Runs attacks against the base model of one dataset and collects one record per run."""

    def __init__(self, ds: Dataset, model: nn.Module, profile: Profile, seed: int = 0):
        self.ds, self.model, self.profile, self.seed = ds, model, profile, seed
        self.attacker = Attacker.from_dataset(ds, profile.architecture, profile.train, seed)
        self.base_test = predict(model, ds.test_x)
        self.records: list[dict] = []
        self._distortion: dict[str, dict] = {}

    def defense_effect(self, spec: DefenseSpec) -> dict:
        """P(M, defense) on the test inputs: distortion and accuracy (Tables I and II)."""
        key = json.dumps(spec.describe(), sort_keys=True)
        if key not in self._distortion:
            protected = spec.build()(self.base_test)
            self._distortion[key] = {
                **distortion(protected, self.base_test),
                "protected_accuracy": accuracy(protected, self.ds.test_y),
            }
        return self._distortion[key]

    def run(self, plan: Run) -> dict:
        """Carry out one attack and return (and keep) its record."""
        started = time.perf_counter()
        oracle = LocalOracle(self.model, plan.budget, plan.defense.build())
        strategy = strategies.STRATEGIES[plan.strategy]
        attacker = replace(self.attacker, seed=self.seed + plan.seed)
        stolen = strategy(oracle, plan.budget, attacker, **plan.options)
        stolen_test = predict(stolen, self.ds.test_x)
        record = {
            "dataset": self.ds.name,
            "stage": plan.stage,
            "defense": plan.defense.describe(),
            "strategy": plan.strategy,
            "architecture": "logreg" if plan.strategy == "equation-solving"
            else self.profile.architecture,
            "budget": plan.budget,
            "seed": attacker.seed,
            "queries": oracle.queries,
            "agreement": agreement(stolen_test, self.base_test),
            "accuracy": accuracy(stolen_test, self.ds.test_y),
            **self.defense_effect(plan.defense),
            "seconds": round(time.perf_counter() - started, 2),
        }
        self.records.append(record)
        return record

    def run_all(self, plans: Iterable[Run], desc: str) -> list[dict]:
        plans = list(plans)
        bar = tqdm(plans, desc=desc, unit="run", disable=not sys.stderr.isatty(), leave=False)
        return [self.run(plan) for plan in bar]

    def inverter(self, spec: DefenseSpec) -> nn.Module:
        """The inversion MLP, trained on (y, y_hat) pairs of the base and protected model
        on the attacker's own inputs (the paper's full-knowledge assumption: these pairs are
        not counted against the query budget)."""
        pairs_attacker = replace(self.attacker, seed=self.seed + 1)
        x = strategies.query_inputs(pairs_attacker, self.profile.inversion_pairs)
        y = predict(self.model, x)
        return strategies.train_inverter(spec.build()(y), y, steps=self.profile.inverter_steps,
                                         seed=self.seed)


def reverse_sigmoid(beta: float, gamma: float) -> DefenseSpec:
    return DefenseSpec("reverse_sigmoid", {"beta": beta, "gamma": gamma, "preserve_top1": True})


def run_experiment(ds: Dataset, model: nn.Module, profile: Profile, seed: int = 0,
                   log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """The whole experiment for one dataset; returns (records, calibration summary)."""
    from stealguard.attacks.calibrate import calibrate

    exp = Experiment(ds, model, profile, seed)
    p = profile
    tabular = not ds.is_image

    seeds = p.curve_seeds
    log(f"S(M): Sample against the undefended model, budgets {list(p.budgets)}, "
        f"attacker seeds {list(seeds)}")
    exp.run_all((Run("curve", "sample", NO_DEFENSE, b, seed=k)
                 for b in p.budgets for k in seeds), "S(M)")

    log(f"calibrating Reverse Sigmoid at budget {p.calibration_budget} "
        f"(beta {list(p.betas)} x gamma {list(p.gammas)})")
    calibration = calibrate(exp, p.betas, p.gammas, p.calibration_budget)
    rs = reverse_sigmoid(calibration["beta"], calibration["gamma"])
    log(f"  chosen: beta {rs.params['beta']}, gamma {rs.params['gamma']} "
        f"({calibration['reason']})")

    log("S(M, Reverse Sigmoid) and ArgmaxSample curves")
    exp.run_all((Run("curve", "sample", rs, b, seed=k) for b in p.budgets for k in seeds),
                "S(M, RS)")
    exp.run_all((Run("curve", "argmax", NO_DEFENSE, b, seed=k)
                 for b in p.argmax_budgets for k in seeds), "argmax")

    log(f"Table I: the other defenses at budget {p.table_budget}")
    exp.run_all((Run("table", "sample", d, p.table_budget) for d in p.other_defenses), "Table I")

    log(f"Table IV: defense-aware attacks on Reverse Sigmoid at budget {p.table_budget}")
    beta_gamma = {"beta": rs.params["beta"], "gamma": rs.params["gamma"]}
    aware = [
        Run("defense-aware", "same-layer", rs, p.table_budget, beta_gamma),
        Run("defense-aware", "mse", rs, p.table_budget),
        Run("defense-aware", "inversion", rs, p.table_budget, {"inverter": exp.inverter(rs)}),
        Run("defense-aware", "argmax", rs, p.table_budget),
    ]
    exp.run_all(aware, "Table IV")

    log(f"Fig. 2: query strategies against M at budget {p.strategy_budget}")
    others = ["random"] + ([] if tabular else ["jacobian"])
    exp.run_all((Run("strategies", s, NO_DEFENSE, p.strategy_budget) for s in others), "Fig. 2")

    if tabular and p.architecture == "logreg":
        params = ds.num_classes * (math.prod(ds.input_shape) + 1)
        budgets = sorted({params, *p.budgets} - {b for b in p.budgets if b < params})
        log(f"equation solving (Tramèr et al.), {params} parameters, budgets {budgets}")
        exp.run_all((Run("equation-solving", "equation-solving", d, b)
                     for d in (NO_DEFENSE, rs) for b in budgets), "equations")
    return exp.records, calibration


def save_results(path: Path, meta: dict, records: list[dict]) -> None:
    """results.json: {"meta": {...}, "runs": [one record per run]}."""
    path.write_text(json.dumps({"meta": meta, "runs": records}, indent=1) + "\n")
