"""Opening an image the way every image-text path here does: a path, bytes (a datasets Image column read without
decoding) or a PIL image, as RGB."""

from __future__ import annotations


def open_image(reference):
    import io

    from PIL import Image

    if isinstance(reference, (bytes, bytearray)):
        reference = io.BytesIO(reference)
    image = reference if isinstance(reference, Image.Image) else Image.open(reference)
    return image.convert("RGB")
