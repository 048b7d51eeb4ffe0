"""The pipeline's stages: inputs from the store, outputs back to it, skipped when done."""
