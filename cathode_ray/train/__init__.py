"""Train stage: one member's loop (pure torch, :mod:`.loop`) and the Ray Train ensemble
(:mod:`.ray_ensemble`)."""
