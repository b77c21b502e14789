"""What a transformers image processor does to colours, found by asking it.

Processors differ in more than a mean and a std: EfficientNet's divides by the std twice
(``include_top``), MobileViT's reverses RGB to BGR and does not normalise, PP-LCNet's mean and std
are in BGR order, and the next model type will have an option of its own. Reading options one by
one misses the next one; feeding the processor images of known colour does not. Every processor
maps each output channel as ``a * x + b`` of one input channel (x in [0, 1]), so four single-colour
images give its exact map, and a fifth checks that it is one.

:class:`cure_hub.RobustClassifier` applies that map inside the model (``channel_order``, ``mean``,
``std`` of its :class:`~cure_hub.models.ModelSpec`); exports get a processor that is checked to
apply the same one, so ``pipeline()`` feeds an export the pixels it was trained on.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

#: Channel orders a backbone may expect; mean and std are given in that order.
CHANNEL_ORDERS = ("RGB", "BGR")
#: A colour that is neither black nor a primary: the map must predict it too.
_CHECK_COLOUR = (37, 150, 222)
_TOLERANCE = 1e-3


class UnsupportedProcessorError(ValueError):
    """The processor does not map colours channel by channel as ``a * x + b`` (or fails on RGB images)."""


@dataclasses.dataclass(frozen=True)
class PixelMap:
    """``pixel_values[c] = (x[source(c)] - mean[c]) / std[c]`` for x in [0, 1], where ``source``
    is the identity for ``"RGB"`` and reverses the channels for ``"BGR"``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_order: str = "RGB"

    def matches(self, other: "PixelMap") -> bool:
        return self.channel_order == other.channel_order and np.allclose(
            self.mean + self.std, other.mean + other.std, rtol=_TOLERANCE, atol=_TOLERANCE)


def pixel_map(processor) -> PixelMap:
    """The colour map ``processor`` applies to an RGB PIL image, read off its output."""
    black = _centre_pixel(processor, (0, 0, 0))
    # responses[j, c]: how output channel c moves when input channel j goes from 0 to 1.
    responses = np.stack([_centre_pixel(processor, tuple(255 * (k == j) for k in range(3))) - black for j in range(3)])
    for order, source in (("RGB", [0, 1, 2]), ("BGR", [2, 1, 0])):
        expected = np.zeros_like(responses)
        expected[source, [0, 1, 2]] = responses[source, [0, 1, 2]]
        if np.allclose(responses, expected, atol=_TOLERANCE) and np.all(np.abs(responses[source, [0, 1, 2]]) > _TOLERANCE):
            gains = responses[source, [0, 1, 2]]
            break
    else:
        raise UnsupportedProcessorError(f"{type(processor).__name__} mixes colour channels: responses {responses.round(3).tolist()}")
    check = np.array(_CHECK_COLOUR, dtype=np.float64)[source] / 255
    if not np.allclose(_centre_pixel(processor, _CHECK_COLOUR), gains * check + black, atol=_TOLERANCE):
        raise UnsupportedProcessorError(f"{type(processor).__name__} does not map colours as a * x + b")
    # Rounded: the probe runs in float32; "+ 0.0" turns -0.0 into 0.0.
    return PixelMap(mean=tuple(round(float(m), 6) + 0.0 for m in -black / gains),
                    std=tuple(round(float(s), 6) for s in 1 / gains), channel_order=order)


def _centre_pixel(processor, rgb: tuple[int, ...]) -> np.ndarray:
    """The processor's output at the centre of a 64x64 image of one colour (the centre, because a
    crop larger than the resized image pads the borders)."""
    from PIL import Image

    image = Image.fromarray(np.full((64, 64, 3), rgb, dtype=np.uint8))
    with torch.device("cpu"):  # the model may be being built on the meta device
        try:
            pixels = torch.as_tensor(processor(image, return_tensors="pt")["pixel_values"])[0]
        except Exception as err:  # processors that need more than an image (colour clusters, patches)
            raise UnsupportedProcessorError(f"{type(processor).__name__} cannot process an RGB image alone: {err}") from None
        if pixels.dim() != 3 or pixels.shape[0] != 3:
            raise UnsupportedProcessorError(f"{type(processor).__name__} returns pixel values of shape {tuple(pixels.shape)}")
        return pixels[:, pixels.shape[1] // 2, pixels.shape[2] // 2].double().numpy()


def processor_applying(processor, target: PixelMap, image_size: int):
    """``processor`` set to resize to ``image_size`` without cropping and to apply ``target``, or
    ``None`` when its options cannot express ``target`` (checked by :func:`pixel_map`)."""
    # In the processor's own size format: ConvNeXt's (also ResNet's and RegNet's) takes only a
    # shortest edge, and crops a crop_pct share of it, so crop_pct 1 keeps the whole image.
    if "shortest_edge" in (processor.size or {}):
        processor.size = {"shortest_edge": image_size}
    else:
        processor.size = {"height": image_size, "width": image_size}
    options = {"crop_pct": 1.0, "do_center_crop": False,  # the model saw whole images at its size
               "do_rescale": True, "rescale_factor": 1 / 255, "rescale_offset": False, "include_top": False,
               "do_normalize": True, "do_flip_channel_order": target.channel_order == "BGR"}
    for option, value in options.items():
        if hasattr(processor, option):
            setattr(processor, option, value)
    # A processor that reverses the channels may normalise before (PP-LCNet's) or after reversing.
    orders = (1, -1) if target.channel_order == "BGR" else (1,)
    for order in orders:
        processor.image_mean, processor.image_std = list(target.mean[::order]), list(target.std[::order])
        try:
            if pixel_map(processor).matches(target):
                return processor
        except UnsupportedProcessorError:
            return None
    return None
