"""The named studies: each a list of runs that differ in one design switch and share the data,
the seeds and the token budget, plus the measures that study is about.

Every run is the default replica (configs/small.yaml) shrunk to a size whose run takes a few
minutes on 2 CPU cores (`STUDY_REPLICA`), with the study's own overrides on top; `--set` on
the command line changes every run of a study alike (a longer budget, a smaller test model).
"""

from __future__ import annotations

import dataclasses

from qnext_jax.config import ConfigError
from qnext_jax.experiments.measures import COLUMNS

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
    measures: tuple[str, ...]  # names in qnext_jax.experiments.measures.COLUMNS
    overrides: tuple[str, ...] = ()  # every run of the study
    seeds: tuple[int, ...] = (0,)
    # (variant, baseline) pairs the report compares; default: every variant against the
    # first, the released design.
    comparisons: tuple[tuple[str, str], ...] = ()
    # label -> (line, x): the plot adds the final eval loss against `grid_axis`, one line each.
    grid: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    grid_axis: str = ""

    def __post_init__(self):
        unknown = [m for m in self.measures if m not in COLUMNS]
        if unknown:
            raise ConfigError(f"study {self.name}: no measure {unknown[0]!r}; the measures are "
                              f"{sorted(COLUMNS)}")
        named = {label for pair in self.comparisons for label in pair}
        if named - set(self.variants):
            raise ConfigError(f"study {self.name} compares {sorted(named - set(self.variants))}, "
                              f"which are not among its variants {list(self.variants)}")

    def pairs(self) -> tuple[tuple[str, str], ...]:
        first, *rest = self.variants
        return self.comparisons or tuple((label, first) for label in rest)

    def runs(self, seeds: tuple[int, ...] | None = None):
        """(run name, label, seed, overrides) of every run, variant by variant."""
        for label, changes in self.variants.items():
            for seed in seeds or self.seeds:
                yield (f"{label}-seed{seed}", label, seed,
                       (*STUDY_REPLICA, *self.overrides, *changes, f"train.seed={seed}"))


def _layers(kind: tuple[str, ...]) -> str:
    return "model.layer_types=[" + ",".join(kind) + "]"


LBL_SCOPES, LBL_EXPERTS = ("global", "global_running", "micro_batch", "sequence"), (16, 32, 64)


def _lbl_variants():
    return {f"{scope}-{experts}e": (f"loss.lbl_scope={scope}", f"model.num_experts={experts}")
            for experts in LBL_EXPERTS for scope in LBL_SCOPES}


def _lbl_comparisons():
    """Each scope against the global one at the same expert count, then each expert count
    against the next smaller one under the same scope."""
    pairs = [(f"{scope}-{e}e", f"global-{e}e") for e in LBL_EXPERTS for scope in LBL_SCOPES[1:]]
    pairs += [(f"{scope}-{more}e", f"{scope}-{fewer}e") for scope in LBL_SCOPES
              for fewer, more in zip(LBL_EXPERTS, LBL_EXPERTS[1:])]
    return tuple(pairs)


STUDIES = {study.name: study for study in (
    Study(
        "hybrid", "3 Gated DeltaNet : 1 gated attention beats all-attention and all-DeltaNet",
        {"hybrid_3to1": (_layers(HYBRID),),
         "all_attention": (_layers(("full_attention",) * 4),),
         "all_deltanet": (_layers(("linear_attention",) * 4),)},
        ("eval_loss", "eval_loss_at_equal_time", "tokens_per_sec"), seeds=(0, 1),
    ),
    Study(
        "output_gate", "the attention output gate removes attention sinks and massive activations",
        {"gated": ("model.attention_output_gate=true",),
         "plain": ("model.attention_output_gate=false",)},
        ("eval_loss", "first_token_attention", "max_activation"), seeds=(0, 1),
    ),
    Study(
        "norms", "zero-centred, weight-decayed norms keep the norm weights from growing",
        # The released pair against plain undecayed norms, and each switch alone.
        {"zero_centred_decayed": ("model.norm_style=zero_centred", "optimizer.decay_norm_weights=true"),
         "plain_undecayed": ("model.norm_style=plain", "optimizer.decay_norm_weights=false"),
         "zero_centred_undecayed": ("model.norm_style=zero_centred",
                                    "optimizer.decay_norm_weights=false"),
         "plain_decayed": ("model.norm_style=plain", "optimizer.decay_norm_weights=true")},
        ("eval_loss", "norm_scale_max", "norm_scale_growth"), seeds=(0, 1),
    ),
    Study(
        "router_init", "the normalised router initialisation balances the experts from the start",
        {"normalised": ("model.router_init=normalised",), "plain": ("model.router_init=plain",)},
        ("eval_loss", "early_imbalance"), overrides=("train.log_every=1",), seeds=(0, 1),
    ),
    Study(
        "lbl_scope", "with the global-batch balancing loss, more experts at a fixed top-4 keep "
        "lowering the loss, and keep every expert in use",
        _lbl_variants(), ("eval_loss", "load_entropy", "dead_experts"),
        # Four micro-batches of two rows: the micro-batch scope balances each pair of rows.
        overrides=("train.micro_batches=4",), seeds=(0, 1), comparisons=_lbl_comparisons(),
        grid={f"{scope}-{e}e": (scope, e) for e in LBL_EXPERTS for scope in LBL_SCOPES},
        grid_axis="experts (top-4)",
    ),
)}
