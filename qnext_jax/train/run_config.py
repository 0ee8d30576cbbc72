"""The run configuration: one YAML file of sections plus `section.key=value` overrides.

    model:      ModelConfig fields (or `preset: configs/NAME.yaml` to start from a preset)
    mesh:       data / fsdp / expert / tensor
    optimizer:  OptimizerConfig      loss: LossConfig      data: DataConfig
    train:      TrainConfig (steps, batch, sequence length, logging, checkpoints, run_dir)

Every key is checked against its dataclass: an unknown key or a value of the wrong type is an
error that names the dotted key (and the nearest valid one).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from qnext_jax.config import ConfigError, ModelConfig, RopeScaling, nearest, read_yaml_mapping
from qnext_jax.data.build import TOKENIZER_FILE, DataConfig
from qnext_jax.parallel.mesh import MeshConfig
from qnext_jax.train.losses import LossConfig
from qnext_jax.train.optimizer import OptimizerConfig, default_warmup_steps


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # global rows per optimizer step
    seq_len: int = 256
    micro_batches: int = 1
    seed: int = 0  # parameter initialisation
    log_every: int = 10
    eval_every: int = 200  # 0: no evaluation
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    run_dir: str | None = None  # default: a new folder under runs/
    init_from_hf: str | None = None  # a Hugging Face Qwen3-Next directory to start from
    export_hf: bool = False  # write the final model in Hugging Face format to run_dir/hf
    export_dtype: Literal["float32", "bfloat16"] | None = None  # None: the compute dtype
    peak_tflops: float | None = None  # per device, for MFU; None: looked up by device kind
    # Keys whose change a resume accepts (the schedule of an extended run, say); any other
    # change that alters the trajectory is an error.
    accept_changes: tuple[str, ...] = ()
    wandb_project: str | None = None  # also log to Weights & Biases
    wandb_mode: Literal["auto", "online", "offline"] = "auto"  # auto: offline without network
    plot_log_steps: bool = False  # loss curves over a log-scaled step axis
    # On a GPU/TPU: compile the step before allocating anything and stop if the compiler says
    # it needs more memory than the device holds (qnext_jax/train/memory_check.py).
    check_memory: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "micro_batches", "log_every",
                     "eval_batches", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be >= 0 (0: no evaluation), got {self.eval_every}")


HF_REMAT_POLICY = "full"  # train.init_from_hf without a preset or model.remat_policy
# The ModelConfig fields a run chooses (numerics, kernels, remat); every other field is the
# checkpoint's, from its config.json.
_RUN_CHOICES = ("dtype", "param_dtype", "router_dtype", "delta_rule_impl", "attention_impl",
                "moe_impl", "grouped_matmul", "moe_capacity_factor", "remat_policy",
                "layer_scan", "mtp_depth", "router_aux_loss_coef")

SECTIONS: dict[str, type] = {
    "model": ModelConfig, "mesh": MeshConfig, "optimizer": OptimizerConfig,
    "loss": LossConfig, "data": DataConfig, "train": TrainConfig,
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    mesh: MeshConfig
    optimizer: OptimizerConfig
    loss: LossConfig
    data: DataConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}


def check_run_config(config: RunConfig) -> None:
    """What no single section can check on its own."""
    if config.train.eval_every and config.data.eval_percent == 0 and config.data.source != "prepared":
        raise ConfigError(
            "data.eval_percent=0 holds out no documents to evaluate on; turn evaluation off "
            "with train.eval_every=0, or hold some out (data.eval_percent > 0)"
        )
    known = set(all_keys())
    for key in config.train.accept_changes:
        if key not in known:
            close = nearest(key, sorted(known))
            hint = f" (did you mean {close}?)" if close else ""
            raise ConfigError(f"train.accept_changes names {key!r}, which is no key{hint}")


def all_keys(config_file: str | Path | None = None) -> dict[str, Any]:
    """Every dotted key with its default: the dataclass defaults (the bare ModelConfig defaults
    are the 80B model's), or the values a run of `config_file` starts from."""
    if config_file is not None:
        keys = {f"{section}.{name}": value
                for section, entries in load_run_config(config_file).to_dict().items()
                for name, value in entries.items()}
    else:
        keys = {}
        for section, cls in SECTIONS.items():
            for field in dataclasses.fields(cls):
                default = field.default if field.default is not dataclasses.MISSING else None
                keys[f"{section}.{field.name}"] = default
    keys["model.preset"] = None
    # Derived unless set: shown as the rule rather than this run's number.
    keys["optimizer.total_steps"] = "train.steps"
    keys["optimizer.warmup_steps"] = f"min({OptimizerConfig.warmup_steps}, total_steps // 10)"
    return keys


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if path is not None:
        for section, entries in read_yaml_mapping(path).items():
            _check_section(section, where=str(path))
            if not isinstance(entries, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            key = {"model": "preset", "data": "chat_template"}.get(section)
            if key is not None and entries.get(key) is not None:
                # A file's preset (and chat template) is relative to the file, as in
                # ModelConfig.from_yaml (a path relative to the working directory is still
                # taken when that is where the file is).
                beside = Path(path).expanduser().parent / str(entries[key])
                if beside.exists():
                    entries = {**entries, key: str(beside)}
            values[section].update(entries)
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator or "." not in key:
            raise ConfigError(f"override {override!r} must look like section.key=value")
        section, name = key.split(".", 1)
        _check_section(section, where="the command line")
        if key == "model.preset":
            values["model"] = {}  # a preset on the command line replaces the file's model
        try:
            values[section][name] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"override {override!r}: {text!r} is not a valid YAML value") from None
    return build_run_config(values)


def build_run_config(values: dict[str, dict[str, Any]]) -> RunConfig:
    model_values = dict(values.get("model", {}))
    preset = model_values.pop("preset", None)
    hf_directory = values.get("train", {}).get("init_from_hf")
    preset_config = ModelConfig.from_yaml(preset).to_dict() if preset is not None else {}
    if hf_directory is not None:
        # The architecture is the checkpoint's; model.* keys may still set numerics
        # (dtype, delta_rule_impl, ...) and are checked against the tensors when loading.
        hf_config = hf_model_config(hf_directory).to_dict()
        # A preset beside it (a recipe planned for the released model) must describe the
        # same model; its numerics (compute dtype, remat, kernels) apply unless set here.
        differ = sorted(key for key in preset_config
                        if key not in _RUN_CHOICES and preset_config[key] != hf_config.get(key))
        if differ:
            raise ConfigError(
                f"model.preset ({preset}) and train.init_from_hf ({hf_directory}) describe "
                "different models: " + ", ".join(
                    f"{key} {preset_config.get(key)!r} vs {hf_config.get(key)!r}"
                    for key in differ[:6]) + "; drop the preset to train the checkpoint's")
        numerics = {key: value for key, value in preset_config.items() if key in _RUN_CHOICES}
        if preset is None:
            # Released checkpoints are large (the smallest Qwen3-Next has 80B parameters): no
            # device holds their step with every layer's activations kept for the backward.
            numerics = {"remat_policy": HF_REMAT_POLICY}
        model_values = {**hf_config, **numerics, **model_values}
    elif preset is not None:
        model_values = {**preset_config, **model_values}
    if hf_directory is not None:
        tokenizer = Path(hf_directory).expanduser() / TOKENIZER_FILE
        data_values = values.setdefault("data", {})
        if data_values.get("tokenizer") is None and tokenizer.is_file():
            data_values["tokenizer"] = str(tokenizer)
    sections = {}
    for section in ("train",) + tuple(name for name in SECTIONS if name != "train"):
        cls = SECTIONS[section]
        entries = model_values if section == "model" else dict(values.get(section, {}))
        if section == "optimizer" and "total_steps" not in entries:
            entries["total_steps"] = sections["train"].steps  # the schedule spans the run
        if section == "optimizer" and "warmup_steps" not in entries:
            total = _coerce(section, cls, "total_steps", entries["total_steps"])
            entries["warmup_steps"] = default_warmup_steps(total)
        typed = {name: _coerce(section, cls, name, value) for name, value in entries.items()}
        sections[section] = cls(**typed)
    return RunConfig(**sections)


def hf_model_config(directory) -> ModelConfig:
    """The model a Hugging Face directory holds (without MTP when it has no mtp.* tensors), with
    fp32 parameters: training keeps fp32 master weights whatever the checkpoint's dtype. The
    compute dtype is the checkpoint's (config.json `dtype` / `torch_dtype`)."""
    from qnext_jax.convert.load import read_hf_config
    from qnext_jax.convert.safetensors_dir import SafetensorsDir

    return read_hf_config(directory, SafetensorsDir(directory), "float32")


def _check_section(section: str, where: str) -> None:
    if section not in SECTIONS:
        close = difflib.get_close_matches(section, SECTIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown section {section!r} in {where}{hint}; sections: {list(SECTIONS)}")


def _coerce(section: str, cls: type, name: str, value: Any) -> Any:
    hints = typing.get_type_hints(cls)
    if name not in hints:
        close = nearest(name, [f.name for f in dataclasses.fields(cls)])
        hint = f" (did you mean {section}.{close}?)" if close else ""
        raise ConfigError(f"unknown key {section}.{name}{hint}; see `python train.py --help`")
    try:
        return _convert(hints[name], value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{section}.{name} = {value!r}: expected {_describe(hints[name])}"
        ) from None


def _convert(hint, value):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if origin is typing.Literal:
        if value not in args:
            raise ValueError
        return value
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise TypeError
        item = args[0] if args else Any
        return tuple(value if item is Any else _convert(item, v) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    if hint is RopeScaling:
        if value is None or isinstance(value, (dict, RopeScaling)):
            return value
        raise TypeError
    return value


def _describe(hint) -> str:
    text = str(hint).replace("typing.", "")
    return getattr(hint, "__name__", text) if not typing.get_args(hint) else text


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
