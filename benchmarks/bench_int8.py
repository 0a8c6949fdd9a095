"""int8 UNet (OpenVINO, post-training quantization with NNCF) against its fp32 source,
errors against eager torch: one guided UNet call (batch 2, latent 64x64), alternated.

    python benchmarks/bench_int8.py --model random:full --openvino exports/full-unfused --runs 5

``--openvino`` is an unfused export of the same model (``riffusion-engine export
--no-fuse``). The UNet is quantized in this process (weights and activations int8,
NNCF's transformer preset) from ``--calibration`` random guided calls spread over the
timesteps; nothing is written. Prints medians, speedups and each output's largest
difference from torch's fp32 output relative to its largest magnitude. A measurement of
what int8 would give, not an engine path: the engine runs fp32, fp16 and bf16. Needs
``pip install nncf`` besides the openvino extra.
"""

from __future__ import annotations

import argparse

import numpy as np
from report import alternate, summary, timed, write_json


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="random:full", help="model source for the torch reference")
    parser.add_argument("--openvino", required=True, help="unfused export directory of the same model")
    parser.add_argument("--calibration", type=int, default=16, help="calibration calls (default: 16)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (default: 5)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    try:
        import nncf
    except ImportError:
        parser.exit(2, "bench_int8.py: error: needs NNCF: pip install nncf (besides the openvino extra)\n")
    import openvino as ov
    import torch
    from riffusion_engine.engine.runtime.backends import TorchBackend
    from riffusion_engine.export.models import load_components

    components = load_components(args.model)
    hidden = components.text_encoder.config.hidden_size
    generator = torch.Generator().manual_seed(0)

    def call(t: float) -> dict[str, np.ndarray]:
        return {
            "sample": torch.randn(2, 4, 64, 64, generator=generator).numpy(),
            "timestep": np.full(2, t, dtype=np.float32),
            "encoder_hidden_states": torch.randn(2, 77, hidden, generator=generator).numpy(),
        }

    inputs = call(500.0)
    reference = TorchBackend(components).run("unet", {k: torch.from_numpy(v) for k, v in inputs.items()})
    reference = reference.numpy()
    del components

    core = ov.Core()
    fp32_model = core.read_model(f"{args.openvino}/unet.onnx")
    calibration = [call(t) for t in np.linspace(980, 20, args.calibration)]
    quantize_s, int8_model = timed(
        nncf.quantize,
        fp32_model,
        nncf.Dataset(calibration),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calibration),
    )
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    variants = {
        "openvino-fp32": core.compile_model(fp32_model, "CPU", config).create_infer_request(),
        "openvino-int8": core.compile_model(int8_model, "CPU", config).create_infer_request(),
    }
    calls = {name: lambda _, request=request: request.infer(inputs) for name, request in variants.items()}
    times = alternate(calls, runs=args.runs, warmup=1).seconds  # alternated: drift hits both
    outputs = {name: request.get_output_tensor(0).data.copy() for name, request in variants.items()}
    scale = float(np.abs(reference).max())
    report: dict[str, object] = {"quantize_s": quantize_s, "calibration_calls": len(calibration)}
    for name in variants:
        report[name] = {
            **summary(times[name]),
            "max_rel_difference_vs_torch_fp32": float(np.abs(outputs[name] - reference).max()) / scale,
        }
        r = report[name]
        print(f"{name:<14} median {r['median_s']:.3f} s  p90 {r['p90_s']:.3f} s  "
              f"max rel. difference {r['max_rel_difference_vs_torch_fp32']:.1e}")  # fmt: skip
    fp32, int8 = report["openvino-fp32"], report["openvino-int8"]
    speedup = fp32["median_s"] / int8["median_s"]
    print(f"int8 / fp32 speedup {speedup:.2f}x; quantization took {quantize_s:.0f} s")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
