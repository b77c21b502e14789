"""Natural corruptions (Hendrycks & Dietterich, ICLR 2019) for ``cure-hub eval --corruptions``.

The corrupted images are read from a copy of the published data (CIFAR-10-C, CIFAR-100-C), in
the release's layout, which RobustBench reads too: one ``<corruption>.npy`` per corruption, the
test split five times over (severity 1, then 2, ... 5; uint8, N x H x W x 3, in test-split
order), and ``labels.npy``. A copy is a local folder or a Hub dataset repository holding those
files. They are read as memory maps, one batch at a time.

Why not generated on the fly: no maintained implementation runs with today's numpy and
scikit-image. ``imagecorruptions`` 1.1.2 (the last release, 2020) needs ``pkg_resources``, which
setuptools no longer ships, and with it fails on ``glass_blur`` and ``gaussian_blur``
(``skimage.filters.gaussian`` lost ``multichannel``) and on ``fog`` (``np.float_`` is gone in
numpy 2); its parameters are ImageNet-C's, not CIFAR-10-C's, in any case. The published data is
also the reference: the paper's CIFAR-10-C figures (severity 3) were measured on it.
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

    def batch(self, split_indices: list[int], labels: torch.Tensor) -> dict[str, torch.Tensor]:
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
