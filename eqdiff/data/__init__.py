"""Subject photos in: images, datasets, preprocessing and masks."""
