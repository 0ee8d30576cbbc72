"""A study killed after its first run and started again skips the finished run, trains the
rest, and writes the table and the plot of all of them."""

import json
import os
import random
import signal
import subprocess
import sys
import time

from conftest import REPO_ROOT

# The router-init study at a test size: two runs (normalised, plain) of a 1-block model.
SMALL = ["model.hidden_size=32", "model.vocab_size=320", "model.num_experts=4",
         "model.moe_intermediate_size=16", "model.shared_expert_intermediate_size=16",
         "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.head_dim=16",
         "model.linear_num_key_heads=1", "model.linear_num_value_heads=2",
         "model.linear_key_head_dim=8", "model.linear_value_head_dim=8",
         "train.steps=4", "train.batch_size=2", "train.seq_len=32", "train.eval_every=4",
         "train.eval_batches=1", "train.checkpoint_every=2", "data.eval_percent=10"]


def study(corpus, out):
    return [sys.executable, "-m", "qnext_jax.experiments", "router_init", "--out", str(out),
            "--seeds", "0", "--set", *SMALL, "data.source=text", f"data.paths=[{corpus}/doc*.txt]"]


def test_a_killed_study_resumes_without_training_finished_runs_again(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = ["def", "return", "self", "value", "(", ")", ":", "\n", "    ", "import", "x", "1"]
    for i in range(30):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(200)))
    out = tmp_path / "studies"
    # One CPU device (the suite's 8 would need batches of 8 rows).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    first = out / "router_init" / "normalised-seed0"
    process = subprocess.Popen(study(corpus, out), cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    while not (first / "result.json").exists():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the first run did not finish in time"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    trained = (first / "metrics.jsonl").stat().st_mtime_ns

    done = subprocess.run(study(corpus, out), cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "normalised-seed0 is done" in done.stdout
    assert "training plain-seed0" in done.stdout
    assert (first / "metrics.jsonl").stat().st_mtime_ns == trained  # not trained again
    table = json.loads((out / "router_init" / "results.json").read_text())["table"]
    assert set(table) == {"normalised", "plain"}
    assert all("early_imbalance" in row and "eval_loss" in row for row in table.values())
    assert (out / "router_init" / "router_init.png").stat().st_size > 1000
    assert "| plain | 1 |" in (out / "router_init" / "results.md").read_text()


def _result(label, seed, eval_loss, seconds):
    curve = [[50, seconds / 2, eval_loss + 1.0], [100, seconds, eval_loss]]
    return {"name": f"{label}-seed{seed}", "label": label, "seed": seed, "steps": 100,
            "summary": {"eval_loss": eval_loss, "train_seconds": seconds},
            "curves": {"eval_loss": curve, "load_entropy": [], "norm_scale_max": [],
                       "imbalance": [], "dead_experts": []}, "probe": None}


def test_the_table_gives_mean_and_half_range_and_says_which_differences_leave_seed_noise(tmp_path):
    from qnext_jax.experiments.report import write_report
    from qnext_jax.experiments.studies import Study

    study = Study("toy", "a beats b and c", {"a": (), "b": (), "c": ()},
                  ("eval_loss", "eval_loss_at_equal_time"))
    results = [_result("a", 0, 3.0, 10.0), _result("a", 1, 3.2, 10.0),
               _result("b", 0, 3.5, 20.0), _result("b", 1, 3.7, 20.0),   # ranges apart
               _result("c", 0, 3.1, 10.0), _result("c", 1, 3.3, 10.0)]  # ranges overlap
    write_report(study, results, tmp_path)
    report = json.loads((tmp_path / "results.json").read_text())
    b = report["table"]["b"]["eval_loss"]
    assert abs(b["mean"] - 3.6) < 1e-12 and abs(b["spread"] - 0.1) < 1e-12
    # At a's end (10 s) b has trained half as long: its loss there is its step-50 loss.
    assert abs(report["table"]["b"]["eval_loss_at_equal_time"]["mean"] - 4.6) < 1e-12
    verdicts = {(v["measure"], v["variant"]): v for v in report["separation"]}
    assert verdicts["eval_loss", "b"]["verdict"] == "separated"
    assert verdicts["eval_loss", "c"]["verdict"] == "inside seed noise"
    assert abs(verdicts["eval_loss", "b"]["difference"] - 0.5) < 1e-12
    markdown = (tmp_path / "results.md").read_text()
    assert "| b | 2 | 3.6000 ± 0.1000 |" in markdown
    assert "eval loss (equal steps): b - a = +0.5000 (separated" in markdown
    assert (tmp_path / "toy.png").stat().st_size > 1000


def test_a_finished_run_counts_as_done_only_for_its_own_steps_and_trajectory(tmp_path):
    from qnext_jax.experiments.runner import DEFAULT_RUN, RESULT_FILE, _finished
    from qnext_jax.train.run_config import load_run_config
    from qnext_jax.train.run_dir import CONFIG_FILE

    def config(*overrides):
        return load_run_config(DEFAULT_RUN, ["train.steps=4", *overrides])

    trained = config()
    (tmp_path / CONFIG_FILE).write_text(json.dumps(trained.to_dict()))
    assert not _finished(tmp_path / RESULT_FILE, trained)  # no result yet
    (tmp_path / RESULT_FILE).write_text(json.dumps({"steps": 4}))
    assert _finished(tmp_path / RESULT_FILE, trained)
    assert _finished(tmp_path / RESULT_FILE, config("train.log_every=1"))  # the same steps
    assert not _finished(tmp_path / RESULT_FILE, config("train.steps=8"))  # trains on
    assert not _finished(tmp_path / RESULT_FILE, config("model.norm_style=plain"))
