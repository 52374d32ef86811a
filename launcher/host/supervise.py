"""``ftlaunch``'s part of a running job: ``command.sh`` as a child it watches, not a process it becomes.

* the launcher's own output (``accelerate launch``/torchrun: banners, its tracebacks) goes to
  ``RUN/logs/launcher.log`` (``launcher-node<N>.log`` on several nodes); what the ranks write to
  their console (ranklog.console_print) passes through to the user's screen, byte for byte;
* Ctrl-C, SIGTERM, SIGUSR1 and SIGHUP (as SIGTERM: a closed terminal) are passed on to the rank
  processes themselves, which checkpoint at the next optimizer step and exit 3 (torchrun, told
  instead, would kill them after 30 s); in the final evaluation, and in ``ftlaunch eval``/
  ``summarize``, they stop at once (nothing to checkpoint);
* when the job fails, a summary a person can act on replaces the launcher's traceback: which rank
  (and node) failed first, the last line of its error, its log, and the exit code:
  0 done, 1 crashed, 2 bad input, 3 interrupted; the advice fits the command and phase (Job): only
  a training run resumes with ``--resume auto``;
* a crashed training run starts again from its newest intact checkpoint (launch.max_restarts), and a
  training step that ran out of memory continues with a smaller micro batch
  (train.auto_find_batch_size: recipe.yaml and the configs rendered again, core/auto_batch.py).
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.core.auto_batch import AUTO_BATCH_ENV, batch_shape, continuing_line, smaller_shape, with_shape
from launcher.core.errors import DIVERGED, EXIT_CRASHED, EXIT_INTERRUPTED, EXIT_USAGE
from launcher.core.ranklog import (
    CONSOLE_TTY_ENV,
    RESTART_CAUSE_ENV,
    RESTART_ENV,
    SUPERVISED_ENV,
    Failure,
    logs_dir,
    rank_log_path,
    read_failures,
)
from launcher.core.recipe import Recipe
from launcher.core.recipe_loading import read_run_recipe
from launcher.core.rundir import RunDir
from launcher.host import runlock
from launcher.host.render import (
    EVAL_MODULE,
    MACHINE_RANK_ENV,
    SUMMARIZE_MODULE,
    rendered_module,
    rerender_recipe,
)

# torchrun's line for the first worker that failed on this node (torch/distributed/elastic).
TORCHRUN_FAILURE = re.compile(rb"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)")
# A collective that failed because a peer rank went away (gloo's and NCCL's words for it): the
# rank that reports it did not fail first, a rank elsewhere ended without a record.
PEER_GONE = re.compile(
    r"Connection closed by peer|Connection reset by peer|remote worker crashing|remote process exited"
    r"|NCCL communicator was aborted",
    re.IGNORECASE,
)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
# What the ranks get for each: a hangup (terminal closed, ssh dropped) stops the run like SIGTERM;
# the ranks run in their own session and would otherwise train on with nobody watching.
PASSED_ON = {signal.SIGHUP: signal.SIGTERM}


# ---------------------------------------------------------------- where this launcher runs


def node_rank(machine_rank: int | None) -> int:
    """This node's rank, as command.sh will take it (given, else FTLAUNCH_MACHINE_RANK or SLURM_NODEID)."""
    if machine_rank is not None:
        return machine_rank
    raw = os.environ.get(MACHINE_RANK_ENV) or os.environ.get("SLURM_NODEID") or "0"
    return int(raw) if raw.isdigit() else 0


def launcher_log_path(run_dir: Path, recipe: Recipe, node: int) -> Path:
    return RunDir(run_dir).launcher_log(node, recipe.launch.nodes)


def child_env(recipe: Recipe, console_is_tty: bool, machine_rank: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env[SUPERVISED_ENV] = "1"
    if machine_rank is not None:
        env[MACHINE_RANK_ENV] = str(machine_rank)  # command.sh takes this node's rank from it
    env[CONSOLE_TTY_ENV] = "1" if console_is_tty else "0"
    if recipe.launch.cpu:
        # DeepSpeed would warn "Setting accelerator to CPU" in every process after failing to find one.
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


# ---------------------------------------------------------------- output


class LogFile:
    """The launcher log, written from two reader threads; a full disk must not stop the job."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.open("ab")
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            try:
                self.handle.write(data)
                self.handle.flush()
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.handle.close()
        except OSError:
            pass


def write_console(data: bytes) -> None:
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


class Pump(threading.Thread):
    """Copy one output pipe of the child into the log (and the console); keep its last lines."""

    def __init__(self, pipe, log: LogFile, to_console: bool, keep: int = 200) -> None:
        super().__init__(daemon=True)
        self.pipe, self.log, self.to_console = pipe, log, to_console
        self.tail: collections.deque[bytes] = collections.deque(maxlen=keep)
        self.partial = b""

    def run(self) -> None:
        fd = self.pipe.fileno()
        while chunk := os.read(fd, 65536):
            self.log.write(chunk)
            if self.to_console:
                write_console(chunk)
            lines = (self.partial + chunk).split(b"\n")
            self.partial = lines.pop()
            self.tail.extend(lines)
        if self.partial:
            self.tail.append(self.partial)


# ---------------------------------------------------------------- what the job is doing


@dataclass(frozen=True)
class Job:
    """What command.sh runs (``train``, ``eval`` or ``summarize``) and where: the failure summary's
    advice and the signal notice depend on it (only training checkpoints and resumes)."""

    run_dir: Path
    kind: str
    started: float
    evaluate: str = ""  # the `ftlaunch eval` command that evaluates this run's final/ as the run would
    evaluates: bool = True  # eval.after_training: the run ends with the final evaluation and report

    @classmethod
    def of(cls, run_dir: Path, started: float, recipe: Recipe) -> Job:
        kind = {EVAL_MODULE: "eval", SUMMARIZE_MODULE: "summarize"}.get(rendered_module(run_dir), "train")
        final = RunDir(run_dir).final
        lora = recipe.train.method == "lora"
        model = f"--model {recipe.model.name} --adapter {final}" if lora else f"--model {final}"
        where = f"{' --cpu' if recipe.launch.cpu else ''} --gpus {recipe.launch.gpus}"
        limit = f" --limit {recipe.eval.limit}" if recipe.eval.limit is not None else ""
        evaluate = (
            f"ftlaunch eval {model} --data {recipe.data.dataset} --split {recipe.eval.split}{limit}{where} "
            f"--output {RunDir(run_dir).eval_finetuned.path}"
        )
        return cls(run_dir, kind, started, evaluate, recipe.eval.after_training)

    def training_finished(self) -> bool:
        """Training has saved final/ in this launch: what runs now is the final evaluation
        (train.finish saves final/ with one rename, just before generating)."""
        try:
            return self.kind == "train" and RunDir(self.run_dir).final.stat().st_mtime >= self.started
        except OSError:
            return False

    def completed(self) -> bool:
        """Everything the run does is done (a stop signal that comes now stops nothing): final/
        saved in this launch and, with the final evaluation, the model card written, its last file."""
        if not self.training_finished():
            return False
        if not self.evaluates:
            return True
        from launcher.results.card import CARD_FILE

        try:
            return (RunDir(self.run_dir).final / CARD_FILE).stat().st_mtime >= self.started
        except OSError:
            return False

    def signal_notice(self, name: str) -> str:
        """What the ranks do on a forwarded stop signal, now."""
        if self.kind == "train" and not self.training_finished():
            return (
                f"ftlaunch: got {name}: the ranks write a checkpoint at the next optimizer step and "
                "stop, or stop at once before training has started (Ctrl-C again to stop at once)"
            )
        if self.kind == "train":
            return (
                f"ftlaunch: got {name} during the final evaluation: the ranks stop now; the trained "
                f"model is saved in {RunDir(self.run_dir).final}"
            )
        return f"ftlaunch: got {name}: the ranks stop now (ftlaunch {self.kind} keeps no partial results)"

    def advice(self, code: int) -> str:
        """The exit-code line: what to do next, for this command and phase."""
        if self.kind != "train":
            meaning = {
                EXIT_CRASHED: f"crashed: fix the cause, then run the same `ftlaunch {self.kind}` again",
                EXIT_INTERRUPTED: f"interrupted: run the same `ftlaunch {self.kind}` again",
            }[code]
        elif self.training_finished():
            action = "crashed" if code == EXIT_CRASHED else "interrupted"
            meaning = (
                f"{action} in the final evaluation; training is done and saved in {RunDir(self.run_dir).final}: "
                f"evaluate it with `{self.evaluate}`, then `ftlaunch report {self.run_dir}`"
            )
        else:
            meaning = {
                EXIT_CRASHED: "crashed: fix the cause, then continue with --resume auto",
                EXIT_INTERRUPTED: "interrupted: continue with --resume auto",
            }[code]
        return f"exit code {code} ({meaning}); ftlaunch exits 0 done, 1 crashed, 2 bad input, 3 interrupted"


# ---------------------------------------------------------------- signals


def child_processes(pid: int) -> list[int]:
    """Direct children of a process (the ranks, for the launcher process), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


_stop_signals: list[int] = []  # every stop signal this ftlaunch process received, in order


def note_stop_signal(signum: int) -> None:
    _stop_signals.append(signum)


def stop_signals_received() -> int:
    """How many stop signals this process has received so far: a sweep compares the count before
    and after a point, and stops after one that got any (even if the point then ended well)."""
    return len(_stop_signals)


class SignalForwarder:
    """Pass Ctrl-C/SIGTERM/SIGUSR1/SIGHUP to the rank processes; a second Ctrl-C stops them at once."""

    def __init__(self, child: subprocess.Popen, job: Job) -> None:
        self.child = child
        self.job = job
        self.received: list[int] = []
        self.ranks: set[int] = set()
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        self.previous = {sig: signal.signal(sig, self.handle) for sig in FORWARDED}

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.received.append(signum)
        note_stop_signal(signum)
        if self.child.poll() is None:
            self.ranks.update(child_processes(self.child.pid))
        name = signal.Signals(signum).name
        if not self.ranks:
            write_console(f"ftlaunch: got {name} before the ranks started: stopping the launch\n".encode())
            self._kill_group(signal.SIGTERM)
            return
        if signum == signal.SIGINT and self.received.count(signal.SIGINT) > 1:
            write_console(b"ftlaunch: second Ctrl-C: stopping the ranks at once\n")
        else:
            write_console((self.job.signal_notice(name) + "\n").encode())
        for pid in self.ranks:
            try:
                os.kill(pid, PASSED_ON.get(signum, signum))
            except ProcessLookupError:
                pass

    def _kill_group(self, sig: int) -> None:
        try:
            os.killpg(self.child.pid, sig)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- the outcome


@dataclass
class Outcome:
    code: int
    lines: list[str]
    restart_cause: str | None = None  # set when a training rank crashed (not bad input, a stop, a divergence)
    out_of_memory: Failure | None = None  # the first rank's record when the training ranks ran out of memory


def torchrun_failure(stderr_tail: list[bytes]) -> tuple[int, int] | None:
    """(local rank, exit code) of the first failed worker torchrun reported on this node."""
    for line in stderr_tail:
        match = TORCHRUN_FAILURE.search(line)
        if match:
            return int(match.group(2)), int(match.group(1))
    return None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the out-of-memory killer, or kill -9)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with code {code} without a Python error (see its log)"


def first_failure(
    run_dir: Path, recipe: Recipe, node: int, failures: list[Failure], torchrun: tuple[int, int] | None
) -> Failure | None:
    """The rank that failed first: the earliest record, unless torchrun saw a rank die without one
    (a signal leaves no record, and its peers' errors only follow from it)."""
    if torchrun is not None:
        local_rank, code = torchrun
        rank = node * recipe.launch.gpus + local_rank
        recorded = [failure for failure in failures if failure.rank == rank]
        if not recorded and (code < 0 or not failures):
            return Failure(
                rank=rank,
                local_rank=local_rank,
                node=node,
                host=os.uname().nodename,
                pid=0,
                time=0.0,
                exit_code=code,
                error=describe_exit(code),
                log=str(rank_log_path(run_dir, rank)),
            )
    return failures[0] if failures else None


def interrupted_step(run_dir: Path, since: float) -> str | None:
    return RunDir(run_dir).interrupted_checkpoint(since)


def decide(
    run_dir: Path,
    recipe: Recipe,
    node: int,
    rc: int,
    started: float,
    signals: list[int],
    stderr_tail: list[bytes],
    launcher_log: Path,
) -> Outcome:
    """Turn the child's exit status, the ranks' records and the INTERRUPTED marker into an exit code."""
    if rc == 0:
        return Outcome(0, [])
    job = Job.of(run_dir, started, recipe)
    step = interrupted_step(run_dir, started)
    if step:
        return Outcome(
            EXIT_INTERRUPTED, [f"interrupted: checkpoint {step} written; {job.advice(EXIT_INTERRUPTED)}"]
        )
    failures = read_failures(run_dir, since=started - 1.0)
    first = first_failure(run_dir, recipe, node, failures, torchrun_failure(stderr_tail))
    if first is not None and first.exit_code == EXIT_USAGE:
        return Outcome(EXIT_USAGE, [f"error: {first.error}"])
    if signals and job.completed():
        return Outcome(
            0,
            [
                f"ftlaunch: the run had finished when the stop signal came: final/, the evaluation and "
                f"the report are complete; see {RunDir(run_dir).report.path}"
            ],
        )
    if signals and (job.kind != "train" or job.training_finished()):
        return Outcome(EXIT_INTERRUPTED, [job.advice(EXIT_INTERRUPTED)])
    if signals:
        return Outcome(
            EXIT_INTERRUPTED,
            [
                f"interrupted before a new checkpoint was written; "
                f"{job.advice(EXIT_INTERRUPTED)} (from the newest checkpoint, if any)"
            ],
        )
    if first is None:
        return launcher_outcome(job, rc, stderr_tail, launcher_log)
    if first.error.startswith(DIVERGED):  # every rank stopped at the same step: no rank "failed first"
        return Outcome(
            EXIT_CRASHED,
            [
                f"error: {first.error}",
                f"  log: {first.log} (every rank's log and the launcher's: {logs_dir(run_dir)}/)",
                f"  exit code {EXIT_CRASHED} (diverged: resuming with the same settings diverges again; "
                "change them first); ftlaunch exits 0 done, 1 crashed, 2 bad input, 3 interrupted",
            ],
        )
    if ran_out_of_memory(first, failures) and job.kind == "train":
        return out_of_memory_outcome(job, recipe, first)
    cause = f"rank {first.rank} (node {first.node}, host {first.host}) failed first: {first.error}"
    if PEER_GONE.search(first.error) and recipe.launch.nodes > 1:
        cause = (
            f"rank {first.rank} (node {first.node}, host {first.host}) lost its connection to a rank of "
            "another node, which ended without an error record (killed, out of memory, or its node "
            f"failed: see that node's ftlaunch output and logs): {first.error}"
        )
    return Outcome(
        EXIT_CRASHED,
        [
            f"error: {cause}",
            f"  log: {first.log} (every rank's log and the launcher's: {logs_dir(run_dir)}/)",
            f"  {job.advice(EXIT_CRASHED)}",
        ],
        restart_cause=cause if job.kind == "train" else None,
    )


def ran_out_of_memory(first: Failure, failures: list[Failure]) -> bool:
    """The first failing rank ran out of memory in a training step, and every other recorded failure
    did too or only lost that rank (on GPUs one rank often runs out first and its peers' collectives
    then fail): a smaller micro batch is the fix, not a restart with the same one."""
    if first.out_of_memory is None:
        return False
    return all(failure.out_of_memory is not None or PEER_GONE.search(failure.error) for failure in failures)


def out_of_memory_outcome(job: Job, recipe: Recipe, first: Failure) -> Outcome:
    """Exit 1 with what to change. Not restarted under launch.max_restarts: the same micro batch runs
    out of memory again; under train.auto_find_batch_size the supervisor continues with a smaller one
    (``out_of_memory``), and these lines are printed only when there is none."""
    who = f"rank {first.rank} (node {first.node}, host {first.host})"
    if recipe.train.auto_find_batch_size:
        _, why = smaller_shape(recipe)
        fix = (
            f"train.auto_find_batch_size cannot go lower ({why}); free memory instead: --zero 2 or 3, "
            "--offload, train.gradient_checkpointing=true, or a shorter data.max_source_length"
        )
    else:
        fix = (
            "add --set train.auto_find_batch_size=true to continue with smaller micro batches, "
            f"or lower train.{'micro_batch_tokens' if recipe.train.micro_batch_tokens else 'micro_batch_size'}"
        )
    return Outcome(
        EXIT_CRASHED,
        [
            f"error: {who} ran {first.error}; {fix}",
            f"  log: {first.log} (every rank's log and the launcher's: {logs_dir(job.run_dir)}/)",
            f"  {job.advice(EXIT_CRASHED)}",
        ],
        out_of_memory=first,
    )


def launcher_outcome(job: Job, rc: int, stderr_tail: list[bytes], launcher_log: Path) -> Outcome:
    """The launcher (``accelerate launch``) ended badly and no rank reported an error. Its ranks
    may outlive it (the out-of-memory killer may take the launcher alone): a run they completed
    is done, with a note; else the launcher's end is the error."""
    ended = f"was {describe_exit(rc)}" if rc < 0 else f"exited with code {rc}"
    if job.completed():
        done = (
            f"final/, the evaluation and the report are complete; see {RunDir(job.run_dir).report.path}"
            if job.evaluates
            else f"final/ is complete: {RunDir(job.run_dir).final}"
        )
        return Outcome(0, [f"ftlaunch: the launcher process {ended}, but its ranks ran to the end: {done}"])
    error = launcher_error(rc, stderr_tail)
    return Outcome(
        EXIT_CRASHED, [f"error: {error}", f"  log: {launcher_log}", f"  {job.advice(EXIT_CRASHED)}"]
    )


def launcher_error(rc: int, stderr_tail: list[bytes]) -> str:
    """The signal that killed the launcher (its last output line is then unrelated: an Accelerate
    warning, a progress line), else the last line it wrote before it failed."""
    if rc < 0:
        return f"the launcher process was {describe_exit(rc)} before any rank reported an error"
    last = next(
        (line.decode(errors="replace").strip() for line in reversed(stderr_tail) if line.strip()),
        "no output",
    )
    return f"the launcher failed (exit {rc}) before any rank reported an error: {last}"


# ---------------------------------------------------------------- the job


def supervise(run_dir: Path, machine_rank: int | None = None) -> int:
    """Run RUN/command.sh to its end and return ftlaunch's exit code (printing the summary).

    A training run whose rank crashed is started again, up to ``launch.max_restarts`` times,
    from its newest intact checkpoint (the ranks resume ``auto``); each restart is announced with
    its cause, and the ranks log it in metrics.jsonl. A training step that ran out of memory is not
    restarted so (the same micro batch runs out again) but, under train.auto_find_batch_size, continued
    with a smaller micro batch (with_smaller_batch), as often as it can be made smaller."""
    recipe = read_run_recipe(run_dir)
    node = node_rank(machine_rank)
    env = child_env(recipe, sys.stdout.isatty(), machine_rank)
    if recipe.launch.nodes > 1:  # else a node that waits for the others says nothing at all
        print(rendezvous_line(recipe, node), file=sys.stderr, flush=True)
    restarts = smaller = 0
    while True:
        outcome = run_once(run_dir, recipe, node, env)
        continued = with_smaller_batch(run_dir, recipe, outcome)
        if continued is not None:
            recipe, cause = continued
            smaller += 1
            env.update({RESTART_ENV: str(restarts + smaller), RESTART_CAUSE_ENV: cause, AUTO_BATCH_ENV: "1"})
            continue
        if outcome.restart_cause is None or restarts >= recipe.launch.max_restarts:
            break
        restarts += 1
        cause = outcome.restart_cause
        print(
            f"ftlaunch: restart {restarts} of {recipe.launch.max_restarts} (launch.max_restarts): {cause}; "
            "continuing from the newest intact checkpoint",
            file=sys.stderr,
            flush=True,
        )
        env.update({RESTART_ENV: str(restarts + smaller), RESTART_CAUSE_ENV: cause})
    for line in outcome.lines:
        print(line, file=sys.stderr, flush=True)
    return outcome.code


def with_smaller_batch(run_dir: Path, recipe: Recipe, outcome: Outcome) -> tuple[Recipe, str] | None:
    """train.auto_find_batch_size after a step ran out of memory: the run's recipe.yaml and rendered
    configs rewritten with the next smaller micro batch (core/auto_batch.py), the line said, and the
    new recipe with the restart's cause; None when this outcome is not that (or nothing is left to
    halve). Bounded by the micro batch itself, so not counted against launch.max_restarts."""
    if outcome.out_of_memory is None or not recipe.train.auto_find_batch_size:
        return None
    shape, _ = smaller_shape(recipe)
    if shape is None:
        return None
    smaller = with_shape(recipe, shape)
    rerender_recipe(smaller, run_dir)
    line = continuing_line(batch_shape(recipe), shape, recipe.launch.world_size)
    print(line, file=sys.stderr, flush=True)
    return smaller, line.removeprefix("ftlaunch: ")


def rendezvous_line(recipe: Recipe, node: int) -> str:
    """What a node of a multi-node run waits for before its ranks start training."""
    launch = recipe.launch
    address = launch.main_address or os.environ.get("FTLAUNCH_MAIN_ADDRESS") or "the job's first node"
    port = f" port {launch.main_port}" if launch.main_port else ""
    return (
        f"ftlaunch: node {node} of {launch.nodes}: the ranks start once all {launch.nodes} nodes have "
        f"joined at {address}{port} (each started with the same flags and its own machine rank)"
    )


def run_once(run_dir: Path, recipe: Recipe, node: int, env: dict[str, str]) -> Outcome:
    """One start of RUN/command.sh, watched to its end: its outcome (the summary is not printed)."""
    launcher_log = launcher_log_path(run_dir, recipe, node)
    if node == 0:
        RunDir(run_dir).clear_interrupted()  # a crash now must not look like a preemption
    log = LogFile(launcher_log)
    started = time.time()
    sys.stdout.flush()
    child = subprocess.Popen(
        ["bash", str(RunDir(run_dir).command_sh)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
        pass_fds=runlock.held_fds(run_dir),  # the run holds its directory as long as any of it lives
    )
    pumps = [Pump(child.stdout, log, to_console=True), Pump(child.stderr, log, to_console=False)]
    for pump in pumps:
        pump.start()
    forwarder = SignalForwarder(child, Job.of(run_dir, started, recipe))
    forwarder.install()
    try:
        rc = child.wait()
        for pump in pumps:  # until every rank has closed the pipes too (a rank may outlive the launcher)
            pump.join()
    finally:
        forwarder.uninstall()
        log.close()
    return decide(run_dir, recipe, node, rc, started, forwarder.received, list(pumps[1].tail), launcher_log)
