"""The run configuration: YAML sections, dotted overrides, typed values, clear errors."""

import pytest

from conftest import REPO_ROOT
from qnext_jax.config import ConfigError
from qnext_jax.train.run_config import all_keys, load_run_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  preset: {REPO_ROOT / 'configs' / 'tiny.yaml'}\n  hidden_size: 32\n"
                    "optimizer:\n  learning_rate: 1.0e-3\n  warmup_steps: 1\ntrain:\n  steps: 5\n")
    config = load_run_config(path, ["mesh.expert=2", "optimizer.learning_rate=3e-4",
                                    "data.source=jsonl", "data.paths=[a.jsonl, b.jsonl]",
                                    "train.run_dir=null", "model.mlp_only_layers=[1]"])
    assert config.model.hidden_size == 32 and config.model.num_experts == 8  # preset + override
    assert config.mesh.expert == 2 and config.optimizer.learning_rate == pytest.approx(3e-4)
    assert config.data.paths == ("a.jsonl", "b.jsonl") and config.train.steps == 5
    assert config.model.mlp_only_layers == (1,) and config.train.run_dir is None
    assert config.optimizer.total_steps == 5  # the schedule spans the run by default
    assert load_run_config(None, []).to_dict()["train"]["steps"] == 1000
    # A preset given on the command line replaces the file's model; later model keys apply.
    tiny = load_run_config(path, [f"model.preset={REPO_ROOT / 'configs' / 'tiny.yaml'}",
                                  "model.num_hidden_layers=4"])
    assert tiny.model.hidden_size == 64 and tiny.model.num_hidden_layers == 4


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=3e-4", "unknown key optimizer.lr (did you mean optimizer.learning_rate?)"),
    ("train.step=3", "unknown key train.step (did you mean train.steps?)"),
    ("modle.hidden_size=3", "unknown section 'modle' in the command line (did you mean 'model'?)"),
    ("train.steps=abc", "train.steps = 'abc': expected int"),
    ("train.steps=1.5", "train.steps = 1.5: expected int"),
    ("mesh.expert=two", "mesh.expert = 'two': expected int"),
    ("train.export_hf=maybe", "train.export_hf = 'maybe': expected bool"),
    ("model.delta_rule_impl=fast", "model.delta_rule_impl = 'fast': expected Literal"),
    ("steps=3", "override 'steps=3' must look like section.key=value"),
    ("train.steps=0", "train.steps must be >= 1, got 0"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_run_config(None, [override])
    assert message in str(error.value)


def test_missing_file_and_key_listing(tmp_path):
    with pytest.raises(ConfigError, match="config file .*absent.yaml does not exist"):
        load_run_config(tmp_path / "absent.yaml")
    (tmp_path / "broken.yaml").write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_run_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- train\n")
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping, got list"):
        load_run_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match=r"override 'data.paths=\[a': '\[a' is not a valid YAML"):
        load_run_config(None, ["data.paths=[a"])
    keys = all_keys()
    assert keys["train.steps"] == 1000 and keys["mesh.fsdp"] == -1 and "model.preset" in keys
    small = all_keys(REPO_ROOT / "configs" / "small.yaml")
    assert small["model.hidden_size"] == 256 and small["model.num_experts"] == 32
    assert small["train.steps"] == 200 and small["optimizer.learning_rate"] == 2e-3
    assert small["optimizer.total_steps"] == "train.steps"


def test_a_resume_that_changes_the_trajectory_names_the_keys(tmp_path):
    """Only keys that change what the remaining steps compute are refused; the step count,
    the mesh, logging and the like may change; a derived key says what it follows."""
    from qnext_jax.train.run_dir import check_resume_config, write_config

    saved = load_run_config(None, ["train.steps=200"])
    write_config(tmp_path, saved.to_dict())
    free = load_run_config(None, ["train.steps=200", "mesh.expert=4", "train.log_every=1",
                                  "model.remat_policy=full"])
    logged = []
    check_resume_config(tmp_path, free.to_dict(), (), logged.append)
    assert logged == []
    extended = load_run_config(None, ["train.steps=400", "data.seed=1"])
    with pytest.raises(ConfigError) as refused:
        check_resume_config(tmp_path, extended.to_dict(), (), logged.append)
    message = str(refused.value)
    assert "data.seed: 0 -> 1\n" in message
    assert "optimizer.total_steps: 200 -> 400 (follows train.steps unless set)" in message
    assert "optimizer.warmup_steps: 20 -> 40 (follows optimizer.total_steps unless set)" in message
    assert "pass data.seed=0 optimizer.total_steps=200 optimizer.warmup_steps=20" in message
    accepted = ("data.seed", "optimizer.total_steps", "optimizer.warmup_steps")
    check_resume_config(tmp_path, extended.to_dict(), accepted, logged.append)
    assert logged[0] == "resuming with a changed data.seed: 0 -> 1 (accepted)" and len(logged) == 3
    with pytest.raises(ConfigError, match="names 'optimiser.total_steps', which is no key"):
        from qnext_jax.train.run_config import check_run_config

        check_run_config(load_run_config(None, ["train.accept_changes=[optimiser.total_steps]"]))


def test_with_a_capacity_factor_the_mesh_and_micro_batches_change_the_trajectory(tmp_path):
    """Which tokens overflow an expert depends on the tokens per device and micro-batch."""
    from qnext_jax.train.run_dir import trajectory_changes

    exact = ["loss.lbl_scope=global"]  # micro-batches alone change nothing under it
    dropless = load_run_config(None, exact).to_dict()
    assert trajectory_changes(dropless, load_run_config(None, [*exact, "mesh.expert=4",
                                                               "train.micro_batches=2"]).to_dict()) == {}
    capped = load_run_config(None, [*exact, "model.moe_capacity_factor=1.25"]).to_dict()
    changed = load_run_config(None, [*exact, "model.moe_capacity_factor=1.25", "mesh.expert=4",
                                     "train.micro_batches=2", "train.log_every=1"]).to_dict()
    assert set(trajectory_changes(capped, changed)) == {"mesh.expert", "train.micro_batches"}


@pytest.mark.parametrize("scope,changes", [("global", False), ("sequence", False),
                                           ("global_running", True), ("micro_batch", True)])
def test_micro_batches_change_the_trajectory_where_the_lbl_scope_depends_on_them(scope, changes):
    """The micro_batch scope balances each micro-batch, global_running the micro-batches seen
    so far: a different split is a different loss. The two global forms are one loss when the
    step has one micro-batch."""
    from qnext_jax.train.run_dir import trajectory_changes

    saved = load_run_config(None, [f"loss.lbl_scope={scope}"]).to_dict()
    resumed = load_run_config(None, [f"loss.lbl_scope={scope}", "train.micro_batches=2"]).to_dict()
    assert set(trajectory_changes(saved, resumed)) == ({"train.micro_batches"} if changes else set())
    exact = load_run_config(None, ["loss.lbl_scope=global"]).to_dict()
    running = load_run_config(None, ["loss.lbl_scope=global_running"]).to_dict()
    assert trajectory_changes(exact, running) == {}
    split = ["train.micro_batches=2"]
    assert set(trajectory_changes(load_run_config(None, ["loss.lbl_scope=global", *split]).to_dict(),
                                  load_run_config(None, split).to_dict())) == {"loss.lbl_scope"}


def test_keys_added_since_a_run_was_saved_count_only_when_not_default():
    from qnext_jax.train.run_dir import trajectory_changes

    current = load_run_config(None, []).to_dict()
    older = {section: dict(entries) for section, entries in current.items()}
    del older["loss"]["z_loss_weight"]  # as if the key did not exist when the run started
    assert trajectory_changes(older, current) == {}
    raised = load_run_config(None, ["loss.z_loss_weight=0.01"]).to_dict()
    assert set(trajectory_changes(older, raised)) == {"loss.z_loss_weight"}
    # A key whose earlier behaviour is not its default: runs saved before fp32 routing routed
    # in the compute dtype, which matters in a bf16 model only.
    bf16 = load_run_config(None, ["model.dtype=bfloat16"]).to_dict()
    older_bf16 = {section: dict(entries) for section, entries in bf16.items()}
    del older["model"]["router_dtype"], older_bf16["model"]["router_dtype"]
    assert trajectory_changes(older, current) == {}
    assert trajectory_changes(older_bf16, bf16) == {"model.router_dtype": ("compute", "float32")}


def test_a_preset_beside_init_from_hf_must_describe_the_checkpoint(monkeypatch, tmp_path):
    """configs/cpt_80b_*.yaml name the release's architecture as a preset and its numerics;
    with train.init_from_hf the checkpoint's config.json must agree with it."""
    import qnext_jax.train.run_config as run_config
    from qnext_jax.config import ModelConfig

    tiny = REPO_ROOT / "configs" / "tiny.yaml"
    checkpoint = ModelConfig.from_yaml(tiny).replace(dtype="bfloat16")
    monkeypatch.setattr(run_config, "hf_model_config", lambda directory: checkpoint)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  preset: {tiny}\n  remat_policy: full\n")
    config = load_run_config(recipe, [f"train.init_from_hf={tmp_path}"])
    assert config.model.remat_policy == "full" and config.model.dtype == "float32"  # the preset's
    assert config.model.hidden_size == checkpoint.hidden_size
    monkeypatch.setattr(run_config, "hf_model_config",
                        lambda directory: checkpoint.replace(num_experts=16, rope_theta=1e6))
    with pytest.raises(ConfigError, match=r"describe different models: num_experts 8 vs 16, "
                                          r"rope_theta 10000.0 vs 1000000.0"):
        load_run_config(recipe, [f"train.init_from_hf={tmp_path}"])


@pytest.mark.parametrize("recipe", ["cpt_80b_h100x64.yaml", "cpt_80b_v5p128.yaml"])
def test_the_80b_recipes_load_from_any_directory(recipe, tmp_path, monkeypatch):
    """Their preset is relative to the file, as ModelConfig.from_yaml reads it."""
    monkeypatch.chdir(tmp_path)
    config = load_run_config(REPO_ROOT / "configs" / recipe)
    assert config.model.num_experts == 512 and config.model.num_hidden_layers == 48
    assert (config.model.dtype, config.model.remat_policy) == ("bfloat16", "full")
    assert (config.mesh.fsdp, config.mesh.expert) == (8, 8)
    assert (config.train.batch_size, config.train.seq_len) == (64, 4096)
