"""Ground-truth game worlds: simulators, tile sets (the model's prompt) and checkpoints."""
