"""``riffusion-engine doctor``: every path this machine can run, against the reference."""

from __future__ import annotations

import argparse
from typing import Any

from ...kernels.errors import RiffusionError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "doctor",
        help="run every backend, precision and GPU path this machine can, against the reference",
        description="On random:tiny (offline): the exports (ONNX fused, unfused and fp16; TensorRT "
        "dynamic and static), every backend (torch, onnxruntime on the CPU, CUDA and TensorRT "
        "providers, openvino, tensorrt with CUDA graphs), the CuPy kernels and the DLPack hand-off, "
        "export on first use, and one request through the HTTP server, each compared with the torch "
        "backend in fp32 on the CPU. On cuda it first reports the driver and the CUDA each GPU "
        "library was built for, and fails when they mix majors or the driver is too old. Prints "
        "path, status (ok / failed / skipped and why), error against the reference and time; exits "
        "non-zero when any path that could run failed, and, on cuda, at once in one line where no "
        "CUDA device is usable or the gpu extra (CuPy) is missing.",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="cpu: the CPU paths only; cuda: the GPU paths too (default: cuda where torch sees a GPU)",
    )
    p.add_argument("--steps", type=int, default=4, help="scheduler steps per clip (default: 4)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the table here as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import json

    from ...kernels.files import atomic_path, check_output_path
    from ..tools.doctor import HEADER, check_cuda_ready, format_row, run_doctor

    json_out = check_output_path(args.json, (".json",)) if args.json else None
    if not 1 <= args.steps <= 1000:
        raise RiffusionError(f"--steps must be an integer in 1..1000, got {args.steps}")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        check_cuda_ready()  # before the table: a GPU check that cannot check the GPU fails
    print(f"riffusion-engine doctor on {device}: random:tiny, {args.steps} steps, against torch cpu fp32")
    print(HEADER, flush=True)
    report = run_doctor(device, steps=args.steps, report=lambda check: print(format_row(check), flush=True))
    if json_out:
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_out}")
    counts = {s: sum(c["status"] == s for c in report["checks"]) for s in ("ok", "failed", "skipped")}
    print(f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped")
    failed = [c["path"] for c in report["checks"] if c["status"] == "failed"]
    if failed:
        raise RiffusionError(f"{len(failed)} path(s) failed: {'; '.join(failed)}")
