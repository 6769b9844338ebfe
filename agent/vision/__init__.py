"""Per-task vision steps around the model: turning camera frames into model inputs, and back."""
