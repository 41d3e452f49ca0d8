"""Tests for multi-process training: two local processes, as SLURM or a manual launch starts them.

Every process is a fresh interpreter on 127.0.0.1 with one CPU device; ``jax.distributed`` joins
them and CPU collectives go over gloo (JAX's default). The processes write to files, not pipes, and
each launch has a deadline after which every process still running is killed, so a hung
collective fails the test instead of hanging CI.
"""

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from examples.cifar import train
from examples.cifar.config import add_flags, config_from_flags
from examples.cifar.conftest import REPO_ROOT

# The README's commands ("Several devices / several hosts"): 16 steps of the tiny ResNet (256
# digits, batch 32, 2 epochs). JAX_DISABLE_MOST_OPTIMIZATIONS (in _env) only speeds compiles up.
RUN = ["--config", "digits", "--model", "tiny", "--train-subset", "256", "--epochs", "2"]
STEPS_PER_EPOCH = 8
TRAIN = [sys.executable, "-m", "examples.cifar.train"]
# The same command, but just before training step number argv[1] it creates the file argv[2] and
# waits there, for the test to kill it.
_PAUSING = (
    "import sys, time\n"
    "from examples.cifar import train\n"
    "pause_at, marker = int(sys.argv.pop(1)), sys.argv.pop(1)\n"
    "def pause(step):\n"
    "  if step == pause_at:\n"
    "    open(marker, 'w').close()\n"
    "    time.sleep(3600)\n"
    "sys.exit(train.main(sys.argv[1:], before_step=pause))\n")
TIMEOUT = 300


pytestmark = pytest.mark.usefixtures("gloo_can_listen")  # conftest.py, at the root
"""Seconds a launch may take on a loaded 2-core machine (about 15 s when the machine is idle)."""
TIMING_KEYS = {"seconds", "images_per_sec"}


@dataclasses.dataclass
class Finished:
  returncode: int
  stdout: str
  stderr: str
  ended: float  # time.monotonic() when the process was seen to exit.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
  """A clean environment: CPU only, one device, fast compiles, no cluster variables."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "JAX_", "XLA_FLAGS", "TPU_"))}
  return {**env, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu",
          "JAX_DISABLE_MOST_OPTIMIZATIONS": "true", **extra}


def _slurm_env(process: int, port: int) -> dict[str, str]:
  """What ``srun --ntasks=2`` sets for task ``process`` on one node (the port: see README)."""
  return _env(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
              SLURM_PROCID=str(process), SLURM_LOCALID=str(process),
              JAX_COORDINATOR_PORT=str(port))


def _manual(process: int, port: int) -> list[str]:
  return ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
          "--process-id", str(process)]


def _pausing_at_step(step: int, marker: Path) -> list[str]:
  return [sys.executable, "-c", _PAUSING, str(step), str(marker)]


def _run_all(logdir: Path, launches: list[tuple[list[str], dict[str, str]]],
             kill_when_paused: dict[int, Path] | None = None) -> list[Finished]:
  """Starts every ``(argv, env)`` at once and waits for all, killing them all past the deadline.

  Their output goes to ``logdir/<i>.out`` and ``.err``. ``kill_when_paused`` maps launches (run
  with :func:`_pausing_at_step`) to their marker files: once every marker exists, those launches
  get SIGKILL, all at the same moment.
  """
  logdir.mkdir(parents=True, exist_ok=True)
  logs = [logdir / str(i) for i in range(len(launches))]
  procs, files = [], []
  try:
    for (argv, env), log in zip(launches, logs, strict=True):
      out, err = open(log.with_suffix(".out"), "w"), open(log.with_suffix(".err"), "w")
      files += [out, err]
      procs.append(subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=err))
    deadline, ended = time.monotonic() + TIMEOUT, [None] * len(procs)
    while None in ended and time.monotonic() < deadline:
      if kill_when_paused and all(m.exists() for m in kill_when_paused.values()):
        for i in kill_when_paused:
          procs[i].send_signal(signal.SIGKILL)
        kill_when_paused = None
      for i, p in enumerate(procs):
        if ended[i] is None and p.poll() is not None:
          ended[i] = time.monotonic()
      time.sleep(0.05)
  finally:
    for p in procs:  # Past the deadline, or on any error here: leave no process behind.
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in files:
      f.close()
  results = [Finished(p.returncode, log.with_suffix(".out").read_text(),
                      log.with_suffix(".err").read_text(), t or float("inf"))
             for p, log, t in zip(procs, logs, ended, strict=True)]
  if None in ended:
    pytest.fail(f"a launch ran past {TIMEOUT} s and was killed:\n"
                + "\n".join(f"[{i}] {r.stderr[-2000:]}" for i, r in enumerate(results)))
  return results


def _metrics(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _without_timing(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_two_processes_train_like_one_process_on_two_devices_and_resume_after_kill_9(
    tmp_path: Path) -> None:
  one, two = tmp_path / "one_process", tmp_path / "two_processes"
  # Two processes as `srun` starts them, both SIGKILLed once both wait before epoch 2's first
  # step, and beside them the uninterrupted reference: one process with two devices.
  port, logs = _free_port(), tmp_path / "srun_killed_and_one_process"
  paused = {1: logs / "paused0", 2: logs / "paused1"}
  reference, *killed = _run_all(logs, [
      (TRAIN + RUN + ["--workdir", str(one)],
       _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")),
      *[(_pausing_at_step(STEPS_PER_EPOCH + 1, paused[i + 1]) + RUN
         + ["--distributed", "--workdir", str(two)], _slurm_env(i, port)) for i in range(2)],
  ], kill_when_paused=paused)
  assert reference.returncode == 0, reference.stderr[-3000:]
  assert [r.returncode for r in killed] == [-signal.SIGKILL] * 2, killed[0].stderr[-3000:]
  assert [r["epoch"] for r in _metrics(two)] == [1]
  # Relaunched, by hand this time: it resumes after epoch 1.
  port = _free_port()
  resumed = _run_all(tmp_path / "manual_resumed", [
      (TRAIN + RUN + _manual(i, port) + ["--workdir", str(two)], _env()) for i in range(2)])
  assert [r.returncode for r in resumed] == [0, 0], resumed[0].stderr[-3000:]
  assert "| resuming after epoch 1" in resumed[0].stdout

  # Per epoch, the two processes trained as one process on two devices (to 1e-4), with one copy
  # of the metrics, not one per process.
  expected, got = _metrics(one), _metrics(two)
  assert [r["epoch"] for r in got] == [1, 2]
  for e, g in zip(expected, got, strict=True):
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
      assert g[key] == pytest.approx(e[key], rel=1e-4, abs=1e-4), (g["epoch"], key)
    assert g["learning_rate"] == e["learning_rate"]
  summary = json.loads((two / "summary.json").read_text())
  assert summary["num_devices"] == 2 and summary["config"]["num_processes"] == 2
  assert summary["final_test_accuracy"] == got[-1]["test_accuracy"]
  assert [json.loads(line)["epoch"] for line in
          (two / "gc_diagnostics.jsonl").read_text().splitlines()] == [1]
  # Process 0 logs, shows progress bars and prints the summary; process 1 shows none of these.
  for launch in (killed, resumed):
    assert "2 device(s), cpu, 2 processes" in launch[0].stdout
    assert "epoch" not in launch[1].stdout + launch[1].stderr and "{" not in launch[1].stdout
  log = resumed[0].stdout
  assert "epoch   2/2 | train loss" in log and "epoch 2/2:" in resumed[0].stderr
  assert json.loads(log[log.index("\n{\n"):])["final_test_accuracy"] == got[-1]["test_accuracy"]


def test_a_killed_process_stops_the_other_with_a_one_line_error(tmp_path: Path) -> None:
  port, flags = _free_port(), ["--workdir", str(tmp_path / "w"), "--distributed-timeout", "30"]
  paused = tmp_path / "logs" / "paused"
  survivor, victim = _run_all(tmp_path / "logs", [
      (TRAIN + RUN + _manual(0, port) + flags, _env()),
      (_pausing_at_step(3, paused) + RUN + _manual(1, port) + flags, _env()),
  ], kill_when_paused={1: paused})
  assert victim.returncode == -signal.SIGKILL
  assert survivor.returncode == 1, survivor.stderr[-3000:]
  last = survivor.stderr.strip().splitlines()[-1]
  assert last.startswith("error: a computation across processes failed (")
  assert last.endswith("most likely another process stopped: see its output.")
  assert "stack trace" not in survivor.stderr
  assert survivor.ended - victim.ended < 30  # Well inside the heartbeat timeout.


def test_processes_started_unlike_each_other_or_the_checkpointed_run_get_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
  # Process 1 with another learning rate and process count (which JAX would ignore: process 0's
  # count wins): both stop before training, naming the fields.
  port = _free_port()
  results = _run_all(tmp_path / "unlike_each_other", [
      (TRAIN + RUN + _manual(i, port) + ["--workdir", str(tmp_path / "a")] + extra, _env())
      for i, extra in enumerate([[], ["--lr", "0.5", "--num-processes", "3"]])])
  for r in results:
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: the processes were started with different configs (learning_rate: 0.1 in "
        "process 0, 0.5 in process 1; num_processes: 2 in process 0, 3 in process 1); start "
        "every process with the same flags.")
  assert not (tmp_path / "a" / "config.json").exists()

  # A workdir of another recipe: process 0 finds out, and process 1 stops with its error too.
  workdir = tmp_path / "b"
  workdir.mkdir()
  parser = argparse.ArgumentParser()
  add_flags(parser)
  config = dataclasses.replace(config_from_flags(parser.parse_args(RUN)), num_processes=2)
  (workdir / "config.json").write_text(json.dumps(dataclasses.replace(config, seed=5).to_dict()))
  port = _free_port()
  results = _run_all(tmp_path / "unlike_the_workdir", [
      (TRAIN + RUN + _manual(i, port) + ["--workdir", str(workdir)], _env()) for i in range(2)])
  for r in results:
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {workdir} holds a run with another config (seed: 5 -> 0); use a new --workdir, "
        "or the original flags to resume.")

  # Resuming a two-process run with one process is refused (checked here in this process).
  (workdir / "config.json").write_text(json.dumps(config.to_dict()))
  assert train.main(RUN + ["--workdir", str(workdir)]) == 1
  assert ("holds a run trained by 2 process(es); this launch has 1. Resume it with 2, or use a "
          "new --workdir.") in capsys.readouterr().err
