"""One UNet call of an int8 export in each precision OpenVINO runs it here: fp32, bf16
(where the CPU computes bf16) and the int8 UNet (its float operations in the best float
the CPU has), alternated, one clip's row (batch 1) at the export's optimized width.

    riffusion-engine export --model random:full --target openvino --precision int8 --profile realtime -o DIR
    python benchmarks/bench_int8.py --artifacts DIR --runs 5 --json int8.json
    python benchmarks/bench_int8.py --artifacts DIR --isa avx2    # OpenVINO limited to AVX2
    python benchmarks/bench_int8.py --artifacts DIR --isa avx512_core_vnni   # AVX-512 VNNI, no bf16

Prints medians, the ratios against fp32 and bf16, and the held-out errors the export
recorded (int8's and bf16's relative RMS against the fp32 stage). An export with DeepCache's
stages (``--deep-cache``) also times its shallow stage in each precision, on the feature
the full call returned, and prints its share of a full call. ``--isa`` limits the
instructions OpenVINO's kernels use (oneDNN's ONEDNN_MAX_CPU_ISA: ``avx2`` stands in for
an AVX2-only CPU on a newer one, ``avx512_core_vnni`` for one with AVX-512 VNNI and no bf16;
its MLAS matrix products keep the CPU's own); bf16 is left out there. Each run in its own
process: the limit is read when OpenVINO loads.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from report import alternate, environment, summary, write_json


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifacts", required=True, help="an int8 openvino export directory")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per precision (default: 5)")
    parser.add_argument(
        "--isa", choices=("avx2", "avx512_core_vnni"), default=None, help="limit OpenVINO's kernels"
    )
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    if args.isa:
        os.environ["ONEDNN_MAX_CPU_ISA"] = args.isa.upper()  # before OpenVINO loads oneDNN
    manifest_path = Path(args.artifacts) / "manifest.json"
    if not manifest_path.is_file():
        parser.exit(2, f"bench_int8.py: error: {args.artifacts!r} is no export: riffusion-engine export "
                       "--target openvino --precision int8 ... -o DIR\n")  # fmt: skip
    import torch
    from riffusion_engine.engine.runtime.backends import OpenVinoBackend
    from riffusion_engine.engine.runtime.cpu import has_bf16
    from riffusion_engine.export.specs import FEATURE
    from riffusion_engine.kernels import RiffusionError

    precisions = ["fp32"] + (["bf16"] if has_bf16() and not args.isa else []) + ["int8"]
    try:
        backends = {p: OpenVinoBackend(args.artifacts, inference_precision=p) for p in precisions}
    except RiffusionError as exc:
        parser.exit(2, f"bench_int8.py: error: {exc}\n")
    if args.isa:
        # OpenVINO still reports the CPU's bf16 with its kernels limited, and has none for
        # some operations in bf16 then: the int8 UNet's float operations in f32, as on such a CPU.
        backends["int8"].config["INFERENCE_PRECISION_HINT"] = "f32"
    spec = backends["int8"].spec("unet")
    sample = spec.sample_inputs(which="opt", seed=0)
    inputs = {name: torch.from_numpy(value[:1]) for name, value in sample.items()}  # one clip's row
    calls = {p: lambda _, b=backend: b.run("unet", inputs) for p, backend in backends.items()}
    deep = "unet_shallow" in backends["int8"].manifest.stages
    if deep:
        feature = backends["fp32"].run("unet", inputs)[1]
        shallow = {**inputs, FEATURE: feature}
        calls.update(
            {
                f"{p} shallow": lambda _, b=backend: b.run("unet_shallow", shallow)
                for p, backend in backends.items()
            }
        )
    times = alternate(calls, runs=args.runs, warmup=1).seconds  # alternated: drift hits all alike
    unet = backends["int8"].manifest.stage("unet")
    report = {
        "artifacts": str(args.artifacts),
        "isa": args.isa,
        "environment": environment(),
        "input": {name: list(t.shape) for name, t in inputs.items()},
        "scheme": unet.int8["scheme"]["name"],
        "held_out": unet.int8["verification"],
        **{p: summary(times[p]) for p in calls},
    }
    for p in precisions:
        print(f"{p:<5} median {report[p]['median_s']:.3f} s  p90 {report[p]['p90_s']:.3f} s")
    int8 = report["int8"]["median_s"]
    ratios = [f"int8 / {p} {int8 / report[p]['median_s']:.2f}x" for p in precisions if p != "int8"]
    check = report["held_out"]
    errors = f"held-out relative RMS: int8 {check['int8']['rel_rms']:.2e}"
    if check["bf16"] is not None:
        errors += f", bf16 {check['bf16']['rel_rms']:.2e}"
    print(f"{', '.join(ratios)}; {errors} ({report['scheme']})")
    if deep:
        cells = []
        for p in precisions:
            seconds = report[p + " shallow"]["median_s"]
            cells.append(f"{p} {seconds:.3f} s ({seconds / report[p]['median_s']:.3f} of a full call)")
        branch = backends["int8"].deep_cache_branch
        print(f"shallow stage (DeepCache branch {branch}): " + ", ".join(cells))
    print(f"cpu: {report['environment']['cpu']} ({', '.join(report['environment']['cpu_features'])})"
          + (f", OpenVINO limited to {args.isa}" if args.isa else ""))  # fmt: skip
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    sys.exit(main())
