"""Planning a run for hardware that need not be here: the train step traced on an abstract mesh
(trace), compiled by the target's own compiler (compiler, targets), judged against the device's
memory (planner) and printed (report; `python -m qnext_jax.plan`)."""
