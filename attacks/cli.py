"""stealguard-attack: model-stealing attacks and experiments.

    stealguard-attack experiment --dataset mnist|digits|iris --out DIR [--quick]
    stealguard-attack calibrate  --dataset mnist [--model-store DIR --model NAME] [--quick]
    stealguard-attack calibrate  --from-contract attacks/results/mnist [--tolerance 0.01]
    stealguard-attack run --target HOST:PORT|http://HOST:PORT --model mnist --model mnist-open \\
        --strategy sample --budget 250,500,1000 --out DIR [--baseline-model mnist-open] \
        [--policies-from SIDECAR --policy mnist-open=none]   # for closed-form, learned ...
    stealguard-attack contract --dataset mnist --out DIR [--budgets 50,1000] [--seeds 0-19] \\
        [--quick]
    stealguard-attack detect --out attacks/results/detection [--budget 4000] [--clients 20] \\
        [--attacks sample,argmax,jacobian,random,knockoff]
    stealguard-attack detect --target HOST:PORT --out DIR   # through a live model server
    stealguard-attack calibrate-detector [--answers FILE.npy]  # the class mix's prior, threshold

Bad input (unknown dataset, strategy or model, unreachable target, a budget that is not a
positive integer) ends with a one-line error and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

from stealguard.modelserver.datasets import DATASET_NAMES

RUN_STRATEGIES = ("sample", "argmax", "random", "jacobian", "same-layer", "mse",
                  "label-smoothed", "argmax-rounded", "contract-floor", "closed-form",
                  "estimated", "learned")
KNOWS_THE_DEFENSE = ("closed-form", "estimated", "learned")


class UsageError(Exception):
    """Bad command-line input; the message names the flag."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(message)


def budgets(text: str) -> list[int]:
    """'250,500,1000' -> [250, 500, 1000]; each a positive integer."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(f"{part!r} is not a positive integer")
        out.append(int(part))
    return out


def positive(text: str) -> int:
    """One positive integer."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def seed_list(text: str) -> list[int]:
    """'0-19' or '5,6,9' (or both, '0-4,9') -> attacker seeds, each a non-negative integer."""
    out = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not a seed or a range A-B")
        lo, hi = int(first), int(last) if dash else int(first)
        if hi < lo:
            raise argparse.ArgumentTypeError(f"{part.strip()!r}: the range ends before it starts")
        out += [s for s in range(lo, hi + 1) if s not in out]
    return out


def floats(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers") from None
    if any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be > 0")
    return values


def dataset_name(text: str) -> str:
    if text not in DATASET_NAMES:
        raise argparse.ArgumentTypeError(f"unknown dataset {text!r}; choose one of "
                                         f"{', '.join(DATASET_NAMES)}")
    return text


def strategy_names(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    for s in names:
        if s not in RUN_STRATEGIES:
            raise argparse.ArgumentTypeError(f"unknown strategy {s!r}; choose from "
                                             f"{', '.join(RUN_STRATEGIES)}")
    return names


def model_policy(text: str) -> tuple[str, str]:
    model, sep, policy = text.partition("=")
    if not sep or not model or not policy:
        raise argparse.ArgumentTypeError(f"{text!r} is not MODEL=POLICY (e.g. mnist-open=none)")
    return model, policy


def detect_attacks(text: str) -> list[str]:
    from stealguard.attacks.detection import ATTACKS

    names = [s.strip() for s in text.split(",") if s.strip()]
    for s in names or [text]:
        if s not in ATTACKS:
            raise argparse.ArgumentTypeError(f"unknown attack {s!r}; choose from "
                                             f"{', '.join(ATTACKS)}")
    return names


def threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stealguard-attack", description=__doc__.split("\n")[0])
    parser.add_argument("--torch-threads", type=threads, default=os.cpu_count() or 1,
                        help="threads torch trains with (default: one per core; lower it "
                             "on a machine that is running other work)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    exp = sub.add_parser("experiment", help="in-process experiment on one dataset")
    exp.add_argument("--dataset", type=dataset_name, required=True)
    exp.add_argument("--out", type=Path, required=True, help="directory for the results")
    exp.add_argument("--quick", action="store_true", help="tiny budgets (for tests)")
    exp.add_argument("--seed", type=int, default=0)

    cal = sub.add_parser("calibrate", help="choose a policy (prints sidecar YAML): from a "
                         "contract run's frontier, or Reverse Sigmoid's beta and gamma by the "
                         "paper's rule")
    cal.add_argument("--from-contract", type=Path, default=None, metavar="DIR",
                     help="choose from the frontier of DIR/contract.json (written by "
                          "`stealguard-attack contract`): of the defenses that keep the "
                          "contract and every thief at argmax-only, the most confidence order")
    cal.add_argument("--tolerance", type=float, default=None,
                     help="with --from-contract: protection within this of the argmax-only "
                          "floor counts as at the floor (default 0.02)")
    cal.add_argument("--dataset", type=dataset_name, default="mnist")
    cal.add_argument("--model-store", type=Path, default=None,
                     help="calibrate the model of this model store (default: the dataset's "
                          "base model, trained and cached)")
    cal.add_argument("--model", default=None, help="model name in the store (default: the "
                     "dataset name); also the policy name printed")
    cal.add_argument("--budget", type=budgets, default=None,
                     help="the attacker budget (default: the profile's)")
    cal.add_argument("--beta", type=floats, default=None, help="grid, e.g. 0.5,1,1.5,2")
    cal.add_argument("--gamma", type=floats, default=None, help="grid, e.g. 0.2,0.3,0.5")
    cal.add_argument("--quick", action="store_true")
    cal.add_argument("--seed", type=int, default=0)

    con = sub.add_parser("contract", help="the utility contract and the Kerckhoffs attacker: "
                         "every attack against the default and the paper's defense, floors, "
                         "frontier (appends to OUT/contract-runs.jsonl, then renders)")
    con.add_argument("--dataset", type=dataset_name, required=True)
    con.add_argument("--out", type=Path, required=True, help="directory for the results")
    con.add_argument("--budgets", type=budgets, default=None,
                     help="only these of the profile's budgets (to split the work between "
                          "processes sharing --out)")
    con.add_argument("--seeds", type=seed_list, default=None,
                     help="attacker seeds of the floors, the default and its alternative, "
                          "e.g. 0-19 (default: the profile's, 0-4); more seeds narrow the "
                          "paired intervals, and runs already recorded are kept")
    con.add_argument("--no-frontier", action="store_true", help="skip the frontier runs")
    con.add_argument("--render-only", action="store_true",
                     help="render what OUT/contract-runs.jsonl holds, run nothing")
    con.add_argument("--quick", action="store_true", help="tiny budgets (for tests)")
    con.add_argument("--seed", type=int, default=0)

    run = sub.add_parser("run", help="attack models through a live TorchServe gRPC or REST "
                         "endpoint")
    run.add_argument("--target", required=True,
                     help="HOST:PORT: TorchServe's gRPC API (the model server, the proxy, "
                     "Envoy); http://HOST:PORT: its REST API (/predictions/{model})")
    run.add_argument("--model", action="append", required=True,
                     help="model to attack (repeat for several)")
    run.add_argument("--strategy", type=strategy_names, action="append", default=None,
                     help=f"one of {', '.join(RUN_STRATEGIES)} (repeat or comma-separate)")
    run.add_argument("--budget", type=budgets, default=[1000],
                     help="queries per attack, e.g. 1000 or 250,500,1000")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--baseline-model", default="mnist-open",
                     help="unprotected model whose answers on the test inputs score the attack")
    run.add_argument("--dataset", type=dataset_name, default="mnist",
                     help="where the attacker's samples and the test inputs come from")
    run.add_argument("--architecture", default="allconv", help="the stolen model's")
    run.add_argument("--beta", type=float, default=None, help="for same-layer (defense-aware)")
    run.add_argument("--gamma", type=float, default=None, help="for same-layer (defense-aware)")
    run.add_argument("--policies-from", default=None, metavar="HOST:PORT",
                     help="the sidecar whose ListPolicies tells the formula-aware strategies "
                          f"({', '.join(KNOWS_THE_DEFENSE)}) each model's defense and "
                          "published parameters (Kerckhoffs: known to any caller)")
    run.add_argument("--policy", action="append", default=[], type=model_policy,
                     metavar="MODEL=POLICY", help="the sidecar policy that protects MODEL "
                     "(default: the policy of its name, else 'default'; 'none': unprotected)")
    run.add_argument("--timeout", type=float, default=30.0,
                     help="seconds to connect and per request of 100 inputs (default 30)")
    run.add_argument("--quick", action="store_true", help="short training (for tests)")
    run.add_argument("--seed", type=int, default=0)

    cdet = sub.add_parser("calibrate-detector", help="the class mix's --detect-prior and "
                          "--detect-threshold from honest traffic (prints model server YAML)")
    cdet.add_argument("--answers", type=Path, default=None, metavar="FILE.npy",
                      help="the model's answers to honest traffic: class indices (N,) or "
                           "probability rows (N, K) (default: the --dataset base model's "
                           "answers on its owner's training images)")
    cdet.add_argument("--classes", type=positive, default=None,
                      help="with class indices: how many classes the model has (default: the "
                           "largest index + 1)")
    cdet.add_argument("--dataset", type=dataset_name, default="mnist")
    cdet.add_argument("--clients", type=positive, default=20,
                      help="calibration clients drawn from the answers (default 20)")
    cdet.add_argument("--per-client", type=positive, default=1000,
                      help="answers per calibration client, in its own random order "
                           "(default 1000, the class mix's window)")
    cdet.add_argument("--seed", type=int, default=0)

    det = sub.add_parser("detect", help="PRADA against each attack and against benign "
                         "clients on the MNIST victim (queries to detection, false alarms)")
    det.add_argument("--out", type=Path, required=True, help="directory for the results")
    det.add_argument("--victim", type=Path, default=Path("attacks/results/mnist"),
                     help="folder holding the victim's victim.pt and victim.json "
                          "(default: attacks/results/mnist)")
    det.add_argument("--budget", type=positive, default=4000, help="queries per attack")
    det.add_argument("--clients", type=positive, default=20,
                     help="benign clients, and as many calibration clients (default 20)")
    det.add_argument("--attacks", type=detect_attacks, default=None,
                     help="comma-separated, default all")
    det.add_argument("--quick", action="store_true", help="short training (for tests)")
    det.add_argument("--seed", type=int, default=0)
    live = det.add_argument_group(
        "through a live model server (class mix; scripts/detect-live starts the stack)")
    live.add_argument("--target", default=None, metavar="HOST:PORT",
                      help="the model server, run with --detect classmix --escalate labels "
                           "--trust-client-header --detect-allow ALLOWED: every stream is "
                           "one principal (x-client-id) and --victim is not used")
    live.add_argument("--model", default="mnist", help="the protected model (default mnist)")
    live.add_argument("--baseline-model", default="mnist-open",
                      help="the unprotected model that scores the thieves (default mnist-open)")
    live.add_argument("--allowed", default="detect-eval-allowed",
                      help="a principal on the server's --detect-allow: scores, waits for the "
                           "stack, and runs the Jacobian thief without detection")
    live.add_argument("--batch-size", type=positive, default=10,
                      help="queries per call (the resolution of queries to detection)")
    live.add_argument("--wait", type=float, default=600.0,
                      help="seconds to wait for the protected model to answer (default 600)")
    live.add_argument("--timeout", type=float, default=30.0,
                      help="seconds to connect and per call (default 30)")
    return parser


def _setup_torch(threads: int) -> None:
    import torch

    # More threads than free cores makes CPU training far slower: --torch-threads.
    torch.set_num_threads(threads)


def _meta(args, started: float) -> dict:
    import torch

    return {"command": "stealguard-attack " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "seconds": round(time.perf_counter() - started, 1),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def cmd_experiment(args) -> int:
    from stealguard.attacks import experiment, report
    from stealguard.attacks.metrics import accuracy
    from stealguard.attacks.training import predict
    from stealguard.modelserver.datasets import load_dataset

    started = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(args.dataset, seed=args.seed)
    model, info = experiment.base_model(args.dataset, seed=args.seed, log=log)
    profile = experiment.profile_for(ds, args.quick)
    records, calibration = experiment.run_experiment(ds, model, profile, args.seed, log=log)
    base_test = predict(model, ds.test_x)
    meta = {
        **_meta(args, started),
        "dataset": args.dataset,
        "profile": "quick" if args.quick else "full",
        "seed": args.seed,
        "base": {**info, "accuracy": accuracy(base_test, ds.test_y),
                 "mean_top_probability": float(base_test.max(1).mean())},
        "split": {"base": len(ds.base_x), "attacker": len(ds.attacker_x),
                  "test": len(ds.test_x)},
        "attacker_architecture": profile.architecture,
        "attacker_temperature": profile.train.temperature,
        "table_budget": profile.table_budget,
        "strategy_budget": profile.strategy_budget,
        "inversion_pairs": profile.inversion_pairs,
        "calibration": calibration,
        "targets": report.check_targets(records),
    }
    experiment.save_results(args.out / "results.json", meta, records)
    (args.out / "report.md").write_text(report.render({"meta": meta, "runs": records}))
    report.plot_agreement(records, args.out / "fig4_agreement.png", f"{args.dataset}")
    report.plot_reverse_sigmoid(calibration["beta"], calibration["gamma"],
                                args.out / "fig1_reverse_sigmoid.png")
    for t in meta["targets"]:
        status = {True: "met", False: "NOT MET", None: "undetermined"}[t["met"]]
        print(f"[{status}] {t['target']}: {t['measured']}")
    print(f"wrote {args.out}/results.json, report.md, fig4_agreement.png, "
          f"fig1_reverse_sigmoid.png ({meta['seconds']:.0f} s)")
    return 0


def cmd_contract(args) -> int:
    from stealguard.attacks import contract
    from stealguard.modelserver.datasets import load_dataset

    started = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    ds = load_dataset(args.dataset, seed=args.seed)
    profile = contract.QUICK if args.quick else contract.FULL
    if args.seeds is not None:
        profile = dataclasses.replace(profile, seeds=tuple(args.seeds))
    unknown = sorted(set(args.budgets or ()) - set(profile.budgets))
    if unknown:
        raise UsageError(f"--budgets: {unknown[0]} is not a budget of this profile "
                         f"({', '.join(map(str, profile.budgets))})")
    try:
        model, info = contract.victim_model(args.dataset, args.out, seed=args.seed, log=log)
        if not args.render_only:
            contract.run_contract(ds, model, args.out, profile, args.budgets,
                                  frontier=not args.no_frontier, log=log)
    except contract.VictimMismatch as e:
        raise UsageError(f"--out: {e}") from None
    meta = {**_meta(args, started), "dataset": args.dataset, "base": info,
            "profile": "quick" if args.quick else "full"}
    if args.render_only:  # the report still says which run made its runs
        import json

        try:
            made = json.loads((args.out / "contract.json").read_text())["meta"]["command"]
            meta["command"], meta["rendered_by"] = made, meta["command"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    summary = contract.render(args.out, meta)
    print(summary)
    return 0


def cmd_calibrate(args) -> int:
    if args.from_contract is not None:
        return _calibrate_from_contract(args)
    if args.tolerance is not None:
        raise UsageError("--tolerance: only with --from-contract")
    from stealguard.attacks import experiment
    from stealguard.attacks.calibrate import calibrate, policy_yaml
    from stealguard.modelserver.datasets import load_dataset

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    ds = load_dataset(args.dataset, seed=args.seed)
    name = args.model or args.dataset
    if args.model_store is not None:
        model = _model_from_store(args.model_store, name, ds)
    else:
        model, _ = experiment.base_model(args.dataset, seed=args.seed, log=log)
    profile = experiment.profile_for(ds, args.quick)
    budget = args.budget[-1] if args.budget else profile.calibration_budget
    exp = experiment.Experiment(ds, model, profile, args.seed)
    log(f"calibrating {name}: Sample at budget {budget}, "
        f"beta {args.beta or list(profile.betas)} x gamma {args.gamma or list(profile.gammas)}")
    result = calibrate(exp, args.beta or profile.betas, args.gamma or profile.gammas, budget)
    for g in result["grid"]:
        log(f"  beta {g['beta']:g} gamma {g['gamma']:g}: agreement {g['agreement']:.3f} "
            f"(drop {g['drop']:+.3f}), cosine {g['cosine']:.3f}")
    log(f"chosen: {result['reason']}")
    print(f"# stealguard-attack calibrate: Sample budget {budget}, undefended agreement "
          f"{result['baseline_agreement']:.3f}, drop >= {result['min_drop']:.2f} "
          f"{'met' if result['met'] else 'NOT met'}")
    print(policy_yaml(name, result["beta"], result["gamma"]), end="")
    return 0


def _calibrate_from_contract(args) -> int:
    import json

    from stealguard.attacks.calibrate import (
        FRONTIER_TOLERANCE,
        FrontierError,
        beaten_at_depth,
        choose_from_frontier,
        config_policy_yaml,
    )

    grid = [f for f in ("beta", "gamma", "budget", "model_store") if getattr(args, f)]
    if grid:
        raise UsageError(f"--{grid[0].replace('_', '-')}: not with --from-contract (the "
                         "frontier was measured by `stealguard-attack contract`)")
    tolerance = FRONTIER_TOLERANCE if args.tolerance is None else args.tolerance
    if not 0 <= tolerance < 1:  # also refuses nan
        raise UsageError(f"--tolerance: must be a number in [0, 1), not {args.tolerance}")
    path = args.from_contract / "contract.json"
    try:
        report = json.loads(path.read_text())
        rows = report["frontier"]
    except FileNotFoundError:
        raise UsageError(f"--from-contract: no {path} (run `stealguard-attack contract "
                         f"--out {args.from_contract}` first)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--from-contract: {path} is not a contract report ({e})") from None
    try:
        choice = choose_from_frontier(rows, tolerance, report.get("label_floor"),
                                      beaten_at_depth(report))
    except FrontierError as e:
        raise UsageError(f"--from-contract: {e}") from None
    if choice["config"] is None:
        raise UsageError(f"--from-contract: {choice['defense']} is not a defense this version "
                         "ships; re-run `stealguard-attack contract`")
    name = args.model or report.get("meta", {}).get("dataset") or args.dataset
    print(f"# stealguard-attack calibrate --from-contract {args.from_contract}: "
          f"{choice['reason']}")
    print(config_policy_yaml(name, choice["config"]), end="")
    return 0


def _model_from_store(store: Path, name: str, ds):
    import torch
    from stealguard.modelserver.architectures import build_model
    from stealguard.modelserver.store import ManifestError, read_manifest

    path = store / f"{name}.yaml"
    if not path.exists():
        raise UsageError(f"--model: no model {name!r} in the model store {store} "
                         f"(no {path.name})")
    try:
        spec = read_manifest(path)
    except ManifestError as e:
        raise UsageError(f"--model-store: {e}") from None
    if tuple(spec.input_shape) != tuple(ds.input_shape):
        raise UsageError(f"--dataset: model {name!r} takes input {list(spec.input_shape)}, "
                         f"dataset {ds.name} has {list(ds.input_shape)}")
    if spec.architecture == "torchscript":
        return torch.jit.load(str(spec.weights)).eval()
    model = build_model(spec.architecture, spec.input_shape, len(spec.labels))
    model.load_state_dict(torch.load(spec.weights, weights_only=True))
    return model.eval()


def cmd_run(args) -> int:
    from stealguard.attacks import remote

    started = time.perf_counter()
    strategies = [s for group in (args.strategy or [["sample"]]) for s in group]
    if "same-layer" in strategies and (args.beta is None or args.gamma is None):
        raise UsageError("--strategy same-layer needs --beta and --gamma (the defense's)")
    from stealguard.modelserver.architectures import ARCHITECTURE_NAMES

    if args.architecture not in ARCHITECTURE_NAMES:
        raise UsageError(f"--architecture: unknown {args.architecture!r}; choose one of "
                         f"{', '.join(ARCHITECTURE_NAMES)}")
    aware = sorted(set(strategies) & set(KNOWS_THE_DEFENSE))
    if aware and not args.policies_from:
        raise UsageError(f"--strategy {aware[0]} knows the defense: give --policies-from "
                         "HOST:PORT (the sidecar whose ListPolicies publishes it)")
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    published = (remote.published_policies(args.policies_from, args.model,
                                           dict(args.policy), timeout=args.timeout)
                 if args.policies_from else None)
    result = remote.run_remote(
        target=args.target, models=args.model, strategies=strategies, budgets=args.budget,
        baseline_model=args.baseline_model, dataset=args.dataset,
        architecture=args.architecture, beta=args.beta, gamma=args.gamma,
        timeout=args.timeout, quick=args.quick, seed=args.seed, published=published, log=log)
    result["meta"] = _meta(args, started)
    remote.write_outputs(result, args.out)
    print(remote.render_table(result))
    print(f"wrote {args.out}/report.json, report.md, agreement.png")
    return 0


def cmd_detect(args) -> int:
    import json

    from stealguard.attacks import detection
    from stealguard.attacks.contract import victim_model
    from stealguard.attacks.experiment import IMAGE_QUICK
    from stealguard.modelserver.datasets import load_dataset

    started = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    if args.target:
        return _detect_live(args, started, log)
    if not (args.victim / "victim.pt").exists():
        raise UsageError(f"--victim: no victim.pt in {args.victim} (the committed MNIST "
                         "victim is attacks/results/mnist)")
    ds = load_dataset("mnist", seed=args.seed)
    model, info = victim_model("mnist", args.victim, seed=args.seed, log=log)
    plan = detection.Plan(budget=args.budget, clients=args.clients, seed=args.seed,
                          attacks=tuple(args.attacks or detection.ATTACKS))
    if args.quick:
        plan = dataclasses.replace(plan, train=IMAGE_QUICK.train)
    result = detection.evaluate(ds, model, plan, log=log)
    meta = {**_meta(args, started), "victim": info.get("victim_weights", info["weights"]),
            "budget": plan.budget,
            "clients": plan.clients, "profile": "quick" if args.quick else "full"}
    args.out.mkdir(parents=True, exist_ok=True)
    saved = detection.to_json(result, meta)
    (args.out / "results.json").write_text(json.dumps(saved, indent=1) + "\n")
    (args.out / "report.md").write_text(detection.render(saved, meta))
    detection.plot(saved, args.out / "detection_w.png")
    for row in saved["attacks"]:
        print(f"{row['attack']}: {detection.detected_text(row)}")
    benign = saved["benign"]
    print(f"benign: {benign['alarmed_clients']}/{benign['clients']} clients alarmed, "
          f"{benign['alarms']} alarms over {benign['queries']} queries (delta "
          f"{saved['delta']:.2f})")
    print(f"wrote {args.out}/results.json, report.md, detection_w.png ({meta['seconds']:.0f} s)")
    return 0


def cmd_calibrate_detector(args) -> int:
    import numpy as np
    from stealguard.attacks.detection import calibrate_class_mix

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    if args.answers is not None:
        try:
            answers = np.load(args.answers, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise UsageError(f"--answers: cannot read {args.answers} as .npy ({error})") from None
        if answers.ndim == 2 and answers.dtype.kind == "f" and answers.shape[1] >= 1:
            classes = max(answers.shape[1], 2)
            seen = (answers[:, 0] >= 0.5).astype(np.int64) if answers.shape[1] == 1 \
                else answers.argmax(axis=1)
        elif answers.ndim == 1 and answers.dtype.kind in "iu" and len(answers):
            seen = answers.astype(np.int64)
            classes = args.classes or int(seen.max()) + 1
        else:
            raise UsageError(f"--answers: expected class indices (N,) or probability rows "
                             f"(N, K), got shape {list(answers.shape)} of {answers.dtype}")
        source = str(args.answers)
    else:
        from stealguard.attacks import experiment
        from stealguard.attacks.training import predict
        from stealguard.modelserver.datasets import load_dataset

        ds = load_dataset(args.dataset, seed=args.seed)
        model, _ = experiment.base_model(args.dataset, seed=args.seed, log=log)
        seen = predict(model, ds.base_x).argmax(axis=1)
        classes = ds.num_classes
        source = f"the {args.dataset} base model on its {len(ds.base_x)} owner training images"
    try:
        result = calibrate_class_mix(seen, max(classes, 2), args.clients, args.per_client,
                                     args.seed)
    except ValueError as error:
        raise UsageError(f"--answers: {error}") from None
    log(f"{result['answers']} answers from {source}; {result['clients']} clients x "
        f"{result['per_client']} in random order reach G {result['max_g']:.2f} at most")
    print(f"# stealguard-attack calibrate-detector: {result['answers']} answers, "
          f"{result['clients']} clients x {result['per_client']}, largest G "
          f"{result['max_g']:.2f}")
    print("detect: classmix")
    print(f"detect_threshold: {result['threshold']:g}")
    print("detect_prior: [" + ", ".join(f"{v:g}" for v in result["prior"]) + "]")
    return 0


def _detect_live(args, started: float, log) -> int:
    import json

    from stealguard.attacks import detection
    from stealguard.attacks.detection_live import Live, evaluate_live, render_live
    from stealguard.attacks.experiment import IMAGE_QUICK
    from stealguard.modelserver.datasets import load_dataset

    if not args.wait >= 0:
        raise UsageError(f"--wait: must be 0 or more seconds, got {args.wait}")
    if not 0 < args.timeout < float("inf"):
        raise UsageError(f"--timeout: must be a positive number of seconds, got {args.timeout}")
    plan = detection.Plan(budget=args.budget, clients=args.clients, seed=args.seed,
                          attacks=tuple(args.attacks or detection.ATTACKS))
    if args.quick:
        plan = dataclasses.replace(plan, train=IMAGE_QUICK.train)
    live = Live(args.target, args.model, args.baseline_model, args.allowed, args.batch_size,
                timeout=args.timeout, wait=args.wait)
    result = evaluate_live(load_dataset("mnist", seed=args.seed), live, plan, log=log)
    meta = {**_meta(args, started), "budget": plan.budget, "clients": plan.clients,
            "profile": "quick" if args.quick else "full"}
    result["meta"] = meta
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "report.md").write_text(render_live(result, meta))
    for row in result["attacks"]:
        print(f"{row['attack']}: " + (f"labels from query {row['labels_from']}"
                                      if row["labels_from"] else "not detected")
              + f", agreement {row['agreement']:.3f}")
    for row in result["without_detection"]:
        print(f"{row['attack']} without detection: agreement {row['agreement']:.3f}")
    benign = result["benign"]
    print(f"benign: {benign['alarmed_clients']}/{len(benign['clients'])} clients answered "
          f"labels only over {benign['queries']} queries")
    print(f"wrote {args.out}/results.json, report.md ({meta['seconds']:.0f} s)")
    return 0


COMMANDS = {"experiment": cmd_experiment, "contract": cmd_contract, "calibrate": cmd_calibrate,
            "run": cmd_run, "detect": cmd_detect,
            "calibrate-detector": cmd_calibrate_detector}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `stealguard-attack`; returns the exit status."""
    from stealguard.attacks.oracles import BudgetExceeded, OracleError

    try:
        args = build_parser().parse_args(argv)
        _setup_torch(args.torch_threads)
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"stealguard-attack: error: {e}", file=sys.stderr)
        return 2
    except (OracleError, BudgetExceeded, ValueError, OSError) as e:
        print(f"stealguard-attack: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stealguard-attack: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
