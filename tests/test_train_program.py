"""`python train.py` as users run it, in subprocesses: a two-step smoke run on the tiny config;
preemption (SIGTERM) and a hard kill (SIGKILL, most likely mid-save) both leave a checkpoint
from which the resumed run continues exactly like an uninterrupted one, with one process and
with two that agree on the step; bad input fails with a clear message and exit status 2."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT

# The subprocesses share the test session's compilation cache; they see its 8 CPU devices,
# except the interrupted runs, which take one device: they are about the program's faults, and
# a single device makes each of their five runs quick.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
ONE_DEVICE = {**ENV, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("program_corpus")
    rng = random.Random(0)
    words = ["def", "return", "self", "value", "(", ")", ":", "\n", "    ", "import", "x", "1"]
    for i in range(40):
        (directory / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(200)))
    return directory


def tiny_run(corpus, run_dir, *extra):
    """The run of tests/test_train_loop.py (same model, shapes, mesh and schedule), so the
    programs compiled there are cache hits here."""
    return [
        sys.executable, str(REPO_ROOT / "train.py"), str(REPO_ROOT / "configs" / "tiny.yaml"),
        "model.num_hidden_layers=4", "model.vocab_size=320", "data.source=text",
        f"data.paths=[{corpus}/doc*.txt]", "data.eval_percent=10", "train.batch_size=8",
        "train.seq_len=32", "train.log_every=1", "train.eval_batches=8", "mesh.fsdp=4",
        "mesh.expert=2", "optimizer.total_steps=6", "optimizer.warmup_steps=1",
        f"train.run_dir={run_dir}", *extra,
    ]


def run(args, env=ENV, timeout=300, cwd=REPO_ROOT):
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def metrics(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


# Interrupted runs ask for 1000 steps and are stopped early; the schedule (total_steps=6, then
# the final rate) is the same for every run.
LONG = ["train.steps=1000", "train.eval_every=1000", "mesh.fsdp=1", "mesh.expert=1"]


def test_two_step_smoke_run(corpus, tmp_path):
    run_dir = tmp_path / "smoke"
    done = run(tiny_run(corpus, run_dir, "train.steps=2", "train.wandb_project=smoke",
                        "train.wandb_mode=offline"))  # evaluates at the end
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: step 2" in done.stdout and "ETA" in done.stdout
    assert "\r" not in done.stdout  # no terminal: plain lines
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "ce_loss", "lbl_loss", "mtp_loss", "grad_norm", "lr", "tokens_per_sec"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert "eval_loss" in rows[1]
    for name in ("config.json", "tokenizer.json", "loss_curves.png", "expert_load.png",
                 "checkpoints/2"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def interrupt(corpus, run_dir, sig, after_step, *extra):
    """Starts a long run, sends `sig` once `after_step` steps are logged; -> the process."""
    process = subprocess.Popen(tiny_run(corpus, run_dir, *extra), env=ONE_DEVICE, cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(metrics(run_dir)) < after_step:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run logged no steps in time"
        time.sleep(0.02)
    process.send_signal(sig)
    process.wait(timeout=120)
    return process


@pytest.mark.slow
def test_preemption_and_kill_resume_exactly(corpus, tmp_path):
    # SIGKILL while a checkpoint is written every step: most likely mid-save. The steps it
    # logged before dying ran uninterrupted: they are the reference for both resumed runs.
    killed = tmp_path / "killed"
    interrupt(corpus, killed, signal.SIGKILL, 6, *LONG, "train.checkpoint_every=1")
    uninterrupted = {r["step"]: r["loss"] for r in metrics(killed)}
    final = max(uninterrupted)
    complete = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert complete, "no complete checkpoint survived the kill"

    # SIGTERM: the loop saves at the current step and exits cleanly.
    preempted = tmp_path / "preempted"
    process = interrupt(corpus, preempted, signal.SIGTERM, 2, *LONG,
                        "train.checkpoint_every=1000")
    out = process.stdout.read()
    assert process.returncode == 0, process.stderr.read()[-3000:]
    stopped = metrics(preempted)[-1]["step"]
    assert f"SIGTERM: saved a checkpoint at step {stopped}; exiting" in out
    assert sorted(p.name for p in (preempted / "checkpoints").iterdir()) == [str(stopped)]
    assert stopped < final, "the preempted run went further than the reference"

    for run_dir, resume_from in ((preempted, stopped), (killed, complete[-1])):
        done = run(tiny_run(corpus, run_dir, f"train.steps={final}", *LONG[1:]), ONE_DEVICE)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"resumed from step {resume_from}" in done.stdout
        rows = metrics(run_dir)  # steps logged after the last checkpoint were dropped
        assert [r["step"] for r in rows] == list(range(1, final + 1))
        assert all(r["loss"] == uninterrupted[r["step"]] for r in rows)  # bit for bit


def free_ports(count):
    """Ports free now, distinct (all probes are held open together)."""
    probes = [socket.socket() for _ in range(count)]
    for probe in probes:
        probe.bind(("localhost", 0))
    ports = [probe.getsockname()[1] for probe in probes]
    for probe in probes:
        probe.close()
    return ports


def two_processes(args, cwd, port, devices_each=4):
    """`args` as process 0 and 1 of a job on localhost (its coordinator on `port`), each with
    `devices_each` CPU devices."""
    processes = []
    for rank in (0, 1):
        env = {**ENV, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(rank), "XLA_FLAGS":
               f"--xla_force_host_platform_device_count={devices_each} --xla_cpu_multi_thread_eigen=false"}
        processes.append(subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    return processes


def finish(processes, timeout=600):  # a hang, not a slow machine under load
    outputs = [p.communicate(timeout=timeout) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


@pytest.mark.slow
def test_two_processes_preempted_on_one_save_together_and_resume_exactly(corpus, tmp_path):
    """SIGTERM reaches process 1 only; JAX's preemption sync point stops both at the same step,
    both save it (one checkpoint) and exit 0. Without train.run_dir, process 0 names the run
    directory and process 1 follows. The resumed two-process run logs exactly the losses of an
    uninterrupted one."""
    work = tmp_path / "work"
    work.mkdir()
    long_run = [arg for arg in tiny_run(corpus, "unused") if not arg.startswith("train.run_dir")]
    ports = free_ports(3)
    processes = two_processes(long_run + ["train.steps=1000", "train.eval_every=0",
                                          "optimizer.total_steps=20"], work, ports[0])
    deadline = time.monotonic() + 240
    while not list(work.glob("runs/*/metrics.jsonl")) or len(metrics(
            next(work.glob("runs/*")))) < 2:
        assert all(p.poll() is None for p in processes), processes[0].communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the two processes logged no steps in time"
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)
    out = finish(processes)
    [run_dir] = list((work / "runs").iterdir())  # one directory for both processes
    [stopped] = [int(p.name) for p in (run_dir / "checkpoints").iterdir()]
    assert f"preemption notice: saved a checkpoint at step {stopped}; exiting" in out[0]
    assert metrics(run_dir)[-1]["step"] == stopped
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # process 0 alone writes logs

    final = stopped + 2
    common = ["train.eval_every=0", "optimizer.total_steps=20", f"train.steps={final}"]
    reference = tmp_path / "reference"
    finish(two_processes(tiny_run(corpus, reference, *common), work, ports[1]))
    resumed = finish(two_processes(tiny_run(corpus, run_dir, *common), work, ports[2]))
    assert f"resumed from step {stopped}" in resumed[0]
    assert [(r["step"], r["loss"]) for r in metrics(run_dir)] == \
        [(r["step"], r["loss"]) for r in metrics(reference)]  # bit for bit


@pytest.mark.parametrize("args, message", [
    (["optimizer.lr=3e-4"], "unknown key optimizer.lr (did you mean optimizer.learning_rate?)"),
    (["data.source=text", "data.paths=[no/such/dir/*.txt]"],
     "text input 'no/such/dir/*.txt' matches no file"),
    (["mesh.expert=3"], "expert: 3, sequence: 1, tensor: 1} cannot fill 8 devices: the fixed axes multiply "
                        "to 3, which does not divide 8"),
    # Found only once the tokenizer is built: still before the run directory is.
    ([str(REPO_ROOT / "configs" / "tiny.yaml")],
     "vocab_size 256 is too small for a byte-level BPE (>= 258)"),
    (["model.param_dtype=bfloat16"], "model.param_dtype=bfloat16 would train without fp32 master"),
])
def test_bad_input_fails_with_a_clear_message(tmp_path, args, message):
    """As a user types it: from a working directory, the run directory relative to it."""
    done = run([sys.executable, str(REPO_ROOT / "train.py"), *args, "train.run_dir=runs/bad"],
               cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert message in done.stderr
    assert "Traceback" not in done.stderr and "Exception" not in done.stderr
    assert not (tmp_path / "runs" / "bad").exists()  # nothing is left of a run that never started
