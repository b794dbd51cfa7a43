"""Export to serving formats (TensorFlow SavedModel)."""
