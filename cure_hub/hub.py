"""Exporting and publishing robust checkpoints: the export folder, its model card and results, and
the push to the Hub. It builds no model: loading is :mod:`cure_hub.models`'.

Two published layouts, each readable by its own library without cure-hub:

* timm architectures (the CIFAR ones included): timm's Hub layout, ``config.json`` (architecture,
  num_classes, label_names, pretrained_cfg with input size, mean and std, model_args without
  num_classes) and ``model.safetensors`` with the bare timm model's keys. Loads with
  ``timm.create_model("hf-hub:owner/name", pretrained=True)`` and with transformers'
  ``AutoModelForImageClassification`` (through its timm wrapper).
* transformers architectures: ``save_pretrained``'s layout plus ``preprocessor_config.json``.

Beside the weights: ``README.md`` (the model card), ``eval_results.json``,
``training_config.json`` and ``robustbench.json``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from pathlib import Path

from .config import WEIGHT_CHOICES
from .evaluation import ATTACKS, INTERVAL_METHOD, NORM_NAMES, wilson_interval
from .hub_results import ThreatModel, eval_results, looks_like_hub_id
from .method_registry import METHOD_CLASSES
from .models import ExportError, ModelSpec, check_finite, load_robust_model, read_json, save_pretrained
from .plots import plot_layer_statistics, plot_training
from .run_folder import RunFolder
from .system import default_file_mode, disk_space_for, process_umask, readable_size


# --------------------------------------------------------------------------------------------
# Export

ATTACK_NAMES = {name: spec.title for name, spec in ATTACKS.items()}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("cure-hub", "torch", "timm", "transformers", "accelerate", "huggingface-hub", "datasets"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def _eval_results_from_run(run: Path, weights: str, config: dict) -> dict:
    """The run's own evaluation of these weights, in the shape of ``cure-hub eval``'s results."""
    folder = RunFolder(run)
    metadata = folder.weights_metadata(weights)
    accuracy = {("clean" if k == "eval/clean_acc" else k.removeprefix("eval/").removesuffix("_acc")): v
                for k, v in metadata.items() if k.startswith("eval/")}
    summary = folder.read_summary()
    return {
        "model": str(run),
        "dataset": config["data"]["dataset"],
        # The split the run evaluated on (held_out with --eval-split-fraction); runs before it was recorded: the config's.
        "split": summary.get("eval_split") or config["data"]["eval_split"] or "test",
        "n_examples": summary.get("eval_examples"),
        "norm": config["attack"]["norm"],
        "epsilon": config["attack"]["epsilon"],
        "accuracy": accuracy,
        "nrr": {},
        "eps_sweep": {},
        "warnings": [] if accuracy else [f"no evaluation of the {weights} weights was recorded during training"],
        "source": "evaluation during training",
    }


def robustbench_path(results: dict, name: str) -> str:
    """Where a RobustBench entry goes in its repository."""
    return f"model_info/{_robustbench_dataset(results['dataset'])}/{NORM_NAMES[results['norm']]}/{name}.json"


def _robustbench_dataset(dataset: str) -> str:
    return Path(dataset).name.split("/")[-1].lower()


def robustbench_entry(spec: ModelSpec, results: dict, config: dict) -> dict:
    """An entry in RobustBench's model-info format. ``autoattack_acc`` is left empty unless
    AutoAttack ran on the whole split (RobustBench's protocol); the footnote then gives the
    subset's figure with its sample size and interval."""
    accuracy = results["accuracy"]
    n, whole_split = results["n_examples"], results.get("split_examples")
    aa = accuracy.get("aa")

    def percent(value: float) -> str:
        return f"{100 * value:.2f}"

    def measured(name: str) -> str:
        low, high = results.get("intervals", {}).get(name) or wilson_interval(round(accuracy[name] * n), n)
        return f"{percent(accuracy[name])} % on {n} examples (95 % interval {percent(low)}-{percent(high)} %)"

    full_set = n is not None and n == whole_split
    if aa is None:
        footnote = "Not evaluated with AutoAttack: run `cure-hub eval ... --attacks clean,aa` and re-render the card."
    elif full_set:
        footnote = f"Evaluated by cure-hub: AutoAttack {measured('aa')}."
    else:
        footnote = (f"AutoAttack {measured('aa')} of the {whole_split or '?'} of the {results['split']} split: "
                    "not RobustBench's full set, so autoattack_acc is left empty.")
    if "clean" in accuracy and not full_set:
        footnote += f" Clean accuracy {measured('clean')}."
    return {
        "link": "",
        "name": f"{config['method']['method'].upper()} {spec.architecture}",
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": _robustbench_dataset(results["dataset"]),
        "venue": "",
        "architecture": spec.architecture,
        "eps": ThreatModel(results["norm"], results["epsilon"]).epsilon_text,
        "clean_acc": percent(accuracy["clean"]) if "clean" in accuracy else "",
        "reported": "",
        "autoattack_acc": percent(aa) if aa is not None and full_set else "",
        "footnote": footnote,
        "unreliable": bool(results.get("unreliable", False)),
    }


def model_card(folder: str | os.PathLike, repo_id: str | None = None, name: str | None = None):
    """Render the model card of an export folder from ``model_cards/robust_model.md``; its
    ``model-index`` follows docs/hub-results.md (:mod:`cure_hub.hub_results`)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    name = repo_id or name or folder.name
    training = read_json(folder / TRAINING_RECORD)
    results = read_json(folder / "eval_results.json")
    spec = ModelSpec.from_dict(training["model_spec"])
    config, summary = training["config"], training.get("summary", {})
    method = config["method"]["method"]
    threat_model = ThreatModel(results["norm"], results["epsilon"])
    dataset = results["dataset"]
    hub_dataset = dataset if looks_like_hub_id(dataset) else None
    base_model = base_model_of(spec)
    card_data = ModelCardData(
        library_name=spec.library,
        pipeline_tag="image-classification",
        license="apache-2.0",
        tags=list(dict.fromkeys(["adversarial-robustness", "cure", method.replace("_", "-"), spec.library, "image-classification"])),
        datasets=[hub_dataset] if hub_dataset else None,
        base_model=base_model,
        # The Hub lists the model under its base model as a fine-tune (its model tree).
        base_model_relation="finetune" if base_model else None,
        model_name=name,
        eval_results=eval_results(results),
    )
    method_class = METHOD_CLASSES[method]
    attack = config["attack"]
    optim = config["optim"]
    n = results["n_examples"] or 0
    return ModelCard.from_template(
        card_data,
        template_path=str(card_template()),
        model_name=name,
        # `cure-hub push` renders the card again with the real id
        usage=usage_section(spec, repo_id or f"<your-username>/{name}"),
        architecture_description=f"`{spec.architecture}` ({spec.library}, {spec.num_classes} classes)",
        method_title=method_class.title,
        method_settings=method_class.card_settings(config["method"]),
        dataset=dataset,
        split=results["split"],
        image_size=spec.image_size,
        mean=list(spec.mean), std=list(spec.std),
        weights=training["weights"], weights_description=WEIGHT_CHOICES[training["weights"]],
        n_examples=n, threat_model=str(threat_model), norm=results["norm"], epsilon_text=threat_model.epsilon_text,
        accuracy=results["accuracy"], nrr=results.get("nrr", {}), attack_names=ATTACK_NAMES,
        num_classes=spec.num_classes, near_chance=results["accuracy"].get("clean", 1.0) < 2 / spec.num_classes,
        attack_settings=f"ε = {ThreatModel(attack['norm'], attack['epsilon']).epsilon_text}, step "
                    f"{ThreatModel(attack['norm'], attack['step_size']).epsilon_text}, {attack['steps']} steps",
        optimiser=f"{optim['optimizer'].upper()} (lr {optim['lr']}, {optim['lr_schedule']}, weight decay {optim['weight_decay']})",
        steps=summary.get("steps", "?"), epochs=f"{summary.get('epochs', 0):.1f}", batch_size=optim["batch_size"],
        starting_point=f"`{spec.source}`" if spec.source else ("natural warm-up of " + str(optim["warmup_epochs"]) + " epochs" if optim["warmup_epochs"] else "random initialisation"),
        hardware=summary.get("hardware", "unknown"),
        train_time=f"{summary.get('train_seconds', 0) / 60:.1f} minutes",
        has_autoattack=any(k.startswith("aa") for k in results["accuracy"]),
        intervals={name: wilson_interval(round(value * n), n) for name, value in results["accuracy"].items()},
        interval_method=INTERVAL_METHOD,
        split_examples=results.get("split_examples"),
        warnings=results.get("warnings", []),
        interpolation=training.get("interpolation"),
        alarms=summary.get("alarms", []),
        plots=[file for file in EXPORT_PLOTS if (folder / file).is_file()],
        stopped_by_alarm=summary.get("stopped_by_alarm", False),
        best_vs_last=_best_and_last_pgd(summary),
        corruptions=results.get("corruptions", {}),
        corruption_intervals=results.get("corruption_intervals", {}),
        corruption_mean=results.get("corruption_mean"),
        corruptions_source=results.get("corruptions_source"),
        robustbench_path=robustbench_path(results, name.split("/")[-1]),
    )


def _best_and_last_pgd(summary: dict) -> tuple[float, float] | None:
    """The best and the final PGD accuracy of the evaluations during training, when recorded."""
    last = next((v for k, v in summary.get("final_eval", {}).items() if k.startswith("eval/pgd")), None)
    best = summary.get("best_pgd_accuracy", -1)
    return (best, last) if last is not None and best >= 0 else None


def base_model_of(spec: ModelSpec) -> str | None:
    """The Hub repository the model was fine-tuned from, if it came from one."""
    source = spec.source
    return source if source and looks_like_hub_id(source) else None


def card_template(name: str = "robust_model.md") -> Path:
    """``model_cards/NAME``: in the source tree, or where the wheel installs it."""
    import sys

    for root in (Path(__file__).resolve().parents[1], Path(sys.prefix) / "share" / "cure-hub"):
        if (template := root / "model_cards" / name).is_file():
            return template
    raise FileNotFoundError(f"model card template model_cards/{name} not found; reinstall cure-hub")


def usage_section(spec: ModelSpec, repo_id: str) -> str:
    """The card's "Usage" section for a model of ``spec`` at ``repo_id`` (``model_cards/usage.md``),
    which the cards of exports and of imports share."""
    import jinja2

    return jinja2.Template(card_template("usage.md").read_text()).render(
        repo_id=repo_id, image_size=spec.image_size, library_name=spec.library, architecture=spec.architecture,
        needs_cure_hub_import=spec.architecture.startswith("cifar_"))


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, weights: str = "last",
               eval_results: str | os.PathLike | None = None, overwrite: bool = False, repo_id: str | None = None,
               interpolate: float | None = None) -> Path:
    """Export a training run as a Hub-ready folder: weights, config, model card, results.

    ``out_dir`` is either absent or complete (:func:`replace_folder`); a non-empty one is refused
    unless ``overwrite``. With ``interpolate`` (λ), the model is θ(λ) between the run's start and
    ``weights`` (:mod:`cure_hub.interpolation`), evaluated by the run's ``cure-hub tradeoff`` curve.
    """
    run, out = Path(run_dir), Path(out_dir)
    if weights not in WEIGHT_CHOICES:
        raise ExportError(f"weights must be one of {list(WEIGHT_CHOICES)}, got {weights!r}")
    folder = RunFolder(run)
    if not folder.is_run() or not folder.holds_run():
        raise ExportError(f"{run} is not a training run folder (no model_spec.json / config.yaml)")
    config = folder.read_config()
    if interpolate is not None:
        if eval_results:
            raise ExportError("--interpolate takes its evaluation from the run's tradeoff curve; leave out --eval-results")
        model, results, interpolation = _interpolated_export(run, weights, interpolate)
    else:
        model, interpolation = load_robust_model(run, weights=weights), None
        if eval_results:
            results = read_json(Path(eval_results))
            _check_results_are_of(results, run, weights, eval_results)
        else:
            results = _eval_results_from_run(run, weights, config)
    results = without_local_paths(results)
    summary = folder.read_summary()
    with replace_folder(out, overwrite, keep=(run, "the run being exported")) as staging, \
            disk_space_for(out.parent, f"the export {out}", needed=lambda: f"about {readable_size(sum(t.nbytes for t in model.state_dict().values()))}"):
        training = {"weights": weights, "config": config, "model_spec": model.spec.to_dict(), "summary": summary,
                    "versions": package_versions(), "git_commit": summary.get("git_commit"),
                    "base_model": base_model_of(model.spec), "interpolation": interpolation}
        # The run's own export is called "export": the card takes the run's name instead.
        _write_export(staging, run, model, results, training, repo_id, run.resolve().name if out.name == "export" else out.name)
    return out


@contextlib.contextmanager
def replace_folder(out: Path, overwrite: bool, keep: tuple[Path, str] | None = None):
    """Yields an empty folder beside ``out`` to write an export into; when the block ends, the
    folder takes ``out``'s place whole (an earlier export renamed aside first, then removed), so
    ``out`` is either absent or complete. A non-empty ``out`` is refused unless ``overwrite``, and
    only an earlier export is ever replaced, never ``keep`` (a folder, and what it is) or the
    current folder."""
    import tempfile

    _check_export_target(out, overwrite, keep)
    for leftover in out.parent.glob(f".{out.name}.partial-*"):  # from an export that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o777 & ~process_umask())  # mkdtemp's 0700 would make the export private to its writer
    earlier = None
    try:
        yield staging
        for file in staging.iterdir():  # safetensors writes its files private (0o600): readable as every other file
            file.chmod(default_file_mode())
        # An earlier export is set aside, not deleted in place: at every moment `out` is one whole
        # export, and what a kill leaves aside carries the partial prefix the next export sweeps.
        if out.exists():
            earlier = staging.with_name(staging.name + ".replaced")
            os.replace(out, earlier)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if earlier and not out.exists():  # the new export did not go in: the earlier one goes back
            os.replace(earlier, out)
        raise
    if earlier:
        shutil.rmtree(earlier)


def _write_export(folder: Path, run: Path, model, results: dict, training: dict, repo_id: str | None, name: str) -> None:
    """An export's files into ``folder``: weights and config, results, how it was trained, its
    RobustBench entry, the plots of its run and its card."""
    save_pretrained(model, folder)
    for file, plot in EXPORT_PLOTS.items():
        plot(run, folder / file)
    (folder / "eval_results.json").write_text(json.dumps(results, indent=2))
    (folder / TRAINING_RECORD).write_text(json.dumps(without_local_paths(training), indent=2))
    (folder / "robustbench.json").write_text(json.dumps(robustbench_entry(model.spec, results, training["config"]), indent=2))
    model_card(folder, repo_id, name=name).save(folder / "README.md")


def _interpolated_export(run: Path, weights: str, lam: float):
    """θ(λ) with the batch-norm statistics the curve measured it with, its results from the
    curve, and what the card says about it."""
    from .interpolation import TRADEOFF_FILE, curve_point, interpolated_model, recompute_batch_norm, training_batches

    curve_file = run / "tradeoff" / TRADEOFF_FILE
    curve = read_json(curve_file) if curve_file.is_file() else None
    point = curve_point(curve, lam) if curve and curve["weights"] == weights else None
    if point is None:
        raise ExportError(f"no point λ = {lam:g} towards the {weights} weights in {curve_file}: evaluate it first with "
                          f"`cure-hub tradeoff {run} --weights {weights}` (the λ of its --points are 0, 0.1, ... 1 by default)")
    model = interpolated_model(run, weights, lam)
    if point["batch_norm_recomputed"]:
        recompute_batch_norm(model, training_batches(run), curve["bn_batches"])
    results = {"model": str(run), "weights": weights, "dataset": curve["dataset"], "split": curve["split"],
               "split_examples": curve["split_examples"], "n_examples": curve["n_examples"], "norm": curve["norm"],
               "epsilon": curve["epsilon"], "accuracy": point["accuracy"], "intervals": point["intervals"],
               "nrr": {}, "eps_sweep": {}, "warnings": [], "source": "cure-hub tradeoff"}
    interpolation = {"lambda": lam, "towards": weights, "batch_norm": curve["batch_norm"], "nrr_attack": curve["nrr_attack"],
                     "best_lambda": curve["best_lambda"],
                     "curve": [{"lambda": row["lambda"], "accuracy": row["accuracy"], "nrr": row["nrr"]} for row in curve["points"]]}
    return model, results, interpolation


def without_local_paths(value):
    """``value`` (JSON-like) with every path on this machine replaced by its last component: what
    is published names a dataset, a run or a starting checkpoint, never the user's file system."""
    if isinstance(value, dict):
        return {key: without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_local_paths(item) for item in value]
    if isinstance(value, str) and (value.startswith(("/", "./", "../", "~")) or ("/" in value and Path(value).exists())):
        return Path(value).name
    return value


def _check_results_are_of(results: dict, run: Path, weights: str, results_file) -> None:
    """Refuse results measured on another model, or on other weights of this run."""
    evaluated = Path(str(results.get("model", "")))
    if not RunFolder(evaluated).is_run() or evaluated.resolve() != run.resolve():
        raise ExportError(f"{results_file} holds results of {results.get('model')!r}, not of the run {str(run)!r}; "
                          f"evaluate the run: cure-hub eval {run} --weights {weights} ...")
    if results.get("weights") != weights:
        raise ExportError(f"{results_file} holds results of the {results.get('weights')} weights, not of the {weights} weights "
                          f"exported: evaluate them (cure-hub eval {run} --weights {weights} ...) or export --weights {results.get('weights')}")


#: What an export records of the run it was trained in, and an import of the checkpoint it was made from.
TRAINING_RECORD, IMPORT_RECORD = "training_config.json", "import_config.json"
#: What an export folder holds, and nothing else: the only kind of folder ``--overwrite`` replaces.
EXPORT_FILE_PATTERNS = ("README.md", "*.json", "*.safetensors", "*.png")
#: The plots an export draws from its run (those the run's logs allow), which its card shows.
EXPORT_PLOTS = {"training.png": plot_training, "layer_statistics.png": plot_layer_statistics}


def is_export(folder: Path) -> bool:
    """Whether ``folder`` is an export written by :func:`export_run` or an import (recognised by its files)."""
    entries = list(folder.iterdir())
    return any((folder / record).is_file() for record in (TRAINING_RECORD, IMPORT_RECORD)) and all(
        entry.is_file() and any(fnmatch.fnmatchcase(entry.name, p) for p in EXPORT_FILE_PATTERNS) for entry in entries
    )


def _check_export_target(out: Path, overwrite: bool, keep: tuple[Path, str] | None) -> None:
    """Refuse an output folder whose replacement could destroy anything but an earlier export."""
    target = out.resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder; choose another output folder")
    for folder, what in filter(None, (keep, (Path.cwd(), "the current folder"))):
        folder = folder.resolve()
        if target == folder or target in folder.parents:
            raise ExportError(f"{out} is {what}" + ("" if target == folder else " or holds it") + "; export into a new folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"{out} is not empty; pass --overwrite to replace an earlier export there")
    if not is_export(out):
        raise ExportError(f"{out} holds other files than an export; --overwrite only replaces an earlier export, so choose another folder")


def rerender_card(folder: str | os.PathLike, eval_results: str | os.PathLike | None = None, repo_id: str | None = None) -> Path:
    """Re-render an export's card, after replacing its ``eval_results.json`` when one is given."""
    folder = Path(folder)
    if eval_results:
        results = without_local_paths(read_json(Path(eval_results)))
        (folder / "eval_results.json").write_text(json.dumps(results, indent=2))
        training = read_json(folder / TRAINING_RECORD)
        spec = ModelSpec.from_dict(training["model_spec"])
        (folder / "robustbench.json").write_text(json.dumps(robustbench_entry(spec, results, training["config"]), indent=2))
    card = model_card(folder, repo_id)
    card.save(folder / "README.md")
    return folder / "README.md"


# --------------------------------------------------------------------------------------------
# Push

class HubPushError(RuntimeError):
    """A push refused before anything was uploaded, or one the Hub or the network stopped: what
    happened, where, and what to do."""


#: The classes of a failed connection, by name: httpx's, requests' and Python's own.
NETWORK_ERRORS = ("TransportError", "ConnectionError", "Timeout", "TimeoutException", "TimeoutError")


def _failed_request(err: Exception) -> str:
    """``METHOD URL`` of the request ``err`` (an HTTP or a connection error) failed on, if it tells."""
    with contextlib.suppress(Exception):  # httpx raises when asked for a request it does not hold
        request = err.response.request if getattr(err, "response", None) is not None else err.request
        return f"{request.method} {request.url}"
    return "a request"


@contextlib.contextmanager
def hub_faults(repo_id: str, revision: str | None, retry: str):
    """What the Hub or the network does wrong inside the block, as one :class:`HubPushError` naming
    the endpoint, the request and ``retry`` (the command that pushes again); a failed commit may
    have been applied, and says where to look."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "an error"
        request = _failed_request(err)
        if status == 401:
            raise HubPushError(f"the Hub at {constants.ENDPOINT} refused the token (401 to {request}): set HF_TOKEN to a "
                               "valid token with write access, or run `hf auth login`") from None
        detail = f"{status} to {request}" + (f" ({err.server_message})" if getattr(err, "server_message", None) else "")
        raise HubPushError(_push_failure(f"the Hub answered {detail}", request, repo_id, revision, retry)) from None
    except Exception as err:
        if not any(cls.__name__ in NETWORK_ERRORS for cls in type(err).__mro__):
            raise
        request = _failed_request(err)
        raise HubPushError(_push_failure(f"the connection to the Hub at {constants.ENDPOINT} failed on {request} ({err}); "
                                         "check the network and HF_ENDPOINT", request, repo_id, revision, retry)) from None


def _push_failure(what: str, request: str, repo_id: str, revision: str | None, retry: str) -> str:
    from huggingface_hub import constants

    if "/commit/" in request:
        return (f"{what}. The commit may have been applied: look at {constants.ENDPOINT}/{repo_id}/commits/{revision or 'main'} "
                f"before pushing again ({retry})")
    return f"{what}. Nothing was committed: push again ({retry})"


def check_push_access(repo_id: str, token: str | None = None):
    """An ``HfApi`` that may write to ``repo_id``: a valid repository id and a token (given, from
    ``HF_TOKEN`` or from ``hf auth login``) that is not read-only. Cheap: one ``whoami`` call, so the
    trainer runs it before training rather than after hours of it. The token is never shown."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubPushError(f"{repo_id!r} is not a Hub repository id: use 'name' or 'owner/name'") from None
    token = token or get_token()
    if not token:
        raise HubPushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    api = HfApi(token=token)
    with hub_faults(repo_id, None, "once the Hub answers, run the command again"):
        role = api.whoami().get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise HubPushError("the Hugging Face token is read-only; create one with write access")
    return api


REQUIRED_EXPORT_FILES = ("config.json", "model.safetensors", "README.md", "eval_results.json")


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                create_pr: bool = False, commit_message: str | None = None, force: bool = False, token: str | None = None) -> str:
    """Upload an export folder to ``repo_id`` in one commit; returns the commit URL.

    Refused, before anything is uploaded, when no token is found (``HF_TOKEN`` or ``hf auth login``),
    when the token is read-only, when the folder is not a complete export, or when the repository
    already holds a model of another architecture (unless ``force``). The token is never logged.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [name for name in REQUIRED_EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise HubPushError(f"{folder} is not a complete export (missing {missing}); run `cure-hub export` first")
    check_finite(load_file(folder / "model.safetensors"), f"the export {str(folder)!r}")
    retry = " ".join(["cure-hub push", str(folder), "--repo-id", repo_id, *(["--private"] if private else []),
                      *(["--revision", revision] if revision else []), *(["--create-pr"] if create_pr else [])])
    with hub_faults(repo_id, revision, f"`{retry}`"):
        return _push_folder(folder, repo_id, private, revision, create_pr, commit_message, force, token)


def _push_folder(folder: Path, repo_id: str, private: bool, revision: str | None, create_pr: bool,
                 commit_message: str | None, force: bool, token: str | None) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    api = check_push_access(repo_id, token)
    token = api.token
    local = read_json(folder / "config.json")
    try:
        remote = read_json(Path(hf_hub_download(repo_id, "config.json", revision=revision, token=token)))
    except (RepositoryNotFoundError, EntryNotFoundError, RevisionNotFoundError):
        remote = None
    if remote is not None and not force:
        def kind(cfg):
            return cfg.get("architecture") or cfg.get("model_type")

        if kind(remote) != kind(local):
            raise HubPushError(
                f"{repo_id} holds a {kind(remote)!r} model, not {kind(local)!r}; pass --force to push over it, or choose another --repo-id"
            )
    api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, revision=revision, create_pr=create_pr,
        commit_message=commit_message or f"Upload robust model ({local.get('architecture') or local.get('model_type')}) with cure-hub",
    )
    return getattr(info, "commit_url", str(info))
