"""Issue 12's acceptance: a job through ``certify submit-job`` against the bare engine on the
same model, precision and images, side by side in one run; and ``certify status`` on a job
whose log holds 1 GB.

    python bench/pipeline.py                                   # CPU: 120 CIFAR-10 images, WRN-40-2
    python bench/pipeline.py --device cuda --images 7000 --checkpoint bench/.models/wrn40_2-dssn-1.0.pt

On the GPU machine, after ``../shared/tools/gpu-stage`` here: one command carrying .gpu/a,
``bash .gpu/a/unpack.sh``, then at once one carrying .gpu/c, ``bash .gpu/c/unpack.sh &&
python3 bench/train_quick.py --cifar /tmp/gpu-stage/cifar --out /tmp/wrn.pt --device cuda &&
CIFAR=/tmp/gpu-stage/cifar python3 bench/pipeline.py --device cuda --images 7000 --checkpoint
/tmp/wrn.pt``.

The bare engine is this process certifying the images in units of the job's shard size with
the model loaded and warm (its first unit is timed apart: load, float64 reference, compile).
The job is the whole user path: the CLI submits it to a private Ray instance (started before
timing) and waits for its end; "end to end" counts from the command to its exit, "driver"
the driver's own run (the job's ``progress.json``: without job submission and the driver
process's start). Votes of the job must equal the bare engine's, bit for bit. Benchmarks
never assert on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from certlib.analysis import load_results  # noqa: E402
from certlib.checkpoints.checkpoint import ModelCard, load_checkpoint, save_checkpoint  # noqa: E402
from certlib.data import load_dataset  # noqa: E402
from certlib.engine.cascade import Cascade  # noqa: E402
from certlib.engine.voting import default_batch_size  # noqa: E402
from certlib.families import make_noise  # noqa: E402
from certlib.models import build_model  # noqa: E402
from certlib.smooth import Smooth  # noqa: E402
from cluster.client import jobs, local_ray  # noqa: E402
from cluster.plan import model_keys  # noqa: E402
from cluster.record import PROGRESS_PREFIX, progress_file  # noqa: E402
from cluster.spec import parse_spec  # noqa: E402

DEFAULT_CIFAR = Path(os.environ.get("CIFAR", ROOT.parent / "shared" / "data" / "cifar-10-batches-bin"))
TARGET = 0.95


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def model_checkpoint(args, test, path: Path) -> Path:
    """The given checkpoint linked at ``path`` (the spec's template), or random weights saved there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        path.symlink_to(args.checkpoint.resolve())
        return path
    torch.manual_seed(0)
    model = build_model(args.arch, 10, test.mean, test.std, test.input_shape)
    card = ModelCard.describing(
        args.arch, test, make_noise("dssn", args.sigma, q=255, seed=0), seed=0, training="standard"
    )
    save_checkpoint(path, model, card)
    return path


def job_spec(cifar: Path, images: int, models: Path, sigma: float) -> dict:
    """The job's spec without name, output and resources: DSSN at ``sigma`` on the first
    ``images`` CIFAR-10 test images, precision auto, the model found under ``models``."""
    return {
        "dataset": {"name": "cifar10", "split": "test", "root": str(cifar), "limit": images},
        "models": {"path": str(models / "{method}-{training}-{sigma}-{seed}.pt")},
        "methods": ["dssn"],
        "sigmas": [sigma],
        "certify": {"precision": "auto"},
    }


def bare_engine(
    checkpoint: Path, card_sigma: float, test, images: int, shard: int, device: torch.device, threads: int
) -> tuple[float, float, np.ndarray]:
    """(seconds of the first unit, seconds of the rest per image, votes of every image)."""
    torch.set_num_threads(threads)
    model, card = load_checkpoint(checkpoint, device=device)
    noise = make_noise("dssn", card_sigma, q=255, seed=0)
    cascade = Cascade(model, 10, default_batch_size(device, int(np.prod(card.input_shape))), device=device)
    votes, first, rest = [], 0.0, 0.0
    for start in range(0, images, shard):
        rows = np.arange(start, min(start + shard, images))
        began = time.perf_counter()
        result = Smooth(cascade, noise, 10).certify(test.pixels(rows), test.indices[rows])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
        first, rest = (seconds, rest) if start == 0 else (first, rest + seconds)
        votes.append(result["votes"])
    return first, rest / max(1, images - min(shard, images)), np.concatenate(votes)


def job(dashboard_url: str, spec: dict, work: Path, name: str) -> tuple[float, float, np.ndarray]:
    """(end-to-end seconds, driver seconds, votes in image order) of one job submitted to the Ray
    whose dashboard is at ``dashboard_url``."""
    spec = {**spec, "name": name, "output": str(work / name)}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "submit-job", str(path), "--address", dashboard_url, "--wait"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    driver = json.loads(progress_file(work / name).read_text())["elapsed_seconds"]
    rows = load_results(work / name, columns=["image_index", "votes"]).sort_values("image_index")
    return wall, driver, np.stack([np.asarray(v) for v in rows["votes"]])


def status_on_a_big_log(instance, gigabytes: float) -> list[list[str]]:
    """A certify-labelled job whose log holds ``gigabytes`` GB and then a progress line; the
    time `certify status` takes on it, in-process and as a command."""
    client = jobs.connect(instance.dashboard_url)
    line = "x" * 1023
    count = int(gigabytes * 2**30 / 1024)
    progress = PROGRESS_PREFIX + json.dumps(
        {
            "images_done": 1,
            "images_total": 2,
            "images_per_second": 1.0,
            "eta_seconds": 1.0,
            "training_eta_seconds": 0.0,
            "units_done": 1,
            "units_total": 2,
            "units_failed": 0,
            "models_trained": 0,
            "models_to_train": 0,
            "elapsed_seconds": 1.0,
            "by_model": {"m": [1, 2]},
            "training": {},
        }
    )
    code = (
        f"import sys\nline = {line!r} + '\\n'\nfor _ in range({count}):\n    sys.stdout.write(line)\n"
        f"print({progress!r}, flush=True)\nimport time\ntime.sleep(600)"
    )
    job_id = client.submit_job(
        entrypoint=f"{sys.executable} -c {shlex.quote(code)}",
        metadata={"certify": "1", "name": "big-log", "output": "/nonexistent"},
    )
    deadline = time.time() + 600
    while time.time() < deadline and jobs.latest_progress(client, job_id, None) is None:
        time.sleep(2)
    began = time.perf_counter()
    found = jobs.latest_progress(client, job_id, None)
    inside = time.perf_counter() - began
    began = time.perf_counter()
    cli = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "status", "big-log", "--address", instance.dashboard_url],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    command = time.perf_counter() - began
    client.stop_job(job_id)
    ok = found is not None and "1/2 images" in cli.stdout
    return [[f"{gigabytes:g} GB", f"{inside:.3f}", f"{command:.2f}", "yes" if ok else "NO"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--shard", type=int, default=None, help="images per unit (default: images / 8)")
    parser.add_argument("--sigma", type=float, default=0.25, help="DSSN sigma (of --checkpoint's card if given)")
    parser.add_argument("--arch", default="wrn40_2")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--log-gb", type=float, default=1.0, help="size of the log `certify status` is timed on")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    test = load_dataset("cifar10", "test", args.cifar, limit=args.images)
    shard = args.shard or max(1, args.images // 8)
    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="certify-bench-"))
    sigma = load_checkpoint(args.checkpoint)[1].sigma if args.checkpoint else args.sigma
    spec = job_spec(args.cifar, args.images, work / "models", sigma)
    sweep = parse_spec({**spec, "name": "probe", "output": str(work / "probe")})
    checkpoint = model_checkpoint(args, test, model_keys(sweep)[0].checkpoint(sweep))

    first, per_image, bare_votes = bare_engine(checkpoint, sigma, test, args.images, shard, device, threads)
    bare_seconds = first + per_image * (args.images - min(shard, args.images))
    steady = per_image * args.images  # the engine's rate over every image, warm
    configs = [("one worker", {"workers": 1, "gpus_per_worker": 1 if gpu else 0, "cpus_per_worker": threads})]
    if gpu:
        configs.append(
            (
                "two packed (0.5 GPU each)",
                {"workers": 2, "gpus_per_worker": 0.5, "cpus_per_worker": max(1, threads // 2)},
            )
        )
    else:
        configs.append(
            (
                "two workers (half the CPUs each)",
                {"workers": 2, "gpus_per_worker": 0, "cpus_per_worker": max(1, threads // 2)},
            )
        )

    began = time.perf_counter()
    instance = local_ray.start(num_cpus=threads, num_gpus=torch.cuda.device_count() if gpu else 0, private=True)
    startup = time.perf_counter() - began
    rows = []
    try:
        for i, (label, resources) in enumerate(configs):
            wall, driver, votes = job(
                instance.dashboard_url, {**spec, "resources": {**resources, "shard_size": shard}}, work, f"job{i}"
            )
            differ = int((votes != bare_votes).any(axis=1).sum())
            rows.append(
                [
                    label,
                    f"{wall:.1f}",
                    f"{driver:.1f}",
                    f"{args.images / wall:.2f}",
                    f"{steady / wall:.3f}",
                    f"{bare_seconds / wall:.3f}",
                    f"{steady / driver:.3f}",
                    str(differ),
                ]
            )
        big_log = status_on_a_big_log(instance, args.log_gb)
    finally:
        local_ray.stop(instance)
    print(
        f"# Pipeline against the bare engine: {args.images} CIFAR-10 images, DSSN sigma {sigma}, {checkpoint.name}, "
        f"{args.device}, units of {shard} images\n"
    )
    print(
        f"Bare engine in this process: first unit {first:.1f} s (model load, float64 reference, compile), then "
        f"{per_image * 1000:.1f} ms per image ({1 / per_image:.2f} images/s warm); all images {bare_seconds:.1f} s. "
        f"Private Ray instance started in {startup:.1f} s (not in the walls).\n"
    )
    print(
        table(
            [
                "job",
                "end-to-end s",
                "driver s",
                "images/s",
                "vs warm engine (end to end)",
                "vs engine with its first unit",
                "vs warm engine (driver)",
                "votes differing",
            ],
            rows,
        )
    )
    verdict = float(rows[0][4])
    print(
        f"\n- {'PASS' if verdict >= TARGET else 'FAIL'}: one worker end to end {verdict:.3f} of the warm engine's rate "
        f"(target {TARGET})"
    )
    print(
        f"\n`certify status` on a job whose log holds {args.log_gb:g} GB "
        "(the last progress line via the log tail API):\n"
    )
    print(table(["log", "status call s (in process)", "`certify status` command s", "progress found"], big_log))


if __name__ == "__main__":
    main()
