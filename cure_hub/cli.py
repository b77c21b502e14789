"""The ``cure-hub`` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import logging
import os
import shlex
import sys
from pathlib import Path

from .arguments import ArgumentParser, key_value, number
from .config import BATCH_NORM_BATCHES, WEIGHT_CHOICES, InputError
from .console import exit_code_of, setup_logging
from .evaluation import ATTACKS
from .importers import LAYOUTS
from .run_folder import RunFolder, file_in_the_way


def _models(args: argparse.Namespace) -> int:
    from .model_configs import describe_model_name, known_model_names

    names = [n for n in known_model_names() if fnmatch.fnmatch(n, args.pattern)]
    try:
        if not names:
            print(f"no model matches {args.pattern!r}", flush=True)
        for name in names:  # one line at a time: counting parameters takes a moment a name
            print(name if args.names_only else describe_model_name(name), flush=True)
    except BrokenPipeError:  # the reader stopped early (`cure-hub models | head`): Python's documented remedy
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0 if names else 1


def _train(train_args: list[str]) -> int:
    from .train import main as train_main

    return train_main(train_args, prog="cure-hub train")


def _epsilon(text: str) -> float:
    """``8/255`` or ``0.0314``."""
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"epsilon must be > 0, got {text!r}")
    return value


def _eval(args: argparse.Namespace) -> int:
    from .sharded_eval import process_state

    processes = process_state()
    try:
        return _evaluate(args, processes)
    finally:  # as Accelerator.end_training: a gloo group left to the interpreter's exit can abort it
        processes.destroy_process_group()


def _evaluate(args: argparse.Namespace, processes) -> int:
    import json

    from .config import DataConfig
    from .corruptions import CorruptedCopy, GeneratedCorruptions, parse_corruptions, parse_severities
    from .data import collate, load_eval_split
    from .evaluation import EvaluationSuite, check_model_fits_data
    from .models import create_model, load_robust_model
    from .plots import write_plots
    from .sharded_eval import EvaluationState, run_evaluation, state_folder_for, weights_digest
    from .system import disk_space_for

    if not processes.is_main_process:  # one copy of every log line
        logging.getLogger("cure_hub").setLevel(logging.ERROR)
    corruptions = parse_corruptions(args.corruptions) if args.corruptions else ()
    suite = EvaluationSuite(tuple(args.attacks.split(",")), args.epsilon, args.norm, args.eps_sweep, seed=args.seed,
                            corruptions=corruptions, severities=parse_severities(args.severities))
    if args.plots and not args.output:
        raise InputError("--plots draws from the results file: pass --output FILE.json too")
    if args.resume and not args.output:
        raise InputError("--resume continues the evaluation that writes --output FILE: pass its --output")
    if args.output:  # before the evaluation, not after it
        check_results_file(args.output)
    if args.propose_to_card:  # a token that cannot open the pull request stops the command before the evaluation
        check_proposal(args)
    model = None if args.checkpoint else load_robust_model(args.model, weights=args.weights)  # first: it has its crop
    data_config = DataConfig(dataset=args.dataset, eval_split=args.split, eval_split_fraction=args.eval_split_fraction,
                             image_column=args.image_column, label_column=args.label_column, image_size=args.image_size,
                             crop_pct=args.crop_pct or (model.spec.crop_pct if model else None), subset_seed=args.seed)
    dataset, split, class_names, split_size, split_indices = load_eval_split(data_config, args.n_examples)
    if args.propose_to_card:  # a card that holds results of this protocol refuses them before the evaluation
        from .proposals import check_protocols_free

        planned = {"dataset": args.dataset, "split": split, "n_examples": len(dataset), "split_examples": split_size,
                   "norm": args.norm, "epsilon": args.epsilon, "accuracy": dict.fromkeys(("clean", *suite.robust_attacks), 0.0)}
        check_protocols_free(args.model, planned, args.overwrite_results)
    corrupted_copy = None
    if corruptions:
        corrupted_copy = (CorruptedCopy(args.corruptions_dataset, corruptions, suite.severities, split_size)
                          if args.corruptions_dataset else GeneratedCorruptions(corruptions, suite.severities, args.seed))
        logging.getLogger("cure_hub").info("corrupted images: %s", corrupted_copy.source)
    image_size = dataset[0]["image"].shape[-1]
    if args.checkpoint:
        model = create_model(args.model, num_classes=len(class_names), image_size=image_size,
                             checkpoint=args.checkpoint, **dict(args.model_kwargs or []))
    data_warnings = check_model_fits_data(model.spec, image_size, class_names, args.other_classes)
    if args.channels_last:
        model.to_channels_last()
    device = args.device or processes.device
    logger = logging.getLogger("cure_hub")
    logger.info("evaluating %s on %d examples of %s/%s with %s at eps %.5f (%s)%s%s", args.model, len(dataset),
                args.dataset, split, ", ".join(suite.attacks), args.epsilon, args.norm,
                f", {processes.num_processes} processes" if processes.num_processes > 1 else "",
                ", channels-last" if model.channels_last else "")
    if any(ATTACKS[a].autoattack_version for a in suite.attacks) and str(device) == "cpu":
        logger.info("AutoAttack on a CPU takes seconds per example: %d examples will be attacked", len(dataset))
    identity = {
        "model": args.model,
        # Which weights of a training run were evaluated: export --eval-results refuses others.
        "weights": args.weights if RunFolder(args.model).is_run() else None,
        "dataset": args.dataset,
        "split": split,
        "split_examples": split_size,
        "corruptions_source": corrupted_copy.source if corrupted_copy else None,
    }
    state = None
    if args.output:
        fingerprint = {**identity, "weights_sha256": weights_digest(model), "n_examples": len(dataset),
                       "subset_seed": args.seed, "image_size": image_size, "crop_pct": data_config.crop_pct, "batch_size": args.batch_size,
                       "channels_last": args.channels_last,
                       **dataclasses.asdict(suite)}
        state = EvaluationState(state_folder_for(args.output), fingerprint)
    # A full disk costs nothing evaluated: the batches recorded so far are kept for --resume.
    with disk_space_for(Path(args.output).parent, f"the results {args.output}", then="run the command again with --resume") \
            if args.output else contextlib.nullcontext():
        results = {**identity, **run_evaluation(model, dataset, suite, args.batch_size, collate, device=device,
                                                state=state, resume=args.resume, corrupted_copy=corrupted_copy,
                                                split_indices=split_indices)}
        results["warnings"] = data_warnings + results["warnings"]
        results["unreliable"] = bool(results["warnings"])
        if not processes.is_main_process:
            return 0
        print(format_results_table(results))
        if args.output:
            output = Path(args.output)
            temporary = output.with_name(f".{output.name}.tmp")
            temporary.write_text(json.dumps(results, indent=2))
            os.replace(temporary, output)  # a results file is whole or absent
        if args.propose_to_card:
            from .proposals import propose_results_to_card

            url = propose_results_to_card(args.model, results, reproduce_command(args), overwrite=args.overwrite_results)
            print(f"proposed the results to the card of {args.model}: {url}")
    if args.output:
        state.remove()
        if args.plots:
            for path in write_plots([args.output], args.plots):
                print(f"wrote {path}")
    return 0


def check_proposal(args: argparse.Namespace) -> None:
    """``--propose-to-card`` needs a Hub model and a token that may open a pull request on it."""
    from .hub import check_push_access
    from .hub_results import looks_like_hub_id

    if args.checkpoint or args.weights != "last" or not looks_like_hub_id(args.model):
        raise InputError(f"--propose-to-card proposes results to a Hub model's card: {args.model!r} is no Hub model id "
                         "(owner/name) evaluated as it is (without --checkpoint or --weights)")
    check_push_access(args.model)


def reproduce_command(args: argparse.Namespace) -> str:
    """The ``cure-hub eval`` command that measures the same results."""
    from .hub_results import ThreatModel

    options = {"--dataset": args.dataset, "--split": args.split, "--attacks": args.attacks, "--norm": args.norm,
               "--epsilon": ThreatModel(args.norm, args.epsilon).epsilon_text, "--n-examples": args.n_examples,
               "--image-size": args.image_size, "--crop-pct": args.crop_pct, "--seed": args.seed}
    return shlex.join(["cure-hub", "eval", args.model, *_flags(options)])


def check_results_file(output: str) -> None:
    """``output`` can become the results file: it is no folder, and no file stands where its folder
    is to be (which is made if missing)."""
    if Path(output).is_dir():
        raise InputError(f"--output {output!r} is a folder: name the results file, e.g. {str(Path(output) / 'results.json')!r}")
    if file := file_in_the_way(Path(output).parent):
        raise InputError(f"--output {output!r} lies under {str(file)!r}, which is a file: choose another --output")
    Path(output).parent.mkdir(parents=True, exist_ok=True)


def format_results_table(results: dict) -> str:
    rows = [("attack", "accuracy")] + [(name, f"{value:.4f}") for name, value in results["accuracy"].items()]
    if results.get("worst_case") is not None:
        rows.append(("worst case", f"{results['worst_case']:.4f}"))
    rows += [(f"NRR ({name})", f"{value:.4f}") for name, value in results["nrr"].items()]
    rows += [(f"PGD-20 @ {eps}", f"{value:.4f}") for eps, value in results["eps_sweep"].items()]
    rows += [(name, f"{value:.4f}") for name, value in results.get("corruptions", {}).items()]
    if results.get("corruption_mean") is not None:
        rows.append(("corruptions (mean)", f"{results['corruption_mean']:.4f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{results['n_examples']} examples, {results['norm']} eps {results['epsilon']:.5f}"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    lines += [f"WARNING: {w}" for w in results["warnings"]]
    return "\n".join(lines)


def _tradeoff(args: argparse.Namespace) -> int:
    import json

    import torch
    from torch.utils.data import DataLoader

    from .config import DataConfig
    from .data import collate, load_eval_split
    from .evaluation import parse_attacks
    from .interpolation import TRADEOFF_FILE, tradeoff_curve
    from .plots import plot_interpolation

    run, folder = Path(args.run_dir), RunFolder(args.run_dir)
    if not folder.holds_run():
        raise FileNotFoundError(f"{run} is not a training run folder (no config.yaml)")
    trained = folder.read_config()
    data_config = DataConfig(dataset=args.dataset or trained["data"]["dataset"], eval_split=args.split,
                             image_size=trained["data"].get("image_size"), subset_seed=args.seed)
    examples, split, _, split_size, _ = load_eval_split(data_config, args.n_examples)
    batches = DataLoader(examples, batch_size=args.batch_size, collate_fn=collate)
    curve = tradeoff_curve(run, args.weights, args.points, batches, parse_attacks(args.attacks),
                           epsilon=args.epsilon or trained["attack"]["epsilon"], norm=args.norm or trained["attack"]["norm"],
                           device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                           bn_batches=args.bn_batches, seed=args.seed)
    curve.update(dataset=data_config.dataset, split=split, split_examples=split_size)
    output = Path(args.output_dir or run / "tradeoff")
    output.mkdir(parents=True, exist_ok=True)
    (output / TRADEOFF_FILE).write_text(json.dumps(curve, indent=2))
    robust = curve["nrr_attack"]
    print(f"θ(λ) = (1 - λ)·start + λ·{args.weights}, {curve['n_examples']} examples; batch norm: {curve['batch_norm']}")
    print(f"{'λ':>5}  {'clean':>6}  {robust:>6}  {'NRR':>6}")
    for row in curve["points"]:
        best = "  <- best NRR" if row["lambda"] == curve["best_lambda"] else ""
        print(f"{row['lambda']:>5.2f}  {row['accuracy']['clean']:.4f}  {row['accuracy'][robust]:.4f}  {row['nrr']:.4f}{best}")
    print(f"wrote {output / TRADEOFF_FILE} and {plot_interpolation(output / TRADEOFF_FILE, output / 'tradeoff.png')}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .plots import write_plots

    written = write_plots(args.inputs, args.output_dir)
    for path in written:
        print(f"wrote {path}")
    return 0 if written else 1


def _export(args: argparse.Namespace) -> int:
    from .hub import export_run

    out = export_run(args.run_dir, args.out_dir, weights=args.weights, eval_results=args.eval_results,
                     overwrite=args.overwrite, repo_id=args.repo_id, interpolate=args.interpolate)
    what = f"{args.weights} weights" if args.interpolate is None else f"θ(λ = {args.interpolate:g}) towards its {args.weights} weights"
    print(f"exported {args.run_dir} ({what}) to {out}")
    return 0


def _card(args: argparse.Namespace) -> int:
    from .hub import rerender_card
    from .importers import is_import, rerender_import_card
    from .models import read_json

    if is_import(args.dir):
        card = rerender_import_card(args.dir, read_json(Path(args.eval_results)) if args.eval_results else None, args.repo_id)
    else:
        card = rerender_card(args.dir, args.eval_results, args.repo_id)
    print(f"wrote {card}")
    return 0


def _import(args: argparse.Namespace) -> int:
    import json

    from .importers import ImportSettings, import_checkpoint, model_dataset, rerender_import_card, threat_model_of

    settings = ImportSettings(
        checkpoint=args.checkpoint, layout=args.layout, model=args.model, model_kwargs=dict(args.model_kwargs or []),
        model_info=args.model_info, dataset=args.dataset, mean=args.mean, std=args.std, norm=args.norm, epsilon=args.epsilon,
        reported=dict(args.reported or []), reported_by=args.reported_by, reported_url=args.reported_url, license=args.license)
    threat_model = threat_model_of(settings)
    if args.evaluate and threat_model is None:  # before the import, not after it
        raise InputError("--evaluate measures under the threat model of the reported numbers: pass --norm and --epsilon")
    out = import_checkpoint(settings, args.out_dir, overwrite=args.overwrite, repo_id=args.repo_id, command=import_command(args))
    print(f"imported {args.checkpoint} ({args.layout} layout) to {out}")
    if not args.evaluate:
        return 0
    dataset = model_dataset(settings)
    results_file = out.parent / f".{out.name}.evaluation.json"
    options = {"--dataset": dataset, "--split": args.split, "--attacks": args.attacks, "--norm": threat_model.norm,
               "--epsilon": str(threat_model.epsilon), "--n-examples": args.n_examples, "--batch-size": args.batch_size,
               "--device": args.device, "--seed": args.seed, "--output": str(results_file)}
    evaluation = build_parser().parse_args(["eval", str(out), *_flags(options)])
    if evaluation.run(evaluation) == 0:
        print(f"wrote {rerender_import_card(out, json.loads(results_file.read_text()), args.repo_id)}")
        results_file.unlink()
    return 0


def import_command(args: argparse.Namespace) -> str:
    """The ``cure-hub import`` command as the card gives it: files and folders by their names."""
    from .hub import without_local_paths
    from .hub_results import ThreatModel

    options = {"--layout": args.layout, "--model": args.model, "--model-info": args.model_info and Path(args.model_info).name,
               "--dataset": args.dataset and without_local_paths(args.dataset), "--norm": args.norm,
               "--epsilon": args.epsilon and ThreatModel(args.norm or "linf", args.epsilon).epsilon_text,
               "--mean": args.mean and ",".join(map(str, args.mean)), "--std": args.std and ",".join(map(str, args.std)),
               "--reported": args.reported and ",".join(f"{k}={v}" for k, v in args.reported),
               "--reported-by": args.reported_by, "--reported-url": args.reported_url}
    kwargs = [f"{key}={value}" for key, value in args.model_kwargs or []]
    return shlex.join(["cure-hub", "import", Path(args.checkpoint).name, Path(args.out_dir).name, *_flags(options),
                       *(["--model-kwargs", *kwargs] if kwargs else [])])


def _flags(options: dict) -> list[str]:
    """``--flag value`` for each of ``options`` that has a value."""
    return [str(part) for option, value in options.items() if value is not None for part in (option, value)]


def _push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    url = push_to_hub(args.dir, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
                      commit_message=args.commit_message, force=args.force)
    print(f"pushed {args.dir} to {args.repo_id}: {url}")
    return 0


def _numbers(text: str) -> tuple[float, ...]:
    """``0.4914,0.4822,0.4465``: one number per channel."""
    return tuple(number(part) for part in text.split(","))


def _accuracies(text: str) -> list[tuple[str, float]]:
    """``clean=0.8492,aa=0.5308``: accuracies by attack."""
    pairs = [key_value(part) for part in text.split(",")]
    if bad := [key for key, value in pairs if not isinstance(value, (int, float))]:
        raise argparse.ArgumentTypeError(f"accuracies are numbers: {bad} are not")
    return [(key, float(value)) for key, value in pairs]


def _add_measurement_arguments(parser: argparse.ArgumentParser) -> None:
    """What an evaluation measures, and where: the flags ``eval`` and ``import --evaluate`` share."""
    parser.add_argument("--split", help="Split to evaluate (default: test, else validation).")
    parser.add_argument("--attacks", default="clean,pgd20,pgd100,cw", help="Comma-separated: " + ", ".join(ATTACKS) + ".")
    parser.add_argument("--n-examples", type=int, help="A deterministic, class-balanced subset of this many examples.")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available).")
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="cure-hub",
        description="Adversarially robust fine-tuning (CURE) for timm and Hugging Face vision models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser)
    # Listed here for --help only: main() hands everything after "train" to cure_hub/train.py.
    commands.add_parser("train", help="Train a robust model (the flags of cure_hub/train.py; see cure-hub train --help).", add_help=False)
    evaluate = commands.add_parser("eval", help="Evaluate robustness: clean, PGD-20/100, C&W, AutoAttack, NRR.",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    evaluate.add_argument("model", help="Run folder, export folder, Hub id, or an architecture with --checkpoint.")
    evaluate.add_argument("--checkpoint", help="State dict for an architecture name (e.g. a CIFAR ResNet checkpoint).")
    evaluate.add_argument("--model-kwargs", nargs="+", type=key_value, metavar="KEY=VALUE", help="Constructor arguments with --checkpoint.")
    evaluate.add_argument("--weights", default="last", choices=list(WEIGHT_CHOICES), help="Which weights of a run folder.")
    evaluate.add_argument("--dataset", default="uoft-cs/cifar10", help="Dataset id, folder or packaged name.")
    _add_measurement_arguments(evaluate)
    evaluate.add_argument("--eval-split-fraction", type=number, metavar="FRACTION",
                          help="Evaluate on the part of the train split that training held out with the same fraction and seed.")
    evaluate.add_argument("--image-column")
    evaluate.add_argument("--label-column")
    evaluate.add_argument("--image-size", type=int, help="Resize images to this size.")
    evaluate.add_argument("--crop-pct", type=float,
                          help="Centre crop of images larger than the image size (timm's crop_pct; default: the model's own, "
                               "recorded by its training run or timm config; 1.0 for --checkpoint).")
    evaluate.add_argument("--epsilon", type=_epsilon, default=8 / 255, help="Radius, e.g. 8/255 (default) or 0.5.")
    evaluate.add_argument("--norm", default="linf", choices=("linf", "l2"))
    evaluate.add_argument("--eps-sweep", action="store_true", help="PGD-20 accuracy at eps 0.25 ... 8/255.")
    evaluate.add_argument("--corruptions", metavar="all|NAME,...", help="Accuracy under natural corruptions (CIFAR-10-C's 15).")
    evaluate.add_argument("--severities", default="3", help="Corruption severities: 3 (the paper's), 1,3,5 or all.")
    evaluate.add_argument("--corruptions-dataset", metavar="FOLDER_OR_HUB_ID",
                          help="A copy of the corrupted test set in its release layout (<corruption>.npy, labels.npy); "
                               "without it the corruptions are generated (ImageNet-C's parameters; cure-hub[corruptions]).")
    evaluate.add_argument("--channels-last", action="store_true",
                          help="Weights and images in the channels-last memory layout (faster convolutions on a CPU; "
                               "the same results up to float rounding).")
    evaluate.add_argument("--output", help="Write the results JSON here (and, until it is written, the finished batches to OUTPUT.partial/).")
    evaluate.add_argument("--resume", action="store_true", help="Continue the unfinished evaluation that writes --output.")
    evaluate.add_argument("--other-classes", action="store_true", help="Evaluate on data whose class names are not the "
                          "model's, comparing label indices (the results and the card carry the warning).")
    evaluate.add_argument("--plots", help="Write PNG plots of the results (with --output) to this folder.")
    evaluate.add_argument("--propose-to-card", action="store_true",
                          help="Open a pull request on the Hub model's repository that adds the results to its card's "
                               "model-index (docs/hub-results.md), or update the one opened before; needs a write token.")
    evaluate.add_argument("--overwrite-results", action="store_true",
                          help="With --propose-to-card: propose results in place of the card's own of the same protocol.")
    evaluate.set_defaults(run=_eval)
    plot = commands.add_parser("plot", help="Plots from results JSON files and training run folders.")
    plot.add_argument("inputs", nargs="+", help="results.json files (ε sweep, trade-off) and run folders (training curves).")
    plot.add_argument("--output-dir", required=True)
    plot.set_defaults(run=_plot)
    tradeoff = commands.add_parser("tradeoff", help="The clean/robust dial: evaluate θ(λ) between a run's start and its robust weights.",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tradeoff.add_argument("run_dir")
    tradeoff.add_argument("--weights", default="last", choices=[w for w in WEIGHT_CHOICES if w != "start"],
                          help="The robust end point (λ = 1).")
    tradeoff.add_argument("--points", type=int, default=11, help="Evenly spaced λ from 0 to 1.")
    tradeoff.add_argument("--dataset", help="Evaluation dataset (default: the run's).")
    tradeoff.add_argument("--split", help="Split to evaluate (default: test, else validation).")
    tradeoff.add_argument("--n-examples", type=int, default=500, help="A class-balanced subset, the same at every λ.")
    tradeoff.add_argument("--attacks", default="clean,pgd20", help="Comma-separated, as for eval (aa is slow).")
    tradeoff.add_argument("--epsilon", type=_epsilon, help="Default: the run's training ε.")
    tradeoff.add_argument("--norm", choices=("linf", "l2"), help="Default: the run's.")
    tradeoff.add_argument("--bn-batches", type=int, default=BATCH_NORM_BATCHES,
                          help="Training batches to recompute batch-norm statistics on (default: %(default)s).")
    tradeoff.add_argument("--batch-size", type=int, default=128)
    tradeoff.add_argument("--device")
    tradeoff.add_argument("--seed", type=int, default=0)
    tradeoff.add_argument("--output-dir", help="Default: RUN/tradeoff (where export --interpolate looks).")
    tradeoff.set_defaults(run=_tradeoff)
    export = commands.add_parser("export", help="Export a training run as a Hub-ready folder with a model card.")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument("--weights", default="last", choices=list(WEIGHT_CHOICES))
    export.add_argument("--eval-results", help="A `cure-hub eval` results JSON for the card (default: the run's own evaluation).")
    export.add_argument("--repo-id", help="The Hub id the card's usage examples name.")
    export.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUT_DIR.")
    export.add_argument("--interpolate", type=number, metavar="LAMBDA",
                        help="Export θ(λ) = (1 - λ)·start + λ·WEIGHTS, a point of the run's `cure-hub tradeoff` curve.")
    export.set_defaults(run=_export)
    card = commands.add_parser("card", help="Re-render an export's model card (after a new evaluation).")
    card.add_argument("dir")
    card.add_argument("--eval-results", help="Replace the export's eval_results.json with this file first.")
    card.add_argument("--repo-id")
    card.set_defaults(run=_card)
    imports = commands.add_parser("import", help="Make a robust checkpoint from RobustBench, MadryLab, TRADES or CURE a "
                                  "Hub-ready export, its reported numbers attributed in the card.",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    imports.add_argument("checkpoint", help="The checkpoint file (.pt, .pth, .ckpt, .tar, .safetensors).")
    imports.add_argument("out_dir")
    imports.add_argument("--layout", required=True, choices=list(LAYOUTS), help="How the checkpoint was saved.")
    imports.add_argument("--model", help="Its architecture (a timm or cure-hub CIFAR name; the RobustBench entry's by default). "
                                         "Sizes are read off the checkpoint.")
    imports.add_argument("--model-kwargs", nargs="+", type=key_value, metavar="KEY=VALUE", help="Further constructor arguments.")
    imports.add_argument("--model-info", metavar="JSON", help="The model's RobustBench entry (model_info/DATASET/THREAT/NAME.json): "
                                                              "its numbers go into the card as RobustBench's.")
    imports.add_argument("--dataset", help="The dataset the model classifies (its class names; --evaluate evaluates on it); "
                                           "default: the RobustBench entry's.")
    imports.add_argument("--mean", type=_numbers, metavar="M,M,M", help="The normalisation inside the model, where the "
                         "checkpoint does not save it (default: the architecture's; raw [0, 1] pixels for the CIFAR ones).")
    imports.add_argument("--std", type=_numbers, metavar="S,S,S")
    imports.add_argument("--norm", choices=("linf", "l2"), help="The threat model of the reported numbers (RobustBench: its folder).")
    imports.add_argument("--epsilon", type=_epsilon, help="Their radius, e.g. 8/255.")
    imports.add_argument("--reported", type=_accuracies, metavar="ATTACK=ACC,...",
                         help="Accuracies someone else measured, as fractions by attack: clean=0.8492,aa=0.5308.")
    imports.add_argument("--reported-by", help="Who measured them: a paper, a leaderboard.")
    imports.add_argument("--reported-url", help="Where to read them.")
    imports.add_argument("--license", default="unknown", help="The weights' licence, as the Hub names licences.")
    imports.add_argument("--repo-id", help="The Hub id the card's usage examples name.")
    imports.add_argument("--overwrite", action="store_true", help="Replace an earlier export or import in OUT_DIR.")
    imports.add_argument("--evaluate", action="store_true", help="Measure the model again (cure-hub eval, with the flags "
                         "below) and put the results in the card beside the reported ones.")
    _add_measurement_arguments(imports)
    imports.set_defaults(run=_import)
    push = commands.add_parser("push", help="Upload an export folder to the Hugging Face Hub.")
    push.add_argument("dir")
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", help="Branch to push to.")
    push.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing to the branch.")
    push.add_argument("--commit-message")
    push.add_argument("--force", action="store_true", help="Push over a repository that holds another architecture.")
    push.set_defaults(run=_push)
    models = commands.add_parser("models", help="List the model names create_model accepts.")
    models.add_argument("pattern", nargs="?", default="*", help="Shell-style filter, e.g. 'vit_*'.")
    models.add_argument("--names-only", action="store_true",
                        help="Only the names (instant), without each one's library and parameter count.")
    models.set_defaults(run=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    setup_logging()
    if argv[:1] == ["train"]:  # not through argparse, whose REMAINDER drops a first argument that starts with "-"
        return exit_code_of("cure-hub train", lambda: _train(argv[1:]))
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's own parser, which knows the flags to suggest
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return exit_code_of(f"cure-hub {args.command}", lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
