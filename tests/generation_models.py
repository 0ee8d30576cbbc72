"""Small models for the generation tests (the draftable one lives in the package, for the
benchmarks too)."""

from __future__ import annotations

from conftest import REPO_ROOT
from qnext_jax.config import ModelConfig
from qnext_jax.generate.draftable import draftable_model  # noqa: F401  (re-exported)


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig.from_yaml(REPO_ROOT / "configs" / "tiny.yaml").replace(**changes)
