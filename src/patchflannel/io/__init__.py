"""Image input: PNG, JPEG, TIFF and DICOM to a grey float32 array in [0, 1], detected by content."""

from patchflannel.io.readers import MAX_PIXELS, MIN_SIDE, content_hash, read_image, read_image_with_meta

__all__ = ["MAX_PIXELS", "MIN_SIDE", "content_hash", "read_image", "read_image_with_meta"]
