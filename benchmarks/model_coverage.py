"""Which models cure-hub can train: every timm architecture and every transformers
image-classification model type, each built on the meta device (no memory, no weights, no
arithmetic) at 32 px and at its default size.

A model passes when ``cure_hub.create_model`` builds it, its classification heads are found, CURE's
default mask (``all_but_head``) masks something and leaves every head out, and a batch gives logits
of shape (batch, classes). A model cure-hub refuses with a one-line error (an ``InputError``, such
as "inception_v3 cannot classify 32x32 images ...") is *refused*; any other exception is a *crash*,
which is a bug. Every refusal must be a known limitation (:data:`KNOWN_LIMITATIONS`, with its
reason), and every known limitation must still be one: ``tests/test_model_coverage.py`` checks a
sample on every CI run; this script checks every name:

    python benchmarks/model_coverage.py                          # all of them, both sizes
    python benchmarks/model_coverage.py --library transformers --sizes 32
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import logging
import multiprocessing
import os
import sys
import time
import warnings

import timm
import torch

import cure_hub
from cure_hub.config import InputError
from cure_hub.methods.cure import masked_parameter_names
from cure_hub.model_configs import transformers_model_types

LIBRARIES = ("timm", "transformers")
#: The sizes every model is built at: CIFAR's, and the model's own (``None``).
SIZES = (32, None)
NUM_CLASSES = 10

#: What cure-hub cannot train, and why, by pattern on ``library:name@size`` (size ``default`` for
#: the model's own). Each is refused with a one-line error; none crashes.
KNOWN_LIMITATIONS: dict[str, str] = {
    "timm:*_enc@*": "an image encoder without a classifier (timm builds it without get_classifier)",
    "timm:inception_v[34]@32": "downsamples 32-px images below its kernels (takes 75 px or more)",
    "timm:inception_resnet_v2@32": "downsamples 32-px images below its kernels",
    "timm:ghostnetv[23]_*@32": "downsamples 32-px images below its pooling window",
    "timm:csatv2*@32": "downsamples 32-px images below its kernels",
    "timm:*halo*@32": "halo attention needs feature maps that its 8x8 blocks tile (256 px)",
    "timm:bat_resnext26ts@32": "bottleneck attention sized for 256-px feature maps",
    "timm:efficientformer_l[137]@32": "attention biases for the 7x7 positions of a 224-px image",
    "transformers:imagegpt@*": "its processor turns pixels into colour-cluster tokens, not pixel values",
    "transformers:siglip2@*": "takes patch sequences with attention masks, not an image tensor",
    "transformers:shieldgemma2@*": "a vision-language safety classifier: it takes a text prompt with the image",
    "transformers:dinat@*": "needs the natten package (not installed in CI)",
    "transformers:*swin@32": "windows of 7 do not tile the 8x8 patch grid of 32-px images: --model-kwargs window_size=4",
    "transformers:levit@32": "its attention biases need at least 4x4 positions after three downsamplings",
    "transformers:mobilevitv2@32": "downsamples 32-px images below its 2x2 unfolding",
}


@dataclasses.dataclass
class Outcome:
    library: str
    name: str
    image_size: int | None
    status: str  # "ok", "refused" or "crashed"
    detail: str = ""

    @property
    def key(self) -> str:
        return f"{self.library}:{self.name}@{self.image_size or 'default'}"

    @property
    def known_limitation(self) -> str | None:
        return next((reason for pattern, reason in KNOWN_LIMITATIONS.items() if fnmatch.fnmatchcase(self.key, pattern)), None)

    @property
    def expected(self) -> bool:
        """Passes and is no known limitation, or is refused and is one."""
        return (self.status == "ok") == (self.known_limitation is None) and self.status != "crashed"


def model_names(library: str) -> list[str]:
    return timm.list_models() if library == "timm" else transformers_model_types()


def check(library: str, name: str, image_size: int | None) -> Outcome:
    """Build ``name`` on the meta device at ``image_size`` and check heads, mask and logits."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                heads, masked, logits = _build_and_classify(name, image_size, "meta")
            except RuntimeError as err:
                if "meta tensor" not in str(err):
                    raise
                heads, masked, logits = _build_and_classify(name, image_size, "cpu")  # value-dependent (Perceiver)
    except InputError as err:
        return Outcome(library, name, image_size, "refused", str(err).splitlines()[0])
    except Exception as err:
        return Outcome(library, name, image_size, "crashed", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    if not masked or heads & masked:
        return Outcome(library, name, image_size, "crashed", f"mask of {len(masked)} tensors, {len(heads & masked)} of them in a head")
    if tuple(logits.shape) != (2, NUM_CLASSES):
        return Outcome(library, name, image_size, "crashed", f"logits of shape {tuple(logits.shape)}")
    return Outcome(library, name, image_size, "ok")


def _build_and_classify(name: str, image_size: int | None, device: str):
    with torch.device(device):
        model = cure_hub.create_model(name, num_classes=NUM_CLASSES, image_size=image_size)
        heads = set(model.classifier_parameter_names())
        masked = set(masked_parameter_names(model, "all_but_head"))
        size = model.spec.image_size
        with torch.no_grad():
            return heads, masked, model.eval()(torch.zeros(2, 3, size, size))


def tasks_for(names_by_library: dict[str, list[str]], sizes=SIZES) -> list[tuple[str, str, int | None]]:
    """Every name at every size, as (library, name, size)."""
    return [(library, name, size) for library, names in names_by_library.items() for size in sizes for name in names]


def run(tasks: list[tuple[str, str, int | None]], workers: int = 1, progress: bool = False) -> list[Outcome]:
    """:func:`check` each (library, name, size), in ``workers`` processes (building models is
    single-threaded Python, so processes divide the time), in the order given."""
    if workers <= 1:
        _quiet()
        return [_check_with_progress(task, index, len(tasks), progress) for index, task in enumerate(tasks)]
    # spawn, not fork: a forked copy of a process whose OpenMP threads have started can hang.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_quiet) as pool:
        return pool.starmap(_check_with_progress, [(task, index, len(tasks), progress) for index, task in enumerate(tasks)],
                            chunksize=max(1, len(tasks) // (8 * workers)))


def _quiet() -> None:
    logging.getLogger("cure_hub").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _check_with_progress(task: tuple, index: int, total: int, progress: bool) -> Outcome:
    if progress and index % 100 == 99:
        print(f"  {index + 1}/{total}", file=sys.stderr, flush=True)
    return check(*task)


def summary(outcomes: list[Outcome]) -> str:
    lines = []
    for library in LIBRARIES:
        for size in SIZES:
            group = [o for o in outcomes if o.library == library and o.image_size == size]
            if group:
                counts = {status: sum(o.status == status for o in group) for status in ("ok", "refused", "crashed")}
                lines.append(f"{library:12s} at {size or 'its default'} px: {counts['ok']} of {len(group)} train, "
                             f"{counts['refused']} refused with a reason, {counts['crashed']} crash")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", choices=LIBRARIES, action="append", help="default: both")
    parser.add_argument("--sizes", default="32,default", help="comma-separated sizes; 'default' is the model's own")
    parser.add_argument("--json", help="write every outcome to this file")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: one per CPU)")
    args = parser.parse_args(argv)
    sizes = [None if s == "default" else int(s) for s in args.sizes.split(",")]
    start = time.perf_counter()
    outcomes = run(tasks_for({library: model_names(library) for library in args.library or LIBRARIES}, sizes),
                   workers=args.workers, progress=True)
    print(summary(outcomes))
    print(f"({time.perf_counter() - start:.0f} s)")
    unexpected = [o for o in outcomes if not o.expected]
    for outcome in unexpected:
        print(f"UNEXPECTED {outcome.key}: {outcome.status} {outcome.detail or '(listed as a limitation)'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(o) for o in outcomes], f, indent=1)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
