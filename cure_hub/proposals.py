"""Robust results proposed to any model's card on the Hub: ``cure-hub eval HUB_ID
--propose-to-card`` opens a pull request that adds the evaluation's results to the card's
``model-index`` by the convention of docs/hub-results.md, and updates that pull request when run
again."""

from __future__ import annotations

from .evaluation import ATTACKS, INTERVAL_METHOD
from .hub import HubPushError, check_push_access, hub_faults
from .hub_results import SOURCE_URL, ThreatModel, eval_results

#: The title of cure-hub's pull requests, by which a later run finds its own open one.
PULL_REQUEST_TITLE = "Add robust accuracy results (cure-hub)"


def protocol(result) -> tuple:
    """What makes two results the same measurement: dataset, split, threat model (the config),
    attack, and the examples evaluated."""
    args = result.metric_args or {}
    return (result.dataset_type, result.dataset_split, result.dataset_config, args.get("attack"), args.get("n_examples"),
            args.get("sampling"))


def propose_results_to_card(repo_id: str, results: dict, command: str, overwrite: bool = False, token: str | None = None) -> str:
    """Opens a pull request on ``repo_id`` whose card adds ``results`` (``cure-hub eval``'s), or
    updates cure-hub's open one; returns its address. The card's metadata, prose and results of
    other protocols are kept; a result of the same protocol already on the main branch is
    replaced only with ``overwrite``. ``command`` is what the description gives to reproduce them."""
    from huggingface_hub import CommitOperationAdd, constants

    api = check_push_access(repo_id, token)
    ours = eval_results(results)
    measured = {protocol(result) for result in ours}
    with hub_faults(repo_id, None, f"run `{command} --propose-to-card` again"):
        main = _card(repo_id, None, api.token)
        if not overwrite:
            _refuse_clashes(repo_id, main, measured)
        user = api.whoami()["name"]
        mine = next((d for d in api.get_repo_discussions(repo_id, author=user, discussion_type="pull_request", discussion_status="open")
                     if d.title == PULL_REQUEST_TITLE), None)
        revision = f"refs/pr/{mine.num}" if mine else None
        card = _card(repo_id, revision, api.token) if mine else main
        card.data.eval_results = [r for r in card.data.eval_results or [] if protocol(r) not in measured] + ours
        card.data.model_name = card.data.model_name or repo_id.split("/")[-1]
        commit = api.create_commit(
            repo_id, operations=[CommitOperationAdd("README.md", str(card).encode())], commit_message=PULL_REQUEST_TITLE,
            commit_description=_description(results, command), revision=revision, create_pr=mine is None)
    return commit.pr_url or f"{constants.ENDPOINT}/{repo_id}/discussions/{mine.num}"


def check_protocols_free(repo_id: str, planned: dict, overwrite: bool = False) -> None:
    """Before an evaluation: refuse one whose results ``planned`` (results.json's shape, any
    accuracies) would clash with results of the same protocol on the card's main branch, unless
    ``overwrite``. :func:`propose_results_to_card` checks again afterwards."""
    if overwrite:
        return
    with hub_faults(repo_id, None, "run the command again"):
        _refuse_clashes(repo_id, _card(repo_id, None), {protocol(r) for r in eval_results(planned)})


def _refuse_clashes(repo_id: str, card, measured: set) -> None:
    if clashes := [r for r in card.data.eval_results or [] if protocol(r) in measured]:
        raise HubPushError(
            f"{repo_id}'s card already has results of this protocol ({', '.join(r.metric_name for r in clashes)}): pass "
            "--overwrite-results to propose the new ones in their place")


def _card(repo_id: str, revision: str | None, token: str | None = None):
    """The card at ``revision`` (read with ``token``, or the one configured), or an empty one where
    the repository has none."""
    from huggingface_hub import ModelCard, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return ModelCard.load(hf_hub_download(repo_id, "README.md", revision=revision, token=token))
    except EntryNotFoundError:
        return ModelCard("---\n---\n")


def _description(results: dict, command: str) -> str:
    """The pull request's description: what was measured, how to reproduce it, what changes."""
    threat_model = ThreatModel(results["norm"], results["epsilon"])
    n, whole = results["n_examples"], results.get("split_examples")
    scope = f"{n} class-balanced examples of the {whole}" if whole and n < whole else f"all {n} examples"
    rows = "\n".join(
        f"| {ATTACKS[name].title if name in ATTACKS else name} | {100 * value:.2f} % | "
        + ("{:.1f}–{:.1f} %".format(*(100 * v for v in results["intervals"][name])) if name in results.get("intervals", {}) else "")
        + " |"
        for name, value in results["accuracy"].items())
    return (f"Adversarial robustness of this model, measured by [cure-hub]({SOURCE_URL}) on {scope} of the "
            f"{results['split']} split of {results['dataset']}, threat model {threat_model} "
            f"({results['norm']} ball of radius {threat_model.epsilon_text}):\n\n"
            f"| attack | accuracy | 95 % interval ({INTERVAL_METHOD}) |\n|---|---|---|\n{rows}\n\n"
            f"To reproduce:\n\n```bash\npip install cure-hub\n{command}\n```\n\n"
            "This pull request adds these results to the card's `model-index` (one `dataset.config` per threat model, "
            "the protocol in each metric's `args`, as docs/hub-results.md in cure-hub describes). The card's other "
            "metadata, its text and its other results are unchanged.")
