"""The sbatch script of a training run, rendered from its recipe's `cluster` section.

One job = N nodes, one task per node; each task runs `torchrun` with c10d rendezvous on the job's
first node, training from the composed recipe file. The batch shell traps USR1 (sent by Slurm
`signal_lead_s` before the time limit, or by `scancel --batch --signal=USR1`) and asks training to
stop with a STOP file in the run directory (training checkpoints and exits 0); then it continues the
run: with a chained
successor job waiting (`--dependency=afterany`), by ending; otherwise by `scontrol requeue`, at
most `max_restarts` times. A `FINISHED` marker in the run directory (written by training) ends it
all. Every value from the config is quoted for the place it goes: bash words with shlex, `#SBATCH`
values for sbatch's own parser; control characters are refused.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from llama_plugin.run_files import FINISHED_MARKER, PAUSED_MARKER, REQUEUE_REQUEST, STOP_FILE, is_secret
from recipes import RecipeError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# In <run_dir>/slurm/: every job id of the run, one per line (slurm.stop and slurm.launch read it);
# the marker slurm.stop leaves so that no job of the run trains, requeues or submits another; the
# nodes left out after silent data corruption.
JOBS_FILE = "jobs"
CHAIN_STOP = "STOPPED"
EXCLUDED_NODES = "excluded_nodes"
_PLAIN = re.compile(r"^[A-Za-z0-9_./:@+,=-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Variables the job script sets and reads itself (cluster.env is exported after them, so an entry
# of the same name would silently replace one), and Slurm's own SLURM_*.
_SCRIPT_VARIABLES = {"RUN_DIR", "SLURM_DIR", "SCRIPT", "MAX_RESTARTS", "CHAIN_JOBS", "MAX_FAILURES", "RESTARTS",
                     "CHAIN_INDEX", "LLAMA_CHAIN_INDEX", "LLAMA_RESTART_BASE", "RECIPE_FILE", "TRAIN_MODULE",
                     "NPROC_PER_NODE", "RDZV_PORT", "MASTER_ADDR", "stop_asked", "successor", "successor_record",
                     "failures", "srun_pid", "rc", "exclude", "reason", "hosts", "replacement", "stop_signal",
                     "LLAMA_REQUIRE_CUDA"}

_TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")


def time_limit_seconds(text: str) -> int:
    """Seconds in a Slurm time limit: minutes, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    days, _, rest = text.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + s
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def _check_text(field: str, value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise RecipeError(f"{field}: control characters (newline, tab, ...) are not allowed: {value!r}")
    return value


def directive_value(field: str, value) -> str:
    """A value for an `#SBATCH --opt=VALUE` line. sbatch splits those lines on spaces and reads
    double quotes with backslash escapes; the line is a comment to bash."""
    value = _check_text(field, str(value))
    if _PLAIN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sh(field: str, value) -> str:
    """One bash word."""
    return shlex.quote(_check_text(field, str(value)))


def _task_command(c) -> str:
    """What each node's task runs. Single-quoted as a whole: $SLURM_NODEID and friends expand in
    the task, on its node, not in the batch shell (node 0 hosts the rendezvous store; c10d assigns
    the ranks). torchrun ignores USR1 and TERM (inherited SIG_IGN, and TERM left out of the signals
    it handles): at preemption Slurm sends TERM to every process, and torchrun's own handling would
    kill the workers 30 s later and exit 1. The training processes install their own handlers:
    checkpoint after the current step, exit 0; torchrun then exits 0."""
    is_host = '$([ "$SLURM_NODEID" = 0 ] && echo true || echo false)'
    return ('trap "" USR1 TERM; export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT; exec torchrun'
            ' --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE"'
            ' --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$RDZV_PORT"'
            f' --rdzv_conf="is_host={is_host}" --max_restarts=0'
            ' -m "$TRAIN_MODULE" --config "$RECIPE_FILE"')


def render(cfg, run_dir: Path, recipe_file: Path, script_file: Path, workdir: Path,
           module: str = "llama_plugin.train") -> str:
    """The sbatch script text for a validated recipe (paths absolute); `module` trains from it
    (`llama_plugin.train`, or `llama_plugin.finetune` for a fine-tuning recipe)."""
    c = cfg.cluster
    if not _TIME.match(c.time_limit):
        raise RecipeError(f"cluster.time_limit: {c.time_limit!r} is not [D-]HH:MM:SS, MM:SS or minutes")
    for key in ("cpus_per_node", "rdzv_port", "signal_lead_s", "chain_jobs", "max_failures"):
        if c[key] <= 0:
            raise RecipeError(f"cluster.{key}: must be > 0, got {c[key]}")
    limit = time_limit_seconds(c.time_limit)
    if c.signal_lead_s >= limit or c.signal_lead_s > 65535:  # sbatch --signal takes at most 65535 s
        raise RecipeError(f"cluster.signal_lead_s: {c.signal_lead_s} s must be shorter than cluster.time_limit="
                          f"{c.time_limit} ({limit} s) and at most 65535 s: the checkpoint signal would come too early")
    if c.max_restarts < 0:
        raise RecipeError(f"cluster.max_restarts: must be >= 0, got {c.max_restarts}")
    slurm_dir = run_dir / "slurm"
    # Slurm expands %j (job id) and friends in --output; a literal % in the path is written %%.
    output = str(slurm_dir).replace("%", "%%") + "/slurm-%j.out"

    d = [("job-name", c.job_name, "cluster.job_name"), ("nodes", c.nodes, "cluster.nodes"),
         ("ntasks-per-node", 1, ""), ("cpus-per-task", c.cpus_per_node, "cluster.cpus_per_node")]
    if c.gres:
        d.append(("gres", f"{c.gres}:{c.gpus_per_node}", "cluster.gres"))
    if c.mem is not None:
        d.append(("mem", c.mem, "cluster.mem"))
    d.append(("time", c.time_limit, "cluster.time_limit"))
    for key in ("partition", "account", "qos"):
        if c[key]:
            d.append((key, c[key], f"cluster.{key}"))
    d += [("output", output, "train.run_dir"), ("open-mode", "append", ""),
          ("signal", f"B:USR1@{c.signal_lead_s}", ""), ("requeue", None, ""), ("chdir", str(workdir), "cluster.workdir")]
    if c.exclusive:
        d.append(("exclusive", None, ""))
    directives = [f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={directive_value(f, v)}" for k, v, f in d]

    setup = [f"module load {sh('cluster.modules', m)}" for m in c.modules]
    if c.venv:
        setup += ["# shellcheck source=/dev/null", f"source {sh('cluster.venv', str(Path(c.venv) / 'bin' / 'activate'))}"]
    for name, value in c.env.items():
        if not _ENV_NAME.match(name):
            raise RecipeError(f"cluster.env: {name!r} is not a valid environment variable name")
        if name in _SCRIPT_VARIABLES or name.startswith("SLURM_"):
            raise RecipeError(f"cluster.env.{name}: set by the job script (or by Slurm) itself; it cannot be overridden")
        if is_secret(name):
            # The value comes with the job's environment (slurm.launch passes it to sbatch).
            setup.append(f': "${{{name}:?cluster.env.{name} is a secret passed by slurm.launch; it is not set}}"')
            continue
        setup.append(f"export {name}={sh(f'cluster.env.{name}', value)}")
    if c.gres:
        # The job asked for GPUs: a rank that finds no working CUDA fails at start (naming its
        # node) instead of joining as a gloo/CPU rank that hangs the job for its timeout.
        setup.append("export LLAMA_REQUIRE_CUDA=1")
    # Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task: without it the node's one
    # task (torchrun and all its ranks) is bound to a single CPU.
    srun_opts = ["--ntasks-per-node=1", f"--cpus-per-task={int(c.cpus_per_node)}", "--kill-on-bad-exit=1"]
    if c.container_image:
        srun_opts.append(f"--container-image={sh('cluster.container_image', c.container_image)}")
        if c.container_mounts:
            srun_opts.append(f"--container-mounts={sh('cluster.container_mounts', c.container_mounts)}")
        srun_opts.append(f"--container-workdir={sh('cluster.workdir', str(workdir))}")
    srun_opts += [sh("cluster.srun_args", a) for a in c.srun_args]

    values = {
        "RECIPE_NAME": _check_text("name", cfg.name),
        "DIRECTIVES": "\n".join(directives),
        "RUN_DIR": sh("train.run_dir", str(run_dir)),
        "SLURM_DIR": sh("train.run_dir", str(slurm_dir)),
        "SCRIPT": sh("train.run_dir", str(script_file)),
        "RECIPE_FILE": sh("train.run_dir", str(recipe_file)),
        "WORKDIR": sh("cluster.workdir", str(workdir)),
        "PROJECT_ROOT": sh("project root", str(PROJECT_ROOT)),
        "NPROC_PER_NODE": str(int(c.gpus_per_node)),
        "TRAIN_MODULE": sh("module", module),
        "RDZV_PORT": str(int(c.rdzv_port)),
        "THREADS_PER_PROCESS": str(max(1, c.cpus_per_node // c.gpus_per_node)),
        "MAX_RESTARTS": str(int(c.max_restarts)),
        "CHAIN_JOBS": str(int(c.chain_jobs)),
        "MAX_FAILURES": str(int(c.max_failures)),
        "FINISHED_MARKER": FINISHED_MARKER,
        "PAUSED_MARKER": PAUSED_MARKER,
        "STOP_FILE": STOP_FILE,
        "REQUEUE_REQUEST": REQUEUE_REQUEST,
        "CHAIN_STOP": CHAIN_STOP,
        "JOBS_FILE": JOBS_FILE,
        "EXCLUDED_NODES": EXCLUDED_NODES,
        "SETUP": "\n".join(setup) if setup else "# (no modules, venv or environment configured)",
        "SRUN_OPTS": " ".join(srun_opts),
        "TASK": shlex.quote(_task_command(c)),
    }
    # One pass over the template: text inserted from the config is never substituted again.
    return re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], TEMPLATE)


TEMPLATE = r"""#!/bin/bash
# LLaMA training job for recipe @RECIPE_NAME@, rendered by `python -m slurm.launch`; re-render
# rather than edit (the recipe is the source of truth).
# Values from the config are literal text by design, $ and ` included:
# shellcheck disable=SC2016
@DIRECTIVES@

# This runs in the batch shell on the first node; the srun task below runs once per node.
set -uo pipefail

RUN_DIR=@RUN_DIR@
SLURM_DIR=@SLURM_DIR@
SCRIPT=@SCRIPT@
MAX_RESTARTS=@MAX_RESTARTS@
CHAIN_JOBS=@CHAIN_JOBS@
MAX_FAILURES=@MAX_FAILURES@
# Restarts of this job; a replacement job (submitted without a faulty node) carries the count on.
RESTARTS=$((${SLURM_RESTART_COUNT:-0} + ${LLAMA_RESTART_BASE:-0}))
CHAIN_INDEX=${LLAMA_CHAIN_INDEX:-1}
# Read by every task (srun passes the environment on).
export RECIPE_FILE=@RECIPE_FILE@
export TRAIN_MODULE=@TRAIN_MODULE@
export NPROC_PER_NODE=@NPROC_PER_NODE@
export RDZV_PORT=@RDZV_PORT@
# CPU threads per training process unless the cluster's env sets it (torchrun's default is 1).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-@THREADS_PER_PROCESS@}

log() {
    printf '[%s] job %s, restart %s, chain job %s/%s: %s\n' "$(date -u +%FT%TZ)" "$SLURM_JOB_ID" \
        "$RESTARTS" "$CHAIN_INDEX" "$CHAIN_JOBS" "$*"
}

# USR1 (time limit) or TERM (preemption, scancel) to this shell -> a STOP file in the run directory,
# which training checks after every step.
# (A signal sent into the job step would reach every process in it, helper processes included.)
# Trapped first thing: Slurm may send it early, and untrapped it would kill this shell.
stop_asked=0
stop_signal=""
# shellcheck disable=SC2317  # called by the trap
ask_to_stop() {
    stop_asked=1
    stop_signal=$1
    log "$1: asking training to checkpoint and stop"
    : >"$RUN_DIR/@STOP_FILE@"
}
rm -f "$RUN_DIR/@STOP_FILE@" "$RUN_DIR/@REQUEUE_REQUEST@"  # left from an earlier job
trap 'ask_to_stop USR1' USR1
trap 'ask_to_stop TERM' TERM
mkdir -p "$SLURM_DIR"
printf '%s\n' "$SLURM_JOB_ID" >>"$SLURM_DIR/@JOBS_FILE@"

if [ -e "$SLURM_DIR/@CHAIN_STOP@" ]; then
    log "the run was stopped by slurm.stop ($SLURM_DIR/@CHAIN_STOP@); nothing to do"
    exit 0
fi
# Nodes found to corrupt data silently are left out of every later job of the run.
exclude=()
if [ -s "$SLURM_DIR/@EXCLUDED_NODES@" ]; then
    exclude=(--exclude="$(sort -u "$SLURM_DIR/@EXCLUDED_NODES@" | paste -sd, -)")
fi

cd @WORKDIR@ || exit 1
@SETUP@
export PYTHONPATH=@PROJECT_ROOT@${PYTHONPATH:+:$PYTHONPATH}

if [ -e "$RUN_DIR/@FINISHED_MARKER@" ]; then
    log "the run is finished ($RUN_DIR/@FINISHED_MARKER@); nothing to do"
    exit 0
fi
if [ -e "$RUN_DIR/@PAUSED_MARKER@" ]; then
    log "the run paused at train.exit_at_step ($RUN_DIR/@PAUSED_MARKER@); nothing to do until a new launch"
    exit 0
fi

# A chain: each job submits its successor first thing, so the chain goes on even if this job is
# killed outright. The successor waits (afterany) and starts only when this one has ended.
successor=""
if [ "$CHAIN_JOBS" -gt 1 ]; then
    failures=$(cat "$SLURM_DIR/chain_failures" 2>/dev/null || echo 0)
    if [ "$failures" -ge "$MAX_FAILURES" ]; then
        log "the chain stops: $failures job(s) in a row failed (cluster.max_failures=$MAX_FAILURES)"
        exit 1
    fi
    successor_record="$SLURM_DIR/successor_of_$SLURM_JOB_ID"
    if [ -s "$successor_record" ]; then
        successor=$(cat "$successor_record")  # this job was requeued; its successor exists
    elif [ "$CHAIN_INDEX" -lt "$CHAIN_JOBS" ]; then
        # A clean environment for sbatch: this job's SLURM_* variables must not leak into the next.
        successor=$(env -u SLURM_RESTART_COUNT -u SLURM_JOB_ID -u SLURM_JOBID -u SLURM_JOB_NAME \
            LLAMA_CHAIN_INDEX=$((CHAIN_INDEX + 1)) \
            sbatch --parsable "${exclude[@]}" --dependency="afterany:$SLURM_JOB_ID" "$SCRIPT") \
            || { log "could not submit the next job of the chain"; successor=""; }
        successor=${successor%%;*}
        if [ -n "$successor" ]; then
            printf '%s\n' "$successor" >"$successor_record"
            printf '%s\n' "$successor" >>"$SLURM_DIR/@JOBS_FILE@"
            log "submitted chain job $((CHAIN_INDEX + 1)): $successor"
        fi
    fi
fi

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
log "training on $SLURM_JOB_NUM_NODES node(s) x $NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$RDZV_PORT"


# The task's variables expand on each node (single quotes here).
srun @SRUN_OPTS@ bash -c @TASK@ &
srun_pid=$!
rc=0
wait "$srun_pid" || rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # a trapped signal interrupted `wait`
    rc=0
    wait "$srun_pid" || rc=$?
done

# The run goes on after this job: in the chain's waiting successor, else by a requeue while this
# job has restarts left.
# shellcheck disable=SC2317  # called below
go_on() {
    if [ -n "$successor" ]; then
        log "$1; chain job $successor continues"
        exit 0
    fi
    if [ "$RESTARTS" -lt "$MAX_RESTARTS" ]; then
        log "$1; requeueing (restart $((RESTARTS + 1)) of $MAX_RESTARTS)"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    log "$1; this job has used its $MAX_RESTARTS restart(s); submit $SCRIPT again to go on"
    exit 1
}

# A segment that ends well resets the chain's count of failures in a row.
if [ -e "$RUN_DIR/@FINISHED_MARKER@" ]; then
    log "training finished"
    rm -f "$SLURM_DIR/chain_failures"
    exit 0
fi
if [ -e "$SLURM_DIR/@CHAIN_STOP@" ]; then
    log "training ended (exit code $rc); the run was stopped by slurm.stop: no requeue, no successor"
    exit 0
fi
if [ -s "$RUN_DIR/@REQUEUE_REQUEST@" ]; then
    # Training asked for a requeue: a hang (stacks in incidents/), or silent data corruption on a
    # node it names, left out from now on. torchrun exits 1 for any failed worker: the file says why.
    reason=$(sed -n 's/.*"reason": "\([a-z]*\)".*/\1/p' "$RUN_DIR/@REQUEUE_REQUEST@")
    hosts=$(sed -n 's/.*"exclude_hosts": \[\([^]]*\)\].*/\1/p' "$RUN_DIR/@REQUEUE_REQUEST@" | tr -d '" ' | tr ',' '\n')
    log "training exited for a requeue (exit code $rc): $(cat "$RUN_DIR/@REQUEUE_REQUEST@")"
    if [ "$CHAIN_JOBS" -gt 1 ]; then
        echo $(($(cat "$SLURM_DIR/chain_failures" 2>/dev/null || echo 0) + 1)) >"$SLURM_DIR/chain_failures"
    fi
    if [ -n "$hosts" ]; then
        printf '%s\n' "$hosts" >>"$SLURM_DIR/@EXCLUDED_NODES@"
        exclude=(--exclude="$(sort -u "$SLURM_DIR/@EXCLUDED_NODES@" | paste -sd, -)")
        log "$reason: node(s) $(sort -u "$SLURM_DIR/@EXCLUDED_NODES@" | paste -sd, -) excluded from now on"
    fi
    if [ -n "$hosts" ] && [ -n "$successor" ]; then
        scontrol update JobId="$successor" ExcNodeList="$(sort -u "$SLURM_DIR/@EXCLUDED_NODES@" | paste -sd, -)"
    elif [ -n "$hosts" ] && [ "$RESTARTS" -lt "$MAX_RESTARTS" ]; then
        # A running job's node list cannot change: a replacement job takes over, without the node.
        replacement=$(env -u SLURM_RESTART_COUNT -u SLURM_JOB_ID -u SLURM_JOBID -u SLURM_JOB_NAME \
            LLAMA_RESTART_BASE=$((RESTARTS + 1)) LLAMA_CHAIN_INDEX="$CHAIN_INDEX" \
            sbatch --parsable "${exclude[@]}" --dependency="afterany:$SLURM_JOB_ID" "$SCRIPT")
        replacement=${replacement%%;*}
        printf '%s\n' "$replacement" >"$SLURM_DIR/replaced_by_$SLURM_JOB_ID"
        printf '%s\n' "$replacement" >>"$SLURM_DIR/@JOBS_FILE@"
        log "requeued as job $replacement (restart $((RESTARTS + 1)) of $MAX_RESTARTS)"
        exit 0
    fi
    go_on "$reason"
fi
if [ "$rc" -ne 0 ] && [ "$stop_signal" = TERM ]; then
    # Preempted: srun, signalled itself, ends the job step within seconds, usually before training
    # has saved; the run goes on from its newest verified checkpoint. Not a failure.
    go_on "preempted (TERM; training ended with exit code $rc), to continue from the newest checkpoint"
fi
if [ "$rc" -ne 0 ]; then
    log "training failed (exit code $rc)"
    if [ "$CHAIN_JOBS" -gt 1 ]; then
        echo $(($(cat "$SLURM_DIR/chain_failures" 2>/dev/null || echo 0) + 1)) >"$SLURM_DIR/chain_failures"
    fi
    exit "$rc"
fi
if [ -e "$RUN_DIR/@PAUSED_MARKER@" ]; then
    log "training paused at train.exit_at_step; the run goes on only from a new launch (a later train.exit_at_step)"
    rm -f "$SLURM_DIR/chain_failures"
    exit 0
fi
# Exit 0 without the marker: training checkpointed and stopped (signal or train.exit_interval).
rm -f "$SLURM_DIR/chain_failures"
go_on "training stopped after a checkpoint (stop asked: $stop_asked)"
"""
