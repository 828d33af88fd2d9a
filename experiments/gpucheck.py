"""One command checks a GPU: the environment, the tests that touch the device, the gpu preset's main
job, its tokens.png, its models' speed, the bench at the gpu sizes and static widths under CUDA
graphs, each step time-boxed, all in one folder.

    python -m experiments.gpucheck --out gpucheck                       # on a machine with a GPU
    python -m experiments.gpucheck --out /tmp/check --device cpu --size tiny   # the same steps, on a CPU

Each step runs in a process of its own, forked from this one with torch already imported (a
fresh interpreter would spend seconds importing it again; so start this command in a fresh
process: a fork of one that has run OpenMP can hang), within its time box (TIME_BOX, seconds:
under 12 minutes in all), and writes <step>.log; a step that runs out of time is stopped and the
next one runs. summary.md (summary-<steps>.md for --steps) lists every step's exit code and wall
time; the main job leaves main/metrics.json and main/train.log, the truth
step main/tokens.png, the speed step (the main job's models, timed in turns on its test pairs)
speed/bench-<device>.md, the bench (random weights) bench/bench-<device>.md and .json, static
widths with CUDA graphs (experiments/static.py) static/static-<device>.md.
"""

import argparse
import json
import multiprocessing
import os
import runpy
import signal
import sys
import time
from pathlib import Path

import train   # noqa: F401  (imported here so that every step's process starts with torch loaded)

ROOT = Path(__file__).parent.parent

# seconds of device time per step, 720 in all: a lease is 15 minutes with the machine's start and
# one call at most 10, so the check runs as two calls (--steps env,tests,bench,static: 180 s, then
# --steps main,truth,speed: 540 s); on an H200 (docs/speed.md) the gpu preset's main job took 389
# s, the bench two sizes at batch 1 and 256 70 s, the device tests 5.5 s
TIME_BOX = dict(env=15, tests=25, bench=90, static=50, main=480, truth=20, speed=40)
# --size tiny: a smoke run of every step, so that the script works before any GPU sees it
QUICK = ["--dense-steps", "20", "--prune-steps", "8", "--num-train", "100", "--num-val", "20", "--num-test", "20"]
ENV_REPORT = ("import torch, torchvision, platform; c = torch.cuda.is_available(); "
              "print('python', platform.python_version(), 'torch', torch.__version__, 'torchvision', "
              "torchvision.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); "
              "print('device', torch.cuda.get_device_name(0) if c else 'none', 'count', torch.cuda.device_count(), "
              "'bf16', c and torch.cuda.is_bf16_supported(), 'threads', torch.get_num_threads())")


def steps(out, device, size, tests):
    """(name, command, environment additions) of each step."""
    py, main = sys.executable, out / "main"
    preset = ["--preset", "gpu"] if size == "gpu" else ["--preset", "tiny"] + QUICK
    large = ["--batch-size", "256"] * (device == "cuda") if size == "gpu" else ["--batch-size", "8", "--rounds", "1"]
    sizes = ["--sizes", "gpu-65,gpu" if size == "gpu" else "tiny"]
    checkpoint = main / f"madtp-sample-{0.5:.2f}.pt"
    return [("env", [py, "-c", ENV_REPORT], {}),
            ("tests", [py, "-m", "pytest", "-q", "-x", "-m", "device", "-k", tests, "-p", "no:cacheprovider"],
             dict(MADTP_TEST_DEVICE=device)),
            ("main", [py, "train.py", *preset, "--device", device, "--out", str(main)], {}),
            ("truth", [py, "-m", "experiments.truth", str(checkpoint), "--device", device, "--out", str(main)], {}),
            ("speed", [py, "-m", "experiments.bench", "--checkpoints", str(main), *large, "--device", device,
                       "--out", str(out / "speed")], {}),
            ("bench", [py, "-m", "experiments.bench", *sizes, *large, "--device", device, "--out",
                       str(out / "bench")], {}),
            ("static", [py, "-m", "experiments.static", "--size", size, *large, "--device", device, "--out",
                        str(out / "static")], {})]


def run_step(name, command, env, box, out):
    """Run one step within its time box; (exit code or "timeout", seconds)."""
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        child = multiprocessing.get_context("fork").Process(target=step, args=(command, env, log.fileno()))
        child.start()
        child.join(box)
        if child.is_alive():
            child.kill()
            child.join()
        rc = "timeout" if child.exitcode == -signal.SIGKILL else child.exitcode
    return rc, time.perf_counter() - start


def step(command, env, fd):
    """The child: output to the log, the step's environment, then the command as python would run it
    (-c code, -m module, or a script)."""
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    os.chdir(ROOT)
    if command[1] == "-c":
        exec(command[2], {})
    elif command[1] == "-m":
        sys.argv = [command[2], *command[3:]]
        runpy.run_module(command[2], run_name="__main__", alter_sys=True)
    else:
        sys.argv = command[1:]
        runpy.run_path(command[1], run_name="__main__")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m experiments.gpucheck")
    p.add_argument("--out", required=True, help="the folder for every log and result (created)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--size", choices=("gpu", "tiny"), default="gpu", help="the gpu preset, or the tiny one")
    p.add_argument("--tests", default="not slow", help="pytest -k expression for the device tests")
    p.add_argument("--steps", default=",".join(TIME_BOX), help="the steps to run, comma-separated")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = args.steps.split(",")
    if not set(chosen) <= set(TIME_BOX):
        p.error(f"--steps: choose from {','.join(TIME_BOX)}")
    results = {}
    for name, command, env in steps(out, args.device, args.size, args.tests):
        if name not in chosen:
            continue
        rc, seconds = run_step(name, command, env, TIME_BOX[name], out)
        results[name] = dict(rc=rc, seconds=round(seconds, 1), box=TIME_BOX[name])
        print(f"{name}: exit {rc} after {seconds:.0f} s (box {TIME_BOX[name]} s)", flush=True)
    lines = ["| step | exit | seconds | time box |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['rc']} | {r['seconds']} | {r['box']} |" for n, r in results.items()]
    name = "summary" if chosen == list(TIME_BOX) else "summary-" + "-".join(chosen)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
