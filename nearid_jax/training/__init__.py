"""Training the MAP head: state, step and loop (train), the frozen tower's
tokens computed once (feature_cache), preemption and the metric log."""
