"""Any model means any model: every transformers image-classification type, and one timm
architecture of every timm module, built on the meta device at 32 px (and the transformers types at
their own size too) either train (heads found, the default mask leaves them out, logits of the right
shape) or are refused in one line for a reason on the list of known limitations. A new failure, a
crash, or a listed limitation that has gone away fails the test. ``benchmarks/model_coverage.py``
runs the same check on all 1,374 timm architectures at both sizes (the README's figures)."""

import re
import sys
from pathlib import Path

import pytest
import timm
from timm.models._registry import _model_to_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from model_coverage import KNOWN_LIMITATIONS, check, model_names, run, tasks_for  # noqa: E402


#: Size words in timm names, smallest first: the sample takes each module's smallest variant.
SIZE_WORDS = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "mini", "small", "s")


def one_architecture_per_timm_module() -> list[str]:
    """The smallest-sounding name of every timm module (vision_transformer, resnet, xcit...): a
    module is one family of constructors, which is where the classes of failure live, and small
    variants build fastest."""
    def size_rank(name: str) -> tuple:
        words = re.split(r"[_\d]+", name)
        return min((SIZE_WORDS.index(w) for w in words if w in SIZE_WORDS), default=len(SIZE_WORDS)), len(name), name

    modules: dict[str, list[str]] = {}
    for name in timm.list_models():
        modules.setdefault(_model_to_module[name], []).append(name)
    return sorted(min(names, key=size_rank) for names in modules.values())


@pytest.mark.slow
def test_every_transformers_type_and_every_timm_module_trains_or_is_a_known_limitation():
    tasks = tasks_for({"transformers": model_names("transformers")}, sizes=(32, None))
    outcomes = run(tasks + tasks_for({"timm": one_architecture_per_timm_module()}, sizes=(32,)), workers=2)
    unexpected = [f"{o.key}: {o.status} {o.detail or '(listed as a known limitation)'}" for o in outcomes if not o.expected]
    assert not unexpected, "\n".join(unexpected)
    assert sum(o.status == "ok" for o in outcomes) > 0.85 * len(outcomes)


def test_a_stale_limitation_and_an_unlisted_refusal_are_both_unexpected(monkeypatch):
    """The comparison itself: a model that builds is unexpected once it is listed as a limitation,
    and a refusal is expected only while it is listed."""
    assert check("timm", "cifar_resnet18", 32).expected
    monkeypatch.setitem(KNOWN_LIMITATIONS, "timm:cifar_resnet18@32", "listed by mistake")
    assert not check("timm", "cifar_resnet18", 32).expected
    refused = check("timm", "no_such_model", 32)  # UnknownModelError, one of cure-hub's one-line errors
    assert refused.status == "refused" and not refused.expected
    monkeypatch.setitem(KNOWN_LIMITATIONS, "timm:no_such_model@32", "listed")
    assert refused.expected


def test_every_transformers_types_export_processor_gives_the_pixels_of_its_own():
    """For every model type, the processor an export gets applies the colour map of the type's own
    processor (reversed channels and doubled divisions included), so no export is refused or
    mis-fed for its type's defaults (PP-LCNet normalises before it reverses the channels)."""
    from cure_hub.model_configs import default_image_processor
    from cure_hub.models import ModelSpec, _image_processor, _processor_pixel_map
    from cure_hub.preprocessing import pixel_map

    for model_type in model_names("transformers"):
        own = _processor_pixel_map(default_image_processor(model_type), model_type)
        spec = ModelSpec("transformers", model_type, 10, 32, own.mean, own.std, channel_order=own.channel_order)
        assert pixel_map(_image_processor(spec)).matches(own), model_type
