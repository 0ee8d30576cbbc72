"""The named studies: each a list of runs that differ in one design switch and share the data,
the seeds and the token budget, plus the measures that study is about.

Every run is the default replica (configs/small.yaml) shrunk to a size whose run takes a few
minutes on 2 CPU cores (`STUDY_REPLICA`), with the study's own overrides on top; `--set` on
the command line changes every run of a study alike (a longer budget, a smaller test model).
"""

from __future__ import annotations

import dataclasses

HYBRID = ("linear_attention",) * 3 + ("full_attention",)

# One hybrid block (3 DeltaNet + 1 attention) of the default replica's width, 16 experts top-4.
STUDY_REPLICA = (
    "model.num_hidden_layers=4", "model.hidden_size=128", "model.num_experts=16",
    "model.moe_intermediate_size=64", "model.shared_expert_intermediate_size=128",
    "model.vocab_size=4096", "train.steps=150", "train.batch_size=8", "train.seq_len=256",
    "train.log_every=5", "train.eval_every=25", "train.eval_batches=4",
    "train.checkpoint_every=50", "train.keep_checkpoints=1",
)


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    question: str  # the design claim under test
    variants: dict[str, tuple[str, ...]]  # label -> overrides of this variant
    measures: tuple[str, ...]  # names in qnext_jax.experiments.measures.MEASURES
    overrides: tuple[str, ...] = ()  # every run of the study
    seeds: tuple[int, ...] = (0,)

    def runs(self, seeds: tuple[int, ...] | None = None):
        """(run name, label, seed, overrides) of every run, variant by variant."""
        for label, changes in self.variants.items():
            for seed in seeds or self.seeds:
                yield (f"{label}-seed{seed}", label, seed,
                       (*STUDY_REPLICA, *self.overrides, *changes, f"train.seed={seed}"))


def _layers(kind: tuple[str, ...]) -> str:
    return "model.layer_types=[" + ",".join(kind) + "]"


def _lbl_variants():
    variants = {}
    for experts in (16, 32, 64):
        for scope in ("global", "micro_batch", "sequence"):
            variants[f"{scope}-{experts}e"] = (f"loss.lbl_scope={scope}", f"model.num_experts={experts}")
    return variants


STUDIES = {study.name: study for study in (
    Study(
        "hybrid", "3 Gated DeltaNet : 1 gated attention beats all-attention and all-DeltaNet",
        {"hybrid_3to1": (_layers(HYBRID),),
         "all_attention": (_layers(("full_attention",) * 4),),
         "all_deltanet": (_layers(("linear_attention",) * 4),)},
        ("eval_loss", "eval_loss_at_equal_time", "tokens_per_sec"), seeds=(0, 1),
    ),
    Study(
        "lbl_scope", "with the global-batch balancing loss, more experts at a fixed top-4 keep "
        "lowering the loss, and the experts specialise without dying",
        _lbl_variants(), ("eval_loss", "load_entropy", "dead_experts"),
        # Four micro-batches of two rows: the micro-batch scope balances each pair of rows.
        overrides=("train.micro_batches=4",),
    ),
    Study(
        "output_gate", "the attention output gate removes attention sinks and massive activations",
        {"gated": ("model.attention_output_gate=true",),
         "plain": ("model.attention_output_gate=false",)},
        ("eval_loss", "first_token_attention", "max_activation"), seeds=(0, 1),
    ),
    Study(
        "norms", "zero-centred, weight-decayed norms keep the norm weights from growing",
        {"zero_centred_decayed": ("model.norm_style=zero_centred", "optimizer.decay_norm_weights=true"),
         "plain_undecayed": ("model.norm_style=plain", "optimizer.decay_norm_weights=false")},
        ("eval_loss", "norm_scale_max", "norm_scale_growth"), seeds=(0, 1),
    ),
    Study(
        "router_init", "the normalised router initialisation balances the experts from the start",
        {"normalised": ("model.router_init=normalised",), "plain": ("model.router_init=plain",)},
        ("eval_loss", "early_imbalance"), overrides=("train.log_every=1",), seeds=(0, 1),
    ),
)}
