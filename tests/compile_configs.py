"""The small runs the compile tests build for real targets: one block of the hybrid (3 DeltaNet
+ 1 attention), bf16 compute, remat, MTP, the experts' dimensions in whole 128-wide tiles (the
shapes the Mosaic GPU grouped GEMM and the kernels' tilings take) and a dense expert buffer
that would be unmistakable ([8 experts, every routed row, ...])."""

from qnext_jax.train.run_config import build_run_config

MODEL = {
    "vocab_size": 1024, "hidden_size": 128, "num_hidden_layers": 4, "full_attention_interval": 4,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128,
    "partial_rotary_factor": 0.25, "rope_theta": 10000.0, "max_position_embeddings": 4096,
    "linear_num_key_heads": 1, "linear_num_value_heads": 2, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "num_experts": 8,
    "num_experts_per_tok": 2, "moe_intermediate_size": 128,
    "shared_expert_intermediate_size": 128, "intermediate_size": 256,
    "mtp_num_hidden_layers": 1, "mtp_depth": 1, "bos_token_id": None, "eos_token_id": None,
    "dtype": "bfloat16", "remat_policy": "full",
}


def compile_run(mesh: dict, batch_size: int, seq_len: int, **model):
    return build_run_config({"model": {**MODEL, **model}, "mesh": mesh,
                             "train": {"batch_size": batch_size, "seq_len": seq_len}})
