"""Natural corruptions (Hendrycks & Dietterich, ICLR 2019) for ``cure-hub eval --corruptions``.

Two sources of corrupted images, behind one interface (``batch``):

* :class:`CorruptedCopy` reads a copy of the published data (CIFAR-10-C, CIFAR-100-C), in the
  release's layout, which RobustBench reads too: one ``<corruption>.npy`` per corruption, the test
  split five times over (severity 1, then 2, ... 5; uint8, N x H x W x 3, in test-split order), and
  ``labels.npy``; a local folder or a Hub dataset repository, read as memory maps one batch at a
  time. The reference: the paper's CIFAR-10-C figures (severity 3) were measured on it.
* :class:`GeneratedCorruptions` corrupts the evaluation images themselves, with
  ``imagecorruptions`` as the maintained fork ``imagecorruptions-imaug`` ships it (``pip install
  'cure-hub[corruptions]'``; the original 1.1.2 of 2020 needs ``pkg_resources`` and fails with
  numpy 2 and today's scikit-image). Its parameters are ImageNet-C's
  (``make_imagenet_c.py`` of hendrycks/robustness), not CIFAR-10-C's (``make_cifar_c.py``, e.g.
  contrast 0.2 against 0.4 at severity 3): figures from it are not comparable with CIFAR-10-C's
  and are labelled with their source. Random corruptions draw from a seed per example (the
  evaluation's seed, the example's position in the split, the corruption and the severity), so
  the result does not depend on batches, processes or resumption.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import InputError

#: The 15 corruptions of the benchmark, in its order (noise, blur, weather, digital).
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
SEVERITIES = (1, 2, 3, 4, 5)
#: The smallest images imagecorruptions corrupts.
MIN_GENERATED_SIZE = 32
#: Where the data can be had: the authors' release of CIFAR-10-C and CIFAR-100-C.
RELEASES = "https://zenodo.org/records/2535967 (CIFAR-10-C), https://zenodo.org/records/3555552 (CIFAR-100-C)"


def check_corruptions(corruptions, severities) -> None:
    """Refuse a corruption that is not one of :data:`CORRUPTIONS`, or a severity outside 1-5."""
    unknown = [n for n in corruptions if n not in CORRUPTIONS]
    if unknown:
        raise InputError(f"unknown corruption(s) {unknown}; choose 'all' or from {', '.join(CORRUPTIONS)}")
    if not severities or any(s not in SEVERITIES for s in severities):
        raise InputError(f"severities must be 'all' or among 1-5, comma-separated (e.g. 3 or 1,3,5); got {severities!r}")


def parse_corruptions(text: str) -> tuple[str, ...]:
    """``all``, or a comma-separated list of :data:`CORRUPTIONS`."""
    names = CORRUPTIONS if text == "all" else tuple(text.split(","))
    check_corruptions(names, SEVERITIES)
    return names


def parse_severities(text: str) -> tuple[int, ...]:
    """``3``, ``1,3,5`` or ``all``."""
    try:
        severities = SEVERITIES if text == "all" else tuple(int(s) for s in text.split(","))
    except ValueError:
        raise InputError(f"severities must be 'all' or among 1-5, comma-separated (e.g. 3 or 1,3,5); got {text!r}") from None
    check_corruptions((), severities)
    return severities


def corruption_key(corruption: str, severity: int) -> str:
    """How results name one corruption at one severity: ``fog/3``."""
    return f"{corruption}/{severity}"


class CorruptedCopy:
    """The corrupted versions of an evaluation split, read from a copy of the published data.

    Args:
        location: a folder, or a Hub dataset repository id, in the release's layout.
        corruptions, severities: what will be read (only those files are downloaded).
        split_size: examples in the clean split; every file must hold five times as many.
    """

    def __init__(self, location: str, corruptions: tuple[str, ...], severities: tuple[int, ...], split_size: int):
        self.location, self.corruptions, self.severities, self.split_size = location, corruptions, severities, split_size
        folder = self._folder(location, corruptions)
        missing = [f"{name}.npy" for name in (*corruptions, "labels") if not (folder / f"{name}.npy").is_file()]
        if missing:
            raise InputError(f"{location} lacks {', '.join(missing)}: a copy of the corrupted test set holds one "
                             f"<corruption>.npy per corruption and labels.npy, as released at {RELEASES}")
        self.arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in (*corruptions, "labels")}
        for name, array in self.arrays.items():
            if len(array) != len(SEVERITIES) * split_size:
                raise InputError(f"{location}/{name}.npy holds {len(array)} entries, not 5 x {split_size} (five "
                                 "severities of the evaluation split): is it the corrupted copy of this split?")

    @staticmethod
    def _folder(location: str, corruptions: tuple[str, ...]) -> Path:
        if Path(location).is_dir():
            return Path(location)
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError

        try:
            return Path(snapshot_download(location, repo_type="dataset",
                                          allow_patterns=[f"{name}.npy" for name in (*corruptions, "labels")]))
        except HFValidationError as err:
            raise InputError(f"--corruptions-dataset {location!r} is neither a folder nor a Hub dataset id") from err

    #: how results name where the corrupted images came from
    @property
    def source(self) -> str:
        return f"from the published copy {self.location}"

    def batch(self, split_indices: list[int], images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every corruption and severity of the examples at ``split_indices`` of the clean split, as
        [0, 1] float images keyed by :func:`corruption_key`; refused if the copy's labels are not
        ``labels`` (a copy of another split, or in another order)."""
        index = np.asarray(split_indices)
        copy_labels = torch.as_tensor(np.asarray(self.arrays["labels"][index]), dtype=torch.long)
        if not torch.equal(copy_labels, labels.cpu()):
            position = int((copy_labels != labels.cpu()).nonzero()[0])
            raise InputError(f"the labels of {self.location} differ from the evaluation split's at example "
                             f"{split_indices[position]}: it is not the corrupted copy of this split, in its order")
        batch = {}
        for corruption in self.corruptions:
            for severity in self.severities:
                images = np.asarray(self.arrays[corruption][(severity - 1) * self.split_size + index])
                batch[corruption_key(corruption, severity)] = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
        return batch


class GeneratedCorruptions:
    """The corrupted versions of the evaluation images, generated by ``imagecorruptions``
    (ImageNet-C's parameters, see the module's note), each example from its own seed."""

    def __init__(self, corruptions: tuple[str, ...], severities: tuple[int, ...], seed: int = 0):
        try:
            from imagecorruptions import corrupt
        except ImportError as err:
            raise InputError(
                "generating corruptions needs imagecorruptions: pip install 'cure-hub[corruptions]' (the maintained "
                f"imagecorruptions-imaug); or pass --corruptions-dataset with a copy of the published data ({RELEASES})"
            ) from err
        from importlib.metadata import version

        self.corrupt, self.corruptions, self.severities, self.seed = corrupt, corruptions, severities, seed
        self.source = (f"generated by imagecorruptions-imaug {version('imagecorruptions-imaug')} with ImageNet-C's "
                       "parameters (not comparable with CIFAR-10-C's published data)")

    def batch(self, split_indices: list[int], images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every corruption and severity of ``images`` (the examples at ``split_indices`` of the
        split), as [0, 1] float images keyed by :func:`corruption_key`."""
        if min(images.shape[-2:]) < MIN_GENERATED_SIZE:
            raise InputError(f"imagecorruptions needs images of at least {MIN_GENERATED_SIZE}x{MIN_GENERATED_SIZE} pixels, and "
                             f"these are {images.shape[-2]}x{images.shape[-1]}: evaluate at --image-size "
                             f"{MIN_GENERATED_SIZE} or more, or pass --corruptions-dataset")
        pixels = images.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        batch = {}
        saved = np.random.get_state()  # imagecorruptions draws from NumPy's global generator
        try:
            for corruption in self.corruptions:
                number = CORRUPTIONS.index(corruption)
                for severity in self.severities:
                    corrupted = []
                    for index, image in zip(split_indices, pixels):
                        seed = int(np.random.SeedSequence([self.seed, index, number, severity]).generate_state(1)[0])
                        np.random.seed(seed)
                        corrupted.append(self._corrupt(image, corruption, severity, seed))
                    batch[corruption_key(corruption, severity)] = (
                        torch.from_numpy(np.stack(corrupted)).permute(0, 3, 1, 2).float().div_(255))
        finally:
            np.random.set_state(saved)
        return batch

    def _corrupt(self, image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
        """One RGB image. Glass blur draws from its own ``seed`` (in compiled code, where NumPy's
        global generator does not reach)."""
        extra = {"seed": seed} if corruption == "glass_blur" else {}
        out = np.asarray(self.corrupt(image, corruption_name=corruption, severity=severity, **extra))
        if out.shape != image.shape:  # some corruptions crop or pad by a pixel at odd sizes
            raise InputError(f"imagecorruptions' {corruption} returned a {out.shape} image for a {image.shape} one")
        return out.astype(np.uint8)
