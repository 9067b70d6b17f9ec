"""Files in a run directory through which schedulers talk to a training run (slurm/render.py):
`STOP` asks the run to checkpoint after the current step and exit 0; `FINISHED` says the last
step is done; `run_state.json` says where the run stands."""

RUN_STATE = "run_state.json"
FINISHED_MARKER = "FINISHED"
STOP_FILE = "STOP"
