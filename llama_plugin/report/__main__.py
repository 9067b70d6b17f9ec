"""python -m llama_plugin.report <run_dir> [--out DIR]: PNG plots of a run's metrics.jsonl and a
Markdown page (report.md) showing them; prints the paths as one JSON line. A directory without
metrics is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from llama_plugin.report.plots import ReportError, read_rows, write_plots
from llama_plugin.run_files import write_text_atomic


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_plugin.report", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="where the PNGs go (default: <run_dir>/plots)")
    args = p.parse_args(argv)
    out = args.out or args.run_dir / "plots"
    try:
        written = write_plots(args.run_dir, out)
        rows = read_rows(args.run_dir)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = rows[-1]
    lines = [f"# {args.run_dir.name}", "", f"{len(rows)} logged steps, the last at step {last['step']}.", ""]
    lines += [f"![{name}]({os.path.relpath(path, out)})" for name, path in written.items()]
    md = out / "report.md"
    write_text_atomic(md, "\n".join(lines) + "\n")
    print(json.dumps({"plots": {k: str(v) for k, v in written.items()}, "report": str(md)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
