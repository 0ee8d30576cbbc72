"""Small-replica studies of the Qwen3-Next design claims: `python -m qnext_jax.experiments NAME`
(see studies.py for the list and __main__.py for the options)."""
