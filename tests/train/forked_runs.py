"""`python tests/train/forked_runs.py CASES.json OUT.json`: `python -m train` once per case, each in a process
forked from this one after the imports every run pays (torch, Hydra, the trainer), so that the interpreter
starts once. A case is {"args": [...], "env": {...}} (set on top of this process's environment); OUT.json
gets, per case, {"returncode", "stdout", "stderr"}."""

import atexit
import json
import os
import runpy
import sys
import tempfile
import traceback

import hydra  # noqa: F401
import torch  # noqa: F401

import train.lifecycle  # noqa: F401


def _exit_code(e: SystemExit) -> int:
    """The status the interpreter exits with for `e` (a non-integer code is printed, status 1)."""
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def _child(args: list[str], env: dict[str, str]) -> int:
    os.environ.update(env)
    sys.argv = ["train", *args]
    try:
        runpy.run_module("train", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:  # noqa: BLE001 - reported as the interpreter would
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    return code


def run(args: list[str], env: dict[str, str]) -> dict:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            code = 1
            try:
                code = _child(args, env)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        out.seek(0)
        err.seek(0)
        return {"returncode": status, "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}


if __name__ == "__main__":
    cases = json.loads(open(sys.argv[1]).read())
    results = [run(c["args"], c.get("env", {})) for c in cases]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
