"""How long the CLI takes to start: ``rostersync --help`` and ``rostersync users list``.

Each command runs as a whole process (interpreter start-up included), the best of ``--runs``
runs (default 5), against the bundled sample district synced into a temporary folder as the
README's quick start does. Then ``python -X importtime -m rostersync --help`` says which heavy
modules ``--help`` loads. Not a test: timings depend on the machine (see README.md here).

    python -m tests.benchmarks.cli_startup [--runs N]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Issue 17's targets, in seconds.
TARGETS = {"--help": 0.3, "users list": 0.5}
#: Top-level packages that cost a command its start-up when it does not need them.
HEAVY = (
    "sqlalchemy",
    "sqlmodel",
    "alembic",
    "httpx",
    "httpcore",
    "openpyxl",
    "google",
    "pydantic",
    "pydantic_core",
    "structlog",
    "apscheduler",
    "prometheus_client",
    "psycopg",
    "yaml",
    "ruamel",
    "orjson",
    "tenacity",
)


def _cli() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m rostersync``."""
    script = Path(sys.executable).with_name("rostersync")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rostersync"]


#: The commands' environment: with bytecode caches, as an installed package has them (the
#: first run writes them), even where PYTHONDONTWRITEBYTECODE is set for development.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def best_of(argv: Sequence[str], runs: int, cwd: Path) -> tuple[float, float]:
    """The shortest wall time and the shortest CPU time (user + system) of ``runs`` runs of
    ``argv`` (each must exit 0). CPU time says more than wall time on a busy machine."""
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(argv, cwd=cwd, env=ENV, check=True, stdout=subprocess.DEVNULL)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return min(walls), min(cpus)


def imported_by_help(cwd: Path) -> dict[str, float]:
    """Heavy top-level packages ``--help`` imports, with their cumulative import time (s)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rostersync", "--help"],
        cwd=cwd,
        env=ENV,
        check=True,
        capture_output=True,
        text=True,
    )
    found: dict[str, float] = {}
    for line in out.stderr.splitlines():
        # "import time: self [us] | cumulative | imported package"
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
        if not cumulative.isdigit():
            continue  # the header
        top = name.split(".")[0]
        if top in HEAVY and name == top:
            found[top] = max(found.get(top, 0.0), int(cumulative) / 1e6)
        elif top in HEAVY and top not in found:
            found[top] = int(cumulative) / 1e6  # a submodule came first: a lower bound
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command (best counts)")
    args = parser.parse_args(argv)
    cli = _cli()
    with tempfile.TemporaryDirectory(prefix="rostersync-startup-") as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "config", work / "config")
        config = ["--config", "config/rostersync.example.yaml"]
        print("... syncing the sample district", file=sys.stderr)
        subprocess.run(
            [*cli, *config, "sync"],
            cwd=work,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**ENV, "NO_COLOR": "1"},
        )
        missed = False
        for label, command in (("--help", ["--help"]), ("users list", [*config, "users", "list"])):
            best, cpu = best_of([*cli, *command], args.runs, work)
            target = TARGETS[label]
            verdict = "ok" if best <= target else "MISSED"
            missed |= best > target
            print(
                f"rostersync {label}: {best:.3f} s (best of {args.runs}; "
                f"target <= {target} s: {verdict}); CPU {cpu:.3f} s"
            )
        heavy = imported_by_help(work)
        if heavy:
            listed = ", ".join(f"{name} {s:.3f} s" for name, s in sorted(heavy.items()))
            print(f"--help imports: {listed}")
        else:
            print("--help imports none of: " + ", ".join(HEAVY))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
