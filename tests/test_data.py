import os
import subprocess
import sys
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from cure_hub.config import DataConfig, InputError, TrainConfig
from cure_hub.data import (
    ColumnDetectionError,
    balanced_subset_indices,
    choose_splits,
    collate,
    detect_columns,
    load_data,
    load_eval_split,
    augmentation_for,
    random_crop_flip,
    random_resized_crop_flip,
    to_rgb,
)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _synthetic(tmp_path, n=40, label_feature=None, image_column="picture", label_column="target", size=8):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    labels = [i % 4 for i in range(n)]
    features = datasets.Features({
        image_column: datasets.Image(),
        label_column: label_feature or datasets.ClassLabel(names=["w", "x", "y", "z"]),
        "caption": datasets.Value("string"),
    })
    table = datasets.Dataset.from_dict({image_column: images, label_column: labels, "caption": ["c"] * n}, features=features)
    folder = tmp_path / "synthetic"
    datasets.DatasetDict(train=table, validation=table.select(range(8))).save_to_disk(folder)
    return table, folder


def test_cifar10_columns_classes_and_tensors(cifar10_dir):
    data = load_data(DataConfig(dataset=cifar10_dir, train_subset=20, eval_subset=10))
    assert detect_columns(data.train.features) == ("img", "label")
    assert data.class_names == CIFAR10_NAMES and data.image_size == 32
    images, labels = collate([data.train[i] for i in range(5)])
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.5
    assert labels.dtype == torch.long
    assert sorted(Counter(data.eval[i]["label"] for i in range(10)).values()) == [1] * 10


def test_other_column_names_are_detected(tmp_path):
    table, _ = _synthetic(tmp_path)
    assert detect_columns(table.features) == ("picture", "target")


def test_integer_labels_without_classlabel(tmp_path):
    table, folder = _synthetic(tmp_path, label_feature=datasets.Value("int64"), label_column="labels")
    assert detect_columns(table.features) == ("picture", "labels")


def test_missing_columns_name_the_columns(tmp_path):
    table, _ = _synthetic(tmp_path, label_feature=datasets.Value("string"), label_column="name")
    with pytest.raises(ColumnDetectionError, match=r"no label column.*\['picture', 'name', 'caption'\].*--label-column"):
        detect_columns(table.features)
    text_only = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["a"])})
    with pytest.raises(ColumnDetectionError, match=r"no image column.*--image-column"):
        detect_columns(text_only)
    with pytest.raises(ColumnDetectionError, match="image column 'pixels' is not in the dataset"):
        detect_columns(table.features, image_column="pixels")


def test_local_folder_with_validation_split_and_resize(tmp_path):
    _, folder = _synthetic(tmp_path)
    data = load_data(DataConfig(dataset=str(folder), image_size=16))
    assert data.class_names == ["w", "x", "y", "z"] and len(data.eval) == 8 and data.image_size == 16
    assert data.train[0]["image"].shape == (3, 16, 16)


def test_split_selection_errors():
    assert choose_splits(["train", "validation"], None, None) == ("train", "validation")
    with pytest.raises(ValueError, match="split 'dev' is not in the dataset"):
        choose_splits(["train", "test"], None, "dev")
    with pytest.raises(ValueError, match="--train-split and --eval-split"):
        choose_splits(["a", "b"], None, None)


def test_balanced_subset_is_balanced_and_deterministic():
    labels = np.repeat(np.arange(10), 50)[np.random.default_rng(1).permutation(500)]
    first = balanced_subset_indices(labels, 43, seed=0)
    assert first == balanced_subset_indices(labels, 43, seed=0)
    assert first != balanced_subset_indices(labels, 43, seed=1)
    assert len(set(first)) == 43 and first == sorted(first)
    counts = Counter(labels[first].tolist())
    assert [counts[c] for c in range(10)] == [5, 5, 5] + [4] * 7
    scarce = np.array([0] * 10 + [1] * 3)
    with pytest.raises(ValueError, match="class 1 has 3 examples, fewer than the 4"):
        balanced_subset_indices(scarce, 8, seed=0)
    with pytest.raises(ValueError, match="subset of 600 examples from a split of 500"):
        balanced_subset_indices(labels, 600)


def test_packaged_digits_are_grey_converted_to_rgb():
    data = load_data(DataConfig(dataset="digits"))
    assert data.num_classes == 10 and data.image_size == 8 and len(data.train) + len(data.eval) == 1797
    image = data.train[0]["image"]
    assert image.shape == (3, 8, 8) and torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_digits_are_scikit_learns_without_importing_it(tmp_path):
    """The packaged digits are read from scikit-learn's file as load_digits reads them, in a
    process that never imports scikit-learn."""
    from sklearn.datasets import load_digits

    code = ("import sys, numpy as np; from cure_hub.data import _sklearn_digits; images, labels = _sklearn_digits(); "
            "assert 'sklearn' not in sys.modules; np.save(sys.argv[1], images); np.save(sys.argv[2], labels)")
    done = subprocess.run([sys.executable, "-c", code, "images.npy", "labels.npy"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    digits = load_digits()
    assert np.array_equal(np.load(tmp_path / "images.npy"), digits.images)
    assert np.array_equal(np.load(tmp_path / "labels.npy"), digits.target)


def test_unreachable_hub_dataset_says_how_to_use_a_local_copy():
    code = (
        "from cure_hub.data import load_dataset_dict, DatasetUnavailableError\n"
        "try:\n    load_dataset_dict('uoft-cs/cifar10')\n"
        "except DatasetUnavailableError as e:\n    print('OK', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("OK"), out.stderr
    assert "pass its local folder as --dataset" in out.stdout and "digits" in out.stdout


def test_collate_refuses_mixed_sizes():
    with pytest.raises(ValueError, match="--image-size"):
        collate([{"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "label": 0},
                 {"image": torch.zeros(3, 9, 9, dtype=torch.uint8), "label": 1}])


def test_random_crop_flip_is_a_padded_crop_or_its_mirror_and_reproducible():
    images = torch.rand(16, 3, 8, 8)
    out = random_crop_flip(images, torch.Generator().manual_seed(3), padding=2)
    assert torch.equal(out, random_crop_flip(images, torch.Generator().manual_seed(3), padding=2))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for i in range(16):
        windows = [padded[i, :, y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i], w.flip(-1)) for w in windows)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 0 < flips < 16


def test_random_resized_crop_flip_crops_resizes_and_flips_reproducibly():
    ramp = ((torch.arange(32) + 0.5) / 32).expand(8, 3, 32, 32).contiguous()  # value = x position
    whole = random_resized_crop_flip(ramp, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1))
    for image in whole:  # the whole image, as it was or mirrored
        assert torch.allclose(image, ramp[0], atol=1e-6) or torch.allclose(image, ramp[0].flip(-1), atol=1e-6)
    assert 0 < sum(bool(image[0, 0, 0] > image[0, 0, -1]) for image in whole) < 8
    quarter = random_resized_crop_flip(ramp, torch.Generator().manual_seed(1), scale=(0.25, 0.25), ratio=(1, 1))
    spans = (quarter[:, 0, 0].amax(1) - quarter[:, 0, 0].amin(1))
    assert torch.allclose(spans, torch.full((8,), 0.5 - 1 / 32), atol=1 / 32)  # half the width, resized to 32 px
    images = torch.rand(16, 3, 24, 24)
    out = random_resized_crop_flip(images, torch.Generator().manual_seed(3))
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, random_resized_crop_flip(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, random_resized_crop_flip(images, torch.Generator().manual_seed(4)))
    assert augmentation_for("auto", 32) == "cifar" and augmentation_for("auto", 224) == "imagenet"
    assert augmentation_for("none", 224) == "none"


def test_recipes_of_earlier_versions_keep_their_augmentation():
    assert TrainConfig.from_dict({"data": {"augment": False}}).data.augment == "none"
    assert TrainConfig.from_dict({"data": {"augment": True}}).data.augment == "auto"


def test_eval_split_fraction_holds_out_a_stratified_part_of_a_lone_train_split(tmp_path):
    from test_input_errors import write_dataset

    folder = write_dataset(tmp_path / "only-train", {"train": [0, 1] * 40})
    with pytest.raises(ValueError, match="Cannot tell the training and evaluation splits apart"):
        load_data(DataConfig(dataset=folder))
    data = load_data(DataConfig(dataset=folder, eval_split_fraction=0.25))
    assert len(data.train) == 60 and len(data.eval) == 20
    assert Counter(int(data.eval[i]["label"]) for i in range(20)) == {0: 10, 1: 10}  # stratified
    again = load_data(DataConfig(dataset=folder, eval_split_fraction=0.25))
    assert all(torch.equal(again.eval[i]["image"], data.eval[i]["image"]) for i in range(20))
    train_images = {data.train[i]["image"].numpy().tobytes() for i in range(60)}
    assert not any(data.eval[i]["image"].numpy().tobytes() in train_images for i in range(20))  # disjoint
    dataset, split, *_ = load_eval_split(DataConfig(dataset=folder, eval_split_fraction=0.25))
    assert split == "held_out" and all(torch.equal(dataset[i]["image"], data.eval[i]["image"]) for i in range(20))
    with pytest.raises(ValueError, match="do not name an eval_split as well"):
        DataConfig(dataset=folder, eval_split_fraction=0.25, eval_split="test")


def test_large_images_are_resized_and_centre_cropped_small_ones_resized_whole():
    """As timm's evaluation transform: shortest edge to size / crop_pct, then the centre; an image
    smaller than the size (CIFAR's 32 px for a 224-px model) keeps every pixel. Deterministic."""
    from PIL import Image

    from cure_hub.data import _ToTensors

    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))  # 100 wide, 60 high
    small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    transform = _ToTensors("image", "label", image_size=32, crop_pct=0.8)
    images = transform({"image": [wide, small, wide], "label": [0, 1, 0]})["image"]
    expected = np.array(wide.resize((67, 40), resample=2).crop((17, 4, 49, 36)))  # shortest edge 32 / 0.8 = 40
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), expected) and torch.equal(images[0], images[2])
    assert np.array_equal(images[1].permute(1, 2, 0).numpy(), np.array(small.resize((32, 32), resample=2)))
    whole_square = _ToTensors("image", "label", image_size=32)({"image": [wide], "label": [0]})["image"][0]
    assert np.array_equal(whole_square.permute(1, 2, 0).numpy(), np.array(wide.resize((53, 32), resample=2).crop((10, 0, 42, 32))))


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped_and_float_images_refused(tmp_path):
    """A folder of 16-bit grey PNGs (mode "I;16") became constant 255 through PIL's own conversion,
    and training went ahead on blank images. Each grey level v is now round(v / 257)."""
    rng = np.random.default_rng(0)
    levels = {}
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / "png16" / split / label).mkdir(parents=True)
            for index in range(4):
                values = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
                Image.fromarray(values).save(tmp_path / "png16" / split / label / f"{index}.png")
                levels[split, label, index] = values
    data = load_data(DataConfig(dataset=str(tmp_path / "png16")))
    assert Image.open(tmp_path / "png16" / "train" / "a" / "0.png").mode == "I;16"
    expected = sorted(np.rint(v / 257).astype(np.uint8).tobytes() for (split, _, _), v in levels.items() if split == "train")
    loaded = [example["image"] for example in data.train]
    assert all(torch.equal(image[0], image[2]) for image in loaded)
    assert sorted(image[0].numpy().tobytes() for image in loaded) == expected
    with pytest.raises(InputError, match="an image of mode 'F' \\(32-bit floats\\) has no range to scale from"):
        to_rgb(Image.fromarray(rng.random((8, 8), dtype=np.float32)))
    with pytest.raises(InputError, match="an image of mode 'I' holds values in \\[0, 70000\\], outside 16 bits"):
        to_rgb(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))


def test_an_image_file_cut_short_is_named_in_one_line(tmp_path, capsys):
    """A truncated JPEG in an image folder ended training in 28 frames naming no file: it is named,
    in one line, from the main process or from a loader worker."""
    from torch.utils.data import DataLoader

    from cure_hub.console import exit_code_of

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / "jpegs" / split / label).mkdir(parents=True)
            for index in range(4):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "jpegs" / split / label / f"{index}.jpg")
    cut = tmp_path / "jpegs" / "train" / "b" / "2.jpg"
    cut.write_bytes(cut.read_bytes()[:300])
    data = load_data(DataConfig(dataset=str(tmp_path / "jpegs"), image_size=16))
    capsys.readouterr()  # the datasets library's progress bars
    with pytest.raises(InputError, match=f"cannot read {cut}: .*Remove or replace the file"):
        [example["image"] for example in data.train]
    for workers in (0, 1):
        loader = DataLoader(data.train, batch_size=4, num_workers=workers, collate_fn=collate)
        assert exit_code_of("cure-hub train", lambda: len(list(loader))) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"cure-hub train: error: cannot read {cut}: ") and error.count("\n") == 1, error
