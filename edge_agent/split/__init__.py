"""Split inference: the privacy policy, the pure planner (no I/O), and the code that drives hops."""
