"""The image recipe on one GPU, in one call: throughput against a bare loop in every precision mode, evaluation
throughput, `experiment=lipman_cifar10_fm_ot` end to end with a SIGKILL and a resume, DDP on NCCL, and the tests
only a GPU can run. `scripts/gpu_check.sh` runs it (it installs what the machine lacks first).

    python scripts/gpu_check.py --out DIR            # on a GPU machine, about 8 minutes
    python scripts/gpu_check.py --dry-run --out DIR  # the same steps on the CPU with tiny sizes

Every step is recorded as it ends, in DIR/gpu_check.json and DIR/gpu_check.md (written whole after each step), so a
run stopped at its time limit still leaves what it measured. A step that fails records its error and the next runs.
The data are CIFAR-10-format batches of random images and the Inception weights a random init (nothing can be
downloaded there): the numbers are speeds and agreements, not FIDs of a real model.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ and tests/ (the kill callback) are read from the checkout

# the sizes of the two runs: a GPU run and its tiny CPU rehearsal
SIZES = {
    "gpu": {"train_per_batch": 2000, "test": 1000, "steps": 60, "warmup": 10, "chunk": 10, "e2e_steps": 200,
            "eval_samples": 2000, "nll_samples": 200, "flow_samples": 2000, "fid_images": 5000, "bpd_images": 50,
            "timeout": 240},
    "dry": {"train_per_batch": 8, "test": 8, "steps": 6, "warmup": 2, "chunk": 2, "e2e_steps": 8,
            "eval_samples": 16, "nll_samples": 4, "flow_samples": 8, "fid_images": 8, "bpd_images": 1,
            "timeout": 240},
}  # fmt: skip
# what the dry run swaps in so the same code path runs on 2 CPU cores in about a minute
DRY_OVERRIDES = ["trainer=cpu", "net=unet_small", "net.attention_resolutions=[16]", "data.batch_size=8",
                 "eval.batch_size=16", "solver.atol=1e-3", "solver.rtol=1e-3", "data.num_workers=0"]  # fmt: skip
# the precision modes of the throughput rows: (name, overrides)
MODES = [
    ("fp32", ["trainer.precision=32-true", "performance.matmul_precision=highest"]),
    ("tf32", ["trainer.precision=32-true", "performance.matmul_precision=high"]),
    ("bf16-mixed", ["trainer.precision=bf16-mixed", "performance.matmul_precision=high"]),
    (
        "bf16 + channels_last",
        ["trainer.precision=bf16-mixed", "performance.matmul_precision=high", "net.channels_last=true"],
    ),  # fmt: skip
    (
        "bf16 + channels_last + compile",
        [
            "trainer.precision=bf16-mixed",
            "performance.matmul_precision=high",
            "net.channels_last=true",
            "performance.compile=true",
        ],
    ),  # fmt: skip
]
PAPER_STEPS = 391_000  # Lipman et al. 2023, CIFAR-10: 1000 epochs at batch 256
RESUME_TOLERANCE = 1e-4  # relative; the README states it for GPUs with trainer.deterministic=true


class Report:
    """The results so far, written whole after every step."""

    def __init__(self, out: Path, dry_run: bool) -> None:
        self.out, self.data = out, {"dry_run": dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}
        out.mkdir(parents=True, exist_ok=True)

    def step(self, name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            result = run()
            result = {"ok": not result.get("failed"), **result}
        except Exception as error:  # one step's failure is recorded; the others still run
            result = {"ok": False, "error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-2000:]}
        if not result["ok"] and "error" not in result:
            result["error"] = f"failed: {result['failed']}"
        result["seconds"] = round(time.perf_counter() - started, 2)
        self.data["steps"][name] = result
        self.write()
        print(f"gpu_check: {name}: {'ok' if result['ok'] else 'FAILED ' + result['error']} ({result['seconds']} s)",
              flush=True)  # fmt: skip
        return result

    def write(self) -> None:
        from fmlab.io import write_json, write_text

        write_json(self.out / "gpu_check.json", self.data)
        write_text(self.out / "gpu_check.md", markdown(self.data))


def markdown(data: dict[str, Any]) -> str:
    steps = data["steps"]
    env = steps.get("environment", {})
    lines = [f"# gpu_check ({'dry run, CPU' if data['dry_run'] else env.get('device', '?')}, {data['started']})", ""]
    for name, step in steps.items():
        lines.append(f"- {name}: {'ok' if step['ok'] else 'FAILED: ' + step['error']} ({step['seconds']} s)")
    rows = steps.get("throughput", {}).get("rows", [])
    if rows:
        lines += ["", "| mode | fmlab ms/step | bare ms/step | ratio | images/s (fmlab) | peak GiB |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['mode']} | {r['fmlab_ms']:.2f} | {r['bare_ms']:.2f} | {r['ratio']:.3f} | "
                  f"{r['images_per_second']:.0f} | {r['peak_gib']:.2f} |" for r in rows if "fmlab_ms" in r]  # fmt: skip
        paper = steps["throughput"].get("paper_run_hours")
        if paper is not None:
            lines.append(f"\nThe paper's {PAPER_STEPS:,} steps at the fastest mode's rate: {paper:.1f} h on one GPU.")
    for name in ("evaluation throughput", "end to end", "ddp"):
        if name in steps and steps[name]["ok"]:
            shown = {k: v for k, v in steps[name].items() if k not in ("ok", "seconds", "trace")}
            lines += ["", f"**{name}**: " + ", ".join(f"{k} {v}" for k, v in shown.items())]
    return "\n".join(lines) + "\n"


def fake_cifar10(root: Path, per_batch: int, test: int) -> Path:
    """CIFAR-10's python batches (five data_batch_<i> and test_batch: pickled dicts of N × 3072 uint8 CHW rows and
    labels) holding random images: the real loader reads them as it reads the real files."""
    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        count = test if name == "test_batch" else per_batch
        rows = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        with (folder / name).open("wb") as handle:
            pickle.dump({b"data": rows, b"labels": list(rng.integers(0, 10, size=count))}, handle)
    return root


def random_inception_weights(target: Path) -> Path:
    """torch-fidelity's InceptionV3 at random init, saved in the format its loader reads (a state dict)."""
    from unittest import mock

    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with (
        mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict"),
        mock.patch.object(inception, "load_state_dict_from_url", return_value=None),
    ):
        torch.manual_seed(0)
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    torch.save(net.state_dict(), target)
    return target


def environment() -> dict[str, Any]:
    import lightning
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "lightning": lightning.__version__, "cuda": torch.cuda.is_available()}  # fmt: skip
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(device=properties.name, capability=f"{properties.major}.{properties.minor}",
                    memory_gib=round(properties.total_memory / 2**30, 1))  # fmt: skip
    return info


def throughput(recipe: list[str], sizes: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    """fmlab's Lightning loop against the bare PyTorch loop doing the same work, interleaved in one process, for
    every precision mode; images/s and the process's peak GPU memory (both loops' nets and optimiser states)."""
    import torch
    from benchmarks.bench import BareLoop, compare

    rows = []
    for mode, overrides in MODES:
        if dry_run and "performance.compile=true" in overrides:
            rows.append({"mode": mode, "skipped": "compile on the CPU takes minutes; the GPU run measures it"})
            continue
        args = [*recipe, *overrides]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            bare = BareLoop(args)
            row = compare(mode, args, sizes["steps"], sizes["warmup"], sizes["chunk"], bare=bare)
        except Exception as error:
            rows.append({"mode": mode, "error": f"{type(error).__name__}: {error}"})
            continue
        batch = bare.datamodule.batch_size
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        rows.append({"mode": mode, **{k: row[k] for k in ("fmlab_ms", "bare_ms", "ratio", "spread")},
                     "images_per_second": 1e3 * batch / row["fmlab_ms"], "peak_gib": peak})  # fmt: skip
    timed = [r for r in rows if "fmlab_ms" in r]
    fastest = min(timed, key=lambda r: r["fmlab_ms"]) if timed else None
    return {
        "rows": rows,
        "failed": [r["mode"] for r in rows if "error" in r],
        "fastest": fastest["mode"] if fastest else None,
        "paper_run_hours": PAPER_STEPS * fastest["fmlab_ms"] / 1e3 / 3600 if fastest else None,
        "within_5_percent": all(r["ratio"] <= 1.05 for r in timed) if timed else None,
    }


def train(args: list[str], run_dir: Path, timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmlab.train", *args, f"hydra.run.dir={run_dir}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip


def end_to_end(recipe: list[str], work: Path, sizes: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """The recipe for a few hundred steps with one periodic evaluation (FID, BPD), checkpoints, a SIGKILL after the
    second checkpoint and a resume, against an unbroken run: the resumed run's numbers must equal it within
    RESUME_TOLERANCE (trainer.deterministic=true)."""
    steps = sizes["e2e_steps"]
    common = [*recipe, f"trainer.max_steps={steps}", f"callbacks.evaluator.every_n_steps={steps // 2}",
              f"callbacks.model_checkpoint.every_n_train_steps={steps // 4}", "trainer.deterministic=true",
              "callbacks.sample_logger.every_n_steps=0"]  # fmt: skip
    unbroken = train(common, work / "unbroken", sizes["timeout"], env)
    if unbroken.returncode != 0:
        raise RuntimeError(f"the unbroken run failed: {unbroken.stderr[-1500:]}")
    kill = f"+callbacks.kill={{_target_: tests.signals.SignalAt, step: {3 * steps // 4 + 1}, signal_name: SIGKILL}}"
    killed = train([*common, kill], work / "killed", sizes["timeout"], env)
    if killed.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the killed run ended with {killed.returncode}: {killed.stderr[-1500:]}")
    resumed = subprocess.run([sys.executable, "-m", "fmlab.train", f"ckpt_path={work / 'killed'}",
                              "callbacks.kill=null"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=sizes["timeout"])  # fmt: skip
    if resumed.returncode != 0:
        raise RuntimeError(f"the resume failed: {resumed.stderr[-1500:]}")
    ours = json.loads((work / "killed" / "metrics.json").read_text())
    reference = json.loads((work / "unbroken" / "metrics.json").read_text())
    differences = {}
    for key in ("fid", "bpd", "nfe", "train_loss"):
        a, b = ours.get(key), reference.get(key)
        if isinstance(a, int | float) and isinstance(b, int | float):
            differences[key] = abs(a - b) / max(abs(b), 1e-12)
    return {
        "fid": reference.get("fid"), "bpd": reference.get("bpd"), "nfe": reference.get("nfe"),
        "train_seconds": reference.get("train_seconds"), "eval_seconds": reference.get("eval_seconds"),
        "resume_relative_differences": differences,
        "resume_within_tolerance": all(d <= RESUME_TOLERANCE for d in differences.values()),
        "checkpoint": str(work / "unbroken"),
    }  # fmt: skip


def evaluation_throughput(run_dir: Path, inception: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    """On the trained checkpoint: dopri5 at 1e-5 (NFE, seconds), FID features (images/s), Hutchinson BPD
    (seconds per image, dopri5 at 1e-5)."""
    import torch
    from benchmarks.bench import synchronize

    from fmlab.likelihood import log_likelihood
    from fmlab.metrics.fid import build_fid
    from fmlab.runs import load_run
    from fmlab.samplers import ODESolver, sample

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = load_run(run_dir)
    run.module.to(device)
    run.net.to(device)
    field = run.velocity_field().eval()
    x0 = run.datamodule.eval_source(sizes["flow_samples"]).to(device)
    solver = ODESolver("dopri5", atol=1e-5, rtol=1e-5)
    synchronize()
    started = time.perf_counter()
    result = sample(field, x0, solver)
    synchronize()
    flow_seconds = time.perf_counter() - started
    metric, prepare = build_fid("inception", str(inception))
    metric = metric.to(device)
    images = run.datamodule.reference_images()[: sizes["fid_images"]].to(device)
    started = time.perf_counter()
    for batch in images.split(500):
        metric.update(prepare(batch), real=True)
    synchronize()
    fid_rate = len(images) / (time.perf_counter() - started)
    held_out = run.datamodule.held_out(sizes["bpd_images"]).to(device)
    started = time.perf_counter()
    likelihood = log_likelihood(field, held_out, solver, divergence="hutchinson", num_probes=1,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    bpd_seconds = (time.perf_counter() - started) / len(held_out)
    return {"dopri5_samples": len(x0), "dopri5_nfe": result.nfe, "dopri5_seconds": round(flow_seconds, 2),
            "fid_features_images_per_second": round(fid_rate), "bpd_seconds_per_image": round(bpd_seconds, 3),
            "bpd_nfe": likelihood.nfe}  # fmt: skip


def ddp(recipe: list[str], work: Path, sizes: dict[str, Any], env: dict[str, str], dry_run: bool) -> dict[str, Any]:
    """`trainer=ddp trainer.devices=1`: NCCL on the GPU (gloo in the dry run), a few steps and the evaluation."""
    strategy = ["trainer=ddp_cpu", "trainer.devices=1"] if dry_run else ["trainer=ddp", "trainer.devices=1"]
    result = train([*recipe, *strategy, "trainer.max_steps=10", "eval.nll_samples=0"], work / "ddp",
                   sizes["timeout"], env)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}: {result.stderr[-1500:]}")
    metrics = json.loads((work / "ddp" / "metrics.json").read_text())
    return {"backend": "gloo" if dry_run else "nccl", "steps": metrics["steps"], "fid": metrics.get("fid")}


def gpu_tests(env: dict[str, str], timeout: float) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                             "tests/test_gpu.py"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-500:]
    if result.returncode not in (0, 5):  # 5: every test skipped (no CUDA)
        raise RuntimeError(summary)
    return {"summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny sizes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "outputs/gpu_check")))
    args = parser.parse_args()
    sizes = SIZES["dry" if args.dry_run else "gpu"]
    work = args.out / "work"
    report = Report(args.out, args.dry_run)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled",
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS for trainer.deterministic=true  # fmt: skip
    os.environ.update(CUBLAS_WORKSPACE_CONFIG=":4096:8", WANDB_MODE="disabled")
    report.step("environment", environment)
    data = fake_cifar10(work / "data", sizes["train_per_batch"], sizes["test"])
    inception = random_inception_weights(work / "inception.pth")
    recipe = [
        "experiment=lipman_cifar10_fm_ot",
        f"data.data_dir={data}",
        "logger=csv",
        "extras.print_config=false",
        f"eval.fid.weights_path={inception}",
        f"eval.fid.cache_dir={work / 'fid_cache'}",
        f"eval.num_samples={sizes['eval_samples']}",
        f"eval.nll_samples={sizes['nll_samples']}",
        "eval.dequantization_samples=1",
        "scheduler.warmup_steps=2",
    ]  # the paper's 45k warm-up is past our steps
    recipe += DRY_OVERRIDES if args.dry_run else []  # fmt: skip
    report.step("throughput", lambda: throughput(recipe, sizes, args.dry_run))
    e2e = report.step("end to end", lambda: end_to_end(recipe, work, sizes, env))
    if e2e["ok"]:
        report.step("evaluation throughput", lambda: evaluation_throughput(Path(e2e["checkpoint"]), inception, sizes))
    report.step("ddp", lambda: ddp(recipe, work, sizes, env, args.dry_run))
    report.step("gpu tests", lambda: gpu_tests(env, sizes["timeout"]))
    failed = [name for name, step in report.data["steps"].items() if not step["ok"]]
    print(f"gpu_check: {len(report.data['steps']) - len(failed)} steps ok, failed: {failed or 'none'}; "
          f"results in {args.out / 'gpu_check.md'}", flush=True)  # fmt: skip
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
