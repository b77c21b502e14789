"""Training data larger than memory: a streamed training split (``--streaming``).

The training split is a ``datasets.IterableDataset``, never held whole: shuffled through a buffer
of ``shuffle_buffer`` examples (seeded, and reshuffled every epoch by ``set_epoch``), split across
processes by ``datasets.distributed.split_dataset_by_node`` (whole shards per process where their
number divides evenly, else every n-th example), and decoded in the loader's ``num_workers``
worker processes (as many as the split has shards; datasets stops the others).

A stream's order is a function of the seed and the epoch alone, so a run resumed in the middle of
an epoch replays that epoch's stream and drops the batches it already trained on: exactly the
batches an uninterrupted run would see next (the dropped ones are read and decoded again, not
trained on). Processes agree before every optimiser step's batches that each of them has them:
shards seldom hold equal numbers of examples, and an epoch ends for every process when one runs
out, rather than leaving the others waiting in a collective.

The evaluation subset is small by nature: the evaluation split's first ``eval_subset`` examples
(:data:`STREAMED_EVAL_EXAMPLES` when unset) are read into memory and used as a loaded split is.
"""

from __future__ import annotations

import itertools
import logging
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from .config import DataConfig, InputError
from .data import ImageClassificationData, _ToTensors, _prepare_split, choose_splits, collate, detect_columns, load_dataset_dict

logger = logging.getLogger(__name__)

#: Evaluation examples read from the stream when ``eval_subset`` is unset.
STREAMED_EVAL_EXAMPLES = 1000


def load_streamed_data(config: DataConfig, process_index: int = 0, num_processes: int = 1) -> ImageClassificationData:
    """The training split as this process's shuffled stream, the evaluation subset in memory.
    ``train_examples`` is the whole split's size where the dataset declares it, else ``None``."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    splits = load_dataset_dict(config.dataset, config.dataset_config, streaming=True)
    train_name, eval_name = choose_splits(list(splits), config.train_split, config.eval_split)
    train = splits[train_name]
    if train.features is None:
        raise InputError(
            f"the streamed dataset {config.dataset!r} does not declare its features, so its image and label columns "
            "cannot be found without reading it: use a dataset whose files carry their schema (parquet, or a card "
            "with dataset_info), or load it without --streaming"
        )
    image_column, label_column = detect_columns(train.features, config.image_column, config.label_column)
    feature = train.features[label_column]
    if not isinstance(feature, datasets.ClassLabel):
        raise InputError(
            f"the streamed label column {label_column!r} is a {type(feature).__name__}, not a ClassLabel: the classes "
            "of a stream cannot be counted without reading all of it. Cast the column to a ClassLabel (its names), "
            "or load the dataset without --streaming"
        )
    class_names = list(feature.names)
    to_tensors = _ToTensors(image_column, label_column, config.image_size, config.crop_pct or 1.0)
    wanted = config.eval_subset or STREAMED_EVAL_EXAMPLES
    head = list(splits[eval_name].take(wanted))
    if not head:
        raise InputError(f"the {eval_name} split is empty; choose another split")
    evaluation, _ = _prepare_split(datasets.Dataset.from_list(head, features=splits[eval_name].features), eval_name,
                                   label_column, len(class_names), None, "--eval-subset", config.subset_seed, to_tensors)
    first = next(iter(train.take(1)), None)
    if first is None:
        raise InputError(f"the {train_name} split is empty; choose another split")
    image_size = config.image_size or to_tensors({image_column: [first[image_column]], label_column: [0]})["image"][0].shape[-1]
    stream = to_tensors.undecoded(train).shuffle(seed=config.subset_seed, buffer_size=config.shuffle_buffer)
    stream = split_dataset_by_node(stream, rank=process_index, world_size=num_processes)
    info = train.info.splits.get(train_name) if train.info and train.info.splits else None
    logger.info("streaming %s/%s (%s examples, %d shards) through a buffer of %d; evaluating on the first %d of %s",
                config.dataset, train_name, info.num_examples if info else "an unknown number of", train.num_shards,
                config.shuffle_buffer, len(evaluation), eval_name)
    return ImageClassificationData(train=stream, eval=evaluation, class_names=class_names, image_size=image_size,
                                   name=config.dataset, eval_split=eval_name, train_examples=info.num_examples if info else None,
                                   train_collate=StreamCollate(to_tensors, len(class_names)))


class StreamCollate:
    """Raw examples of a stream (decoded PIL images) to a batch of tensors, in the loader's
    workers; labels outside the classes are refused here, where a loaded split checks them up front."""

    def __init__(self, to_tensors: _ToTensors, num_classes: int):
        self.to_tensors, self.num_classes = to_tensors, num_classes

    def __call__(self, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        columns = (self.to_tensors.image_column, self.to_tensors.label_column)
        tensors = self.to_tensors({column: [example[column] for example in examples] for column in columns})
        images, labels = collate([{"image": i, "label": y} for i, y in zip(tensors["image"], tensors["label"])])
        outside = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(outside):
            raise InputError(f"a streamed example has label {int(outside[0])}, outside the {self.num_classes} classes")
        return images, labels


class StreamedEpochs:
    """Each epoch's batches of this process's stream, on ``device``, in groups of ``group`` (the
    batches of one optimiser step) that every process has."""

    def __init__(self, data: ImageClassificationData, batch_size: int, group: int, num_workers: int, seed: int,
                 accelerator):
        self.data, self.batch_size, self.group = data, batch_size, group
        self.num_workers, self.seed, self.accelerator = num_workers, seed, accelerator

    @property
    def batches_per_process(self) -> int | None:
        """Batches each process gets in an epoch, when the split declares its size (a process
        given whole shards may get fewer: the epoch then ends earlier, for every process)."""
        total = self.data.train_examples
        return None if total is None else total // self.accelerator.num_processes // self.batch_size

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Epoch ``epoch``'s batches after the first ``skip`` (a resumed run's)."""
        self.data.train.set_epoch(epoch)
        # Its own generator: the loader's seed draw leaves the global random state alone.
        loader = DataLoader(self.data.train, batch_size=self.batch_size, collate_fn=self.data.train_collate, drop_last=True,
                            num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed))
        batches = iter(loader)
        for _ in itertools.islice(batches, skip):
            pass
        device = self.accelerator.device
        while True:
            group = list(itertools.islice(batches, self.group))
            if not self._everyone_has(len(group) == self.group):
                return
            for images, labels in group:
                yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    def _everyone_has(self, has: bool) -> bool:
        """One all-reduce, as the trainer agrees on divergence and stops."""
        if self.accelerator.num_processes == 1:
            return has
        missing = torch.tensor(float(not has), device=self.accelerator.device)
        return self.accelerator.reduce(missing, reduction="sum").item() == 0
