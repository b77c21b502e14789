"""Hugging Face image-classification datasets in, batches of [0, 1] float tensors out.

Any dataset that ``datasets.load_dataset`` accepts works: a Hub id, a local folder (parquet files,
an imagefolder), or one of :data:`PACKAGED_DATASETS`, which ship inside a Python package and need no
network. The image and label columns, the class names and the splits are detected from the
dataset's features; :class:`~cure_hub.config.DataConfig` names them where detection cannot.

Augmentation (the paper's random crop with 4-pixel padding and horizontal flip) runs on whole
batches, on their device, from an explicit generator (:func:`random_crop_flip`), so a resumed run
draws the same crops as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import DataConfig, InputError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "picture", "images", "jpg", "png")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "coarse_label", "target", "class", "category", "y")
EVAL_SPLIT_CANDIDATES = ("test", "validation", "valid", "val", "eval")
#: The evaluation split that ``eval_split_fraction`` holds out of the training split.
HELD_OUT_SPLIT = "held_out"


class DatasetUnavailableError(ConnectionError):
    """A Hub dataset could not be reached (no network, or offline mode)."""


class ColumnDetectionError(InputError):
    """The dataset has no recognisable image or label column."""


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: 8x8 images of values 0 to 16, and their labels. Read as ``load_digits``
    reads them, from the file scikit-learn ships, without importing scikit-learn (0.7 s of every
    start on this dataset, and the test suite starts a hundred); ``load_digits`` itself should a
    release move the file."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _load_sklearn_digits():
    import datasets

    images, labels = _sklearn_digits()
    images = [Image.fromarray((img * 255.0 / 16.0).astype(np.uint8), mode="L") for img in images]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    table = datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
    splits = table.train_test_split(test_size=0.2, seed=0, stratify_by_column="label")
    return datasets.DatasetDict(train=splits["train"], test=splits["test"])


#: Small real datasets that ship inside a Python package, by short name: no network needed.
#: ``digits`` is scikit-learn's 1,797 8x8 grey-scale handwritten digits (80/20 stratified split).
PACKAGED_DATASETS: dict[str, Callable[[], "datasets.DatasetDict"]] = {"digits": _load_sklearn_digits}


def load_dataset_dict(name: str, config_name: str | None = None, streaming: bool = False):
    """Load every split of ``name``: a packaged short name, a local folder or a Hub id; with
    ``streaming``, as ``IterableDataset`` splits (a packaged dataset's in four shards, of a size
    it does not declare)."""
    import datasets

    if name in PACKAGED_DATASETS and not Path(name).exists():
        loaded = PACKAGED_DATASETS[name]()
        if streaming:
            return datasets.IterableDatasetDict({split: part.to_iterable_dataset(num_shards=4) for split, part in loaded.items()})
        return loaded
    try:
        loaded = datasets.load_dataset(name, config_name, streaming=streaming)
    except ConnectionError as err:
        raise DatasetUnavailableError(
            f"Could not reach the dataset {name!r} on the Hugging Face Hub ({err}). Without a "
            "network, download it on another machine (datasets.load_dataset(...).save_to_disk or the "
            "repository's files) and pass its local folder as --dataset, or use a packaged dataset: "
            f"{', '.join(PACKAGED_DATASETS)}."
        ) from err
    except FileNotFoundError as err:
        raise FileNotFoundError(f"No dataset {name!r}: not a local folder, packaged dataset or Hub id ({err})") from err
    except ValueError as err:  # e.g. a configuration name the dataset does not have
        raise InputError(f"cannot load the dataset {name!r}: {str(err).splitlines()[0]}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict(train=loaded)
    elif isinstance(loaded, datasets.IterableDataset):
        loaded = datasets.IterableDatasetDict(train=loaded)
    return loaded


def detect_columns(features, image_column: str | None = None, label_column: str | None = None) -> tuple[str, str]:
    """The image and label column of a dataset with these ``features``.

    The image column is the given one, else the first of :data:`IMAGE_COLUMN_CANDIDATES` that is
    an ``Image`` feature, else any ``Image`` feature. The label column is the given one, else the
    first ``ClassLabel`` among :data:`LABEL_COLUMN_CANDIDATES`, any ``ClassLabel``, or an integer
    column among the candidates.
    """
    import datasets

    columns = list(features)

    def check_given(column: str | None, kind: str):
        if column is not None and column not in features:
            raise ColumnDetectionError(f"{kind} column {column!r} is not in the dataset; its columns are {columns}")
        return column

    def is_image(col):
        return isinstance(features[col], datasets.Image)

    def is_class_label(col):
        return isinstance(features[col], datasets.ClassLabel)

    def is_integer(col):
        return isinstance(features[col], datasets.Value) and features[col].dtype.startswith(("int", "uint"))

    image = check_given(image_column, "image") or next(
        (c for c in [*IMAGE_COLUMN_CANDIDATES, *columns] if c in features and is_image(c)), None
    )
    if image is None:
        raise ColumnDetectionError(
            f"The dataset has no image column (an Image feature); its columns are {columns}. "
            "Name it with --image-column."
        )
    candidates = [c for c in LABEL_COLUMN_CANDIDATES if c in features]
    label = check_given(label_column, "label") or next(
        (c for c in [*candidates, *columns] if is_class_label(c)), None
    ) or next((c for c in candidates if is_integer(c)), None)
    if label is None:
        raise ColumnDetectionError(
            f"The dataset has no label column (a ClassLabel or an integer column named like "
            f"{LABEL_COLUMN_CANDIDATES[:3]}); its columns are {columns}. Name it with --label-column."
        )
    return image, label


def choose_splits(available: list[str], train_split: str | None, eval_split: str | None) -> tuple[str, str]:
    """The training and evaluation split names: the given ones, else ``train`` and the first of
    :data:`EVAL_SPLIT_CANDIDATES` that exists."""
    for given in (train_split, eval_split):
        if given is not None and given not in available:
            raise InputError(f"split {given!r} is not in the dataset; its splits are {available}")
    train = train_split or ("train" if "train" in available else None)
    evaluation = eval_split or next((s for s in EVAL_SPLIT_CANDIDATES if s in available), None)
    if train is None or evaluation is None:
        raise InputError(
            f"Cannot tell the training and evaluation splits apart among {available}; "
            "name them with --train-split and --eval-split."
        )
    return train, evaluation


def balanced_subset_indices(labels, n: int, seed: int = 0) -> list[int]:
    """Indices of a deterministic, class-balanced subset of ``n`` examples.

    Each class gets ``n // num_classes`` examples, and the first ``n % num_classes`` classes (in
    label order) one more, drawn without replacement by a generator seeded with ``seed``. The
    indices are returned sorted, so the subset keeps the dataset's order.
    """
    labels = np.asarray(labels)
    if n > len(labels):
        raise InputError(f"asked for a subset of {n} examples from a split of {len(labels)}")
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for rank, cls in enumerate(classes):
        wanted = n // len(classes) + (1 if rank < n % len(classes) else 0)
        members = np.flatnonzero(labels == cls)
        if wanted > len(members):
            raise InputError(f"class {cls} has {len(members)} examples, fewer than the {wanted} a balanced subset of {n} needs")
        chosen.append(rng.permutation(members)[:wanted])
    return sorted(np.concatenate(chosen).tolist())


@dataclasses.dataclass
class ImageClassificationData:
    """The training and evaluation splits: datasets that yield ``{"image", "label"}`` tensors, or
    a streamed training split (:mod:`cure_hub.streaming`) and its batch maker."""

    train: "datasets.Dataset | datasets.IterableDataset"
    eval: "datasets.Dataset"
    class_names: list[str]
    image_size: int
    name: str
    #: the split evaluated on (``held_out``: examples held out of the training split)
    eval_split: str = "test"
    #: examples in the training split (``None``: a stream that does not declare its size)
    train_examples: int | None = None
    #: examples to a batch of tensors (default: :func:`collate`)
    train_collate: Callable | None = None

    def __post_init__(self):
        if self.train_examples is None and hasattr(self.train, "__len__"):
            self.train_examples = len(self.train)
        self.train_collate = self.train_collate or collate

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_data(config: DataConfig) -> ImageClassificationData:
    """Load, detect columns and splits, check the labels of both splits against the training
    classes, take subsets, and set the tensor transform."""
    splits = _load_splits(config)
    train_name, eval_name = choose_splits(list(splits), config.train_split, config.eval_split or _held_out(config))
    image_col, label_col = detect_columns(splits[train_name].features, config.image_column, config.label_column)
    class_names = _class_names(splits[train_name], label_col)
    prepared = {}
    for split, subset, flag, crop_pct in ((train_name, config.train_subset, "--train-subset", 1.0),  # augmentation crops later
                                          (eval_name, config.eval_subset, "--eval-subset", config.crop_pct or 1.0)):
        transform = _ToTensors(image_col, label_col, config.image_size, crop_pct)
        prepared[split], _ = _prepare_split(splits[split], split, label_col, len(class_names), subset, flag, config.subset_seed, transform)
    train = prepared[train_name]
    if config.image_size is None:
        _check_one_image_size(train, train_name)
    return ImageClassificationData(
        train=train,
        eval=prepared[eval_name],
        class_names=class_names,
        image_size=config.image_size or train[0]["image"].shape[-1],
        name=config.dataset,
        eval_split=eval_name,
    )


class EvalSplit(NamedTuple):
    dataset: Any
    split: str
    class_names: list[str]
    #: examples in the whole split, of which ``dataset`` may be a subset
    split_size: int
    #: the position in the whole split of each example of ``dataset``
    split_indices: list[int]


def load_eval_split(config: DataConfig, n_examples: int | None = None) -> EvalSplit:
    """One split for evaluation (``config.eval_split``, else test / validation): a deterministic,
    class-balanced subset of ``n_examples`` when given."""
    splits = _load_splits(config)
    split = config.eval_split or _held_out(config) or next((s for s in EVAL_SPLIT_CANDIDATES if s in splits), None)
    if split not in splits:
        raise InputError(f"no evaluation split {split!r}; the dataset's splits are {list(splits)} (set --split)")
    image_col, label_col = detect_columns(splits[split].features, config.image_column, config.label_column)
    transform = _ToTensors(image_col, label_col, config.image_size, config.crop_pct or 1.0)
    class_names = _class_names(splits[split], label_col)
    dataset, indices = _prepare_split(splits[split], split, label_col, len(class_names), n_examples, "--n-examples", config.subset_seed, transform)
    if config.image_size is None:
        _check_one_image_size(dataset, split)
    return EvalSplit(dataset, split, class_names, len(splits[split]), indices)


def dataset_class_names(name: str, label_column: str | None = None) -> list[str]:
    """The class names of dataset ``name`` (a Hub id, folder or packaged name), in label order,
    read from its first split without preparing it."""
    split = next(iter(load_dataset_dict(name).values()))
    _, label_column = detect_columns(split.features, None, label_column)
    return _class_names(split, label_column)


def _load_splits(config: DataConfig) -> dict:
    """The dataset's splits; with ``eval_split_fraction``, its training split and the part held out
    of it (stratified by class where the labels are a ClassLabel, the same for the same seed)."""
    import datasets

    splits = load_dataset_dict(config.dataset, config.dataset_config)
    if not config.eval_split_fraction:
        return splits
    train_name = config.train_split or "train"
    if train_name not in splits:
        raise InputError(f"no training split {train_name!r} to hold a part out of; the splits are {list(splits)} (set --train-split)")
    train = splits[train_name]
    _, label_column = detect_columns(train.features, config.image_column, config.label_column)
    stratify = label_column if isinstance(train.features[label_column], datasets.ClassLabel) else None
    parts = train.train_test_split(test_size=config.eval_split_fraction, seed=config.subset_seed, stratify_by_column=stratify)
    return {train_name: parts["train"], HELD_OUT_SPLIT: parts["test"]}


def _held_out(config: DataConfig) -> str | None:
    return HELD_OUT_SPLIT if config.eval_split_fraction else None


def _prepare_split(dataset, split: str, label_column: str, num_classes: int, subset: int | None, subset_flag: str, seed: int, transform):
    """Check the split's labels, take its subset, set its transform. Returns the prepared split
    and the positions of its examples in the whole split."""
    if len(dataset) == 0:
        raise InputError(f"the {split} split is empty; choose another split")
    labels = np.asarray(dataset[label_column])
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        values, counts = np.unique(outside, return_counts=True)
        found = ", ".join(f"{v} ({c}x)" for v, c in zip(values[:5].tolist(), counts[:5].tolist()))
        raise InputError(
            f"the {split} split has {len(outside)} labels outside the {num_classes} training classes: {found}. "
            "An unlabelled split (label -1)? Name a labelled one with --eval-split (or --split)."
        )
    dataset = transform.undecoded(dataset)
    if subset:
        if subset > len(labels):
            raise InputError(f"{subset_flag} {subset} is larger than the {split} split ({len(labels)} examples)")
        indices = balanced_subset_indices(labels, subset, seed)
        return dataset.select(indices).with_transform(transform), indices
    return dataset.with_transform(transform), list(range(len(dataset)))


def _class_names(dataset, label_column: str) -> list[str]:
    """A ClassLabel's names, else ``"0" ... str(max label)``, with a warning for classes that
    are (nearly) empty: a stray label silently makes an extra output class."""
    import datasets

    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    labels = np.asarray(dataset[label_column])
    if len(labels) == 0:
        raise InputError(f"the label column {label_column!r} is empty")
    counts = np.bincount(labels[labels >= 0])
    rare = np.flatnonzero(counts * 100 < counts.max())
    if len(rare):
        logger.warning(
            "label(s) %s have %s examples against %d for the largest class: each becomes an output class. "
            "A stray label? Remove it, or name the classes with a ClassLabel feature.",
            rare[:5].tolist(), counts[rare[:5]].tolist(), counts.max(),
        )
    return [str(i) for i in range(len(counts))]


def _check_one_image_size(dataset, split: str, sample: int = 32) -> None:
    """Images of one size, judged on a sample spread over the split (batches must stack)."""
    positions = np.linspace(0, len(dataset) - 1, num=min(sample, len(dataset))).round().astype(int).tolist()
    sizes = {tuple(dataset[i]["image"].shape[-2:]) for i in dict.fromkeys(positions)}
    if len(sizes) > 1:
        raise InputError(f"the {split} split has images of different sizes {sorted(sizes)[:3]}: set --image-size to resize them")


#: Integer modes of more than 8 bits (16-bit PNGs open as "I;16", or as "I" in older Pillow): PIL's
#: own conversion to RGB clips them at 255, which leaves most such images blank.
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB: 16-bit grey levels scaled to 8 bits (x / 257, rounded) rather than
    clipped; an image whose values fit no 8- or 16-bit range (floats, 32-bit integers) is refused."""
    if img.mode in _HIGH_BIT_DEPTH_MODES:
        values = np.asarray(img, dtype=np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise InputError(f"an image of mode {img.mode!r} holds values in [{values.min()}, {values.max()}], outside "
                             "16 bits: convert the dataset's images to 8 or 16 bits per channel")
        img = Image.fromarray(np.rint(values / 257).astype(np.uint8))  # grey levels ("L")
    elif img.mode == "F":
        raise InputError("an image of mode 'F' (32-bit floats) has no range to scale from: convert the dataset's "
                         "images to 8 or 16 bits per channel")
    return img.convert("RGB")


def decode_image(value) -> Image.Image:
    """An image column's value (a file's path and bytes, or an image already decoded) as an image,
    decoded by the datasets library; a file that cannot be read (cut short, not an image) is
    refused naming it."""
    import datasets

    if isinstance(value, Image.Image):  # a stream's, decoded as it was read
        return value
    try:
        return datasets.Image().decode_example(value)
    except (OSError, SyntaxError, ValueError) as err:  # what Pillow raises for a damaged file
        raise InputError(f"cannot read {value.get('path') or 'an image stored in the dataset'}: {err}. "
                         "Remove or replace the file") from err


class _ToTensors:
    """Batched transform: images to uint8 CHW RGB tensors of ``image_size`` (when given), labels to
    ints. An image larger than ``image_size`` is resized to a shortest edge of ``image_size /
    crop_pct`` and centre-cropped, as timm's and transformers' evaluation transforms do; a smaller
    one (CIFAR's 32 px for a 224-px model) is resized whole: it has no border to spare. Images
    are decoded here (:func:`decode_image`), where a damaged file can be named."""

    def __init__(self, image_column: str, label_column: str, image_size: int | None, crop_pct: float = 1.0):
        self.image_column, self.label_column = image_column, label_column
        self.image_size, self.crop_pct = image_size, crop_pct

    def undecoded(self, dataset):
        """``dataset`` with its images left as files (path and bytes) for this transform to decode."""
        import datasets

        return dataset.cast_column(self.image_column, datasets.Image(decode=False))

    def __call__(self, batch: dict) -> dict:
        images = []
        for value in batch[self.image_column]:
            img = to_rgb(decode_image(value))
            size = self.image_size
            if size and min(img.size) > size:
                scale = size / self.crop_pct / min(img.size)
                img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), resample=2)
                left, top = (img.width - size) // 2, (img.height - size) // 2
                img = img.crop((left, top, left + size, top + size))
            elif size and img.size != (size, size):
                img = img.resize((size, size), resample=2)  # bilinear
            images.append(torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1))
        return {"image": images, "label": list(batch[self.label_column])}


def collate(examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack examples into ``(images in [0, 1] as float32, labels as int64)``."""
    shapes = {tuple(e["image"].shape) for e in examples}
    if len(shapes) > 1:
        raise InputError(f"images of different sizes in one batch {sorted(shapes)[:3]}...; set --image-size to resize them")
    images = torch.stack([e["image"] for e in examples]).float().div_(255.0)
    labels = torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)
    return images, labels


def random_resized_crop_flip(images: torch.Tensor, generator: torch.Generator, scale=(0.08, 1.0),
                             ratio=(3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """The usual ImageNet training augmentation, batched on ``images``' device: per image, a crop
    covering a fraction ``scale`` of its area with aspect ratio in ``ratio`` (log-uniform), drawn as
    torchvision's RandomResizedCrop draws it (``attempts`` tries, else the whole image), resized
    back to the image's size (bilinear), then flipped with probability 1/2. Every draw comes from
    ``generator``, so a resumed run repeats it."""
    n, _, h, w = images.shape
    device = images.device

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(shape, generator=generator, device=device)

    area = uniform(scale[0], scale[1], n, attempts)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1]), n, attempts))
    crop_w, crop_h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)  # fractions of the width and height
    fits = (crop_w <= 1) & (crop_h <= 1)
    first = torch.where(fits.any(1), fits.float().argmax(1), 0)
    pick = torch.arange(n, device=device)
    whole = ~fits.any(1)
    crop_w = torch.where(whole, 1.0, crop_w[pick, first])
    crop_h = torch.where(whole, 1.0, crop_h[pick, first])
    centre_x = uniform(0, 1, n) * (1 - crop_w) + crop_w / 2
    centre_y = uniform(0, 1, n) * (1 - crop_h) + crop_h / 2
    flip = torch.where(uniform(0, 1, n) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)  # output grid [-1, 1] -> the crop in the input
    theta[:, 0, 0], theta[:, 0, 2] = crop_w * flip, 2 * centre_x - 1
    theta[:, 1, 1], theta[:, 1, 2] = crop_h, 2 * centre_y - 1
    grid = F.affine_grid(theta.to(images.dtype), [n, images.shape[1], h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp_(0, 1)


def augmentation_for(policy: str, image_size: int) -> str:
    """The augmentation ``--augment auto`` means at this image size: CIFAR's for small images, the
    ImageNet one for large (a pretrained ViT's 224 px)."""
    return ("cifar" if image_size <= 64 else "imagenet") if policy == "auto" else policy


def augment(images: torch.Tensor, augmentation: str, generator: torch.Generator) -> torch.Tensor:
    """``images`` augmented by ``augmentation`` (``cifar``, ``imagenet`` or ``none``), drawing from
    ``generator``."""
    if augmentation == "cifar":
        return random_crop_flip(images, generator)
    if augmentation == "imagenet":
        return random_resized_crop_flip(images, generator)
    return images


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop after zero padding by ``padding`` pixels, then a horizontal flip with
    probability 1/2, drawn independently per image from ``generator`` (on ``images``' device)."""
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows, cols]
