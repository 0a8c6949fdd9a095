"""One UNet call with guidance (batch 2, latent 64x64): the torch backend against the
ONNX Runtime backend and, with ``--openvino``, OpenVINO in fp32 and bf16, alternated in
one process.

    python benchmarks/bench_unet.py --model random:full --artifacts exports/full --runs 5
    python benchmarks/bench_unet.py --model random:full --artifacts exports/full \\
        --openvino exports/full-unfused --runs 5

``--artifacts`` is an export of the same model (``riffusion-engine export``);
``--openvino`` an unfused one (``riffusion-engine export --no-fuse``). Prints the median
and 90th percentile per backend, the speedup against torch, and each output's largest
difference from torch's fp32 output, relative to its largest magnitude.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from report import alternate, summary, write_json


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="random:full", help="model source for the torch backend")
    parser.add_argument("--artifacts", required=True, help="export directory of the same model")
    parser.add_argument(
        "--openvino", default=None, help="unfused export directory: add OpenVINO fp32 and bf16"
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs per backend (default: 5)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    for option, directory in (("--artifacts", args.artifacts), ("--openvino", args.openvino)):
        if directory is not None and not (Path(directory) / "manifest.json").is_file():
            parser.exit(
                2,
                f"bench_unet.py: error: {option} {directory!r} is not an export directory; make it first "
                f"with riffusion-engine export --model {args.model} -o {directory}"
                + (" --no-fuse" if option == "--openvino" else "")
                + "\n",
            )

    import torch
    from riffusion_engine.engine.runtime.backends import OnnxRuntimeBackend, OpenVinoBackend, TorchBackend
    from riffusion_engine.export.models import load_components

    components = load_components(args.model)
    backends = {
        "torch": TorchBackend(components),
        "onnxruntime": OnnxRuntimeBackend(args.artifacts),
    }
    if args.openvino:
        backends["openvino"] = OpenVinoBackend(args.openvino)
        backends["openvino-bf16"] = OpenVinoBackend(args.openvino, inference_precision="bf16")
    hidden = components.text_encoder.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(2, 4, 64, 64, generator=generator),
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": torch.randn(2, 77, hidden, generator=generator),
    }
    calls = {name: lambda _, b=backend: b.run("unet", inputs) for name, backend in backends.items()}
    measured = alternate(calls, runs=args.runs, warmup=1)  # alternated: drift hits them all
    outputs = measured.outputs
    report = {name: summary(t) for name, t in measured.seconds.items()}
    scale = float(outputs["torch"].abs().max())
    for name in backends:
        report[name]["speedup_vs_torch"] = report["torch"]["median_s"] / report[name]["median_s"]
        report[name]["max_rel_difference"] = float((outputs[name] - outputs["torch"]).abs().max()) / scale
        r = report[name]
        print(
            f"{name:<14} median {r['median_s']:.3f} s  p90 {r['p90_s']:.3f} s  "
            f"{r['speedup_vs_torch']:.2f}x torch  max rel. difference {r['max_rel_difference']:.1e}"
        )
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
