"""Mesh construction and the logical-axis table: sizes, -1, clear errors for impossible meshes,
and the 80B train step lowered on a 64-device abstract mesh."""

import pytest
from jax.sharding import AxisType, PartitionSpec as P

from conftest import REPO_ROOT
from qnext_jax.config import ConfigError, ModelConfig
from qnext_jax.parallel.axes import ShardingRules
from qnext_jax.parallel.mesh import MeshConfig, MeshError, make_abstract_mesh, make_mesh
from qnext_jax.plan.trace import lower_train_step, planned_trainer, state_bytes_per_device
from qnext_jax.train.step import check_batch_size, check_sequence_split


@pytest.fixture(scope="module")
def tiny():
    return ModelConfig.from_yaml(REPO_ROOT / "configs" / "tiny.yaml")


def test_minus_one_takes_the_remaining_devices():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, expert=2))
    assert dict(zip(mesh.axis_names, mesh.axis_sizes)) == {
        "data": 2, "fsdp": 2, "expert": 2, "sequence": 1, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 5
    assert MeshConfig.from_dict({"expert": 4, "tensor": 2, "fsdp": 1}).resolve(8)["data"] == 1


@pytest.mark.parametrize("build, message", [
    (lambda: MeshConfig(data=3, fsdp=1).resolve(8), "has 3 devices but 8 are available"),
    (lambda: MeshConfig(data=3, fsdp=-1).resolve(8), "fixed axes multiply to 3, which does not divide 8"),
    (lambda: MeshConfig(data=-1, fsdp=-1), "only one mesh axis may be -1"),
    (lambda: MeshConfig(tensor=0), "mesh.tensor must be a positive size or -1"),
    (lambda: MeshConfig.from_dict({"exprt": 2}), "unknown key mesh.exprt (did you mean 'expert'?)"),
])
def test_impossible_mesh_shapes(build, message):
    with pytest.raises(ConfigError) as error:
        build()
    assert message in str(error.value)


@pytest.mark.parametrize("mesh, changes, message", [
    (MeshConfig(fsdp=1, tensor=8), {}, "num_attention_heads = 4 is not divisible by mesh.tensor = 8"),
    (MeshConfig(fsdp=2, tensor=4), {"num_attention_heads": 8},
     "linear_num_key_heads = 2 is not divisible by mesh.tensor = 4"),
    (MeshConfig(fsdp=2, expert=4), {"num_experts": 6}, "num_experts = 6 is not divisible by mesh.expert = 4"),
    (MeshConfig(fsdp=8), {"hidden_size": 68}, "hidden_size = 68 is not divisible by mesh.fsdp = 8"),
        (MeshConfig(fsdp=2, sequence=2, expert=2), {"hidden_size": 36},
         "hidden_size = 36 is not divisible by mesh.fsdp x mesh.sequence x mesh.expert = "
         "2 x 2 x 2 = 8"),
])
def test_model_that_does_not_fit_the_mesh(tiny, mesh, changes, message):
    with pytest.raises(MeshError) as error:
        ShardingRules(tiny.replace(**changes), make_abstract_mesh(mesh, 8))
    assert message in str(error.value)


def test_batch_must_split_over_batch_axes():
    mesh = make_abstract_mesh(MeshConfig(data=2, fsdp=2, expert=2), 8)
    check_batch_size(16, 2, mesh)
    with pytest.raises(MeshError, match="global batch 6 must split into 1 micro-batches whose size "
                                        "is a multiple of the batch shards data\\*fsdp\\*expert = 8"):
        check_batch_size(6, 1, mesh)
    with pytest.raises(MeshError, match="global batch 16 must split into 4 micro-batches"):
        check_batch_size(16, 4, mesh)


def test_a_mesh_too_large_for_the_cpu_says_how_to_get_more_devices():
    with pytest.raises(MeshError, match="xla_force_host_platform_device_count=N"):
        make_mesh(MeshConfig(fsdp=1, sequence=16))


def test_sequence_must_split_over_sequence_shards(tiny):
    mesh = make_abstract_mesh(MeshConfig(fsdp=1, sequence=8), 8)
    check_sequence_split(64, mesh, tiny)
    with pytest.raises(MeshError, match="train.seq_len = 60 is not divisible by mesh.sequence = 8"):
        check_sequence_split(60, mesh, tiny)
    with pytest.raises(MeshError, match="leaves 2 tokens per shard, fewer than the DeltaNet conv "
                                        "needs from its neighbour"):
        check_sequence_split(16, mesh, tiny)


def test_kv_heads_replicate_when_tensor_exceeds_them(tiny):
    config = tiny.replace(num_attention_heads=8, linear_num_key_heads=4, linear_num_value_heads=8)
    rules = ShardingRules(config, make_abstract_mesh(MeshConfig(fsdp=2, tensor=4), 8))
    width = ("fsdp", "sequence", "expert")
    assert rules.spec(("embed", "kv_heads", "head_dim")) == P(width, None, None)
    assert rules.spec(("embed", "heads", "head_dim")) == P(width, "tensor", None)
    # The routed experts: experts on `expert`, their width on the rest.
    assert rules.spec(("experts", "embed", "mlp")) == P("expert", ("fsdp", "sequence"), "tensor")


def test_80b_step_lowers_on_a_64_device_abstract_mesh():
    config = ModelConfig.from_yaml(REPO_ROOT / "configs" / "qwen3_next_80b_a3b.yaml")
    trainer = planned_trainer(config, MeshConfig(fsdp=8, expert=8), 64)
    state_bytes = state_bytes_per_device(trainer)
    # fp32 params: 81.3B parameters / 64 devices would be 5.1 GB if everything were split 64
    # ways; the dense parts are split 8 ways (fsdp) and replicated over `expert`.
    assert 5.0e9 < state_bytes["params"] < 7.0e9
    assert state_bytes["optimizer"] == pytest.approx(2 * state_bytes["params"], rel=1e-3)
    text = lower_train_step(trainer, global_batch=64, sequence_length=256).as_text()
    assert "mhlo.num_partitions = 64" in text
    assert text.count("all_to_all") >= 4  # the expert-parallel dispatch and return, fwd and bwd


LAUNCHERS = {
    "explicit": {"JAX_COORDINATOR_ADDRESS": "host0:1234"},
    "slurm": {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
              "SLURM_PROCID": "1", "SLURM_LOCALID": "0"},
    "open_mpi": {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911",
                 "OMPI_COMM_WORLD_SIZE": "4"},
    "kubernetes": {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"},
    "cloud_tpu": {"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"},
}
SINGLE_TASK = [
    {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
     "SLURM_LOCALID": "0"},  # `srun -n 1` or a batch script outside srun
    {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "1"},
    {"KUBERNETES_SERVICE_HOST": "10.0.0.1"},  # a pod that is not part of an indexed job
    {"TPU_WORKER_HOSTNAMES": "localhost"},  # a single-host TPU VM
]
ALL_VARIABLES = {name for env in (*LAUNCHERS.values(), *SINGLE_TASK) for name in env}
ALL_VARIABLES.add("QNEXT_JAX_SINGLE_PROCESS")


@pytest.fixture
def kubernetes_installed(monkeypatch):
    import qnext_jax.parallel.distributed as distributed

    monkeypatch.setattr(distributed, "_installed", lambda module: module == "kubernetes")


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_multi_process_launchers_are_recognised(launcher, monkeypatch, kubernetes_installed):
    from qnext_jax.parallel.distributed import multi_process_environment

    for name in ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert multi_process_environment() is None
    for name, value in LAUNCHERS[launcher].items():
        monkeypatch.setenv(name, value)
    assert multi_process_environment() == launcher
    if launcher != "explicit":  # separate runs that a launcher's variables would join
        monkeypatch.setenv("QNEXT_JAX_SINGLE_PROCESS", "1")
        assert multi_process_environment() is None


@pytest.mark.parametrize("env", SINGLE_TASK)
def test_single_task_launchers_are_single_process_runs(env, monkeypatch, kubernetes_installed):
    from qnext_jax.parallel.distributed import multi_process_environment

    for name in ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert multi_process_environment() is None
