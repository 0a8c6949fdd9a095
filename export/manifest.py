"""An export directory's manifest, read back into the types it was written from.

The exporter writes ``manifest.json`` from :class:`ShapeProfile` and :class:`StageSpec`
objects (:mod:`.exporter`); :meth:`Manifest.load` gives every reader the same objects
back, and the :class:`ModelShape` the chain needs, instead of nested dictionaries.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import artifacts
from .specs import HEIGHT, Dim, ShapeProfile, StageSpec, TensorSpec

NEEDED_STAGES = ("text_encoder", "unet", "vae_decoder")  # what text to clip needs
INT8_SUFFIX = ".int8"  # unet.int8.xml: an int8 export's quantized UNet beside its fp32 IR


def openvino_file(stage: str, *, int8: bool = False) -> str:
    """The name of a stage's OpenVINO IR in an openvino export (``.bin`` beside it)."""
    return f"{stage}{INT8_SUFFIX if int8 else ''}.xml"


@dataclass(frozen=True)
class ModelShape:
    """What the chain needs to know about the model's sizes."""

    latent_channels: int  # 4
    vae_factor: int  # image pixels per latent pixel (8)
    pixel_multiple: int  # image sizes the backend takes are multiples of this
    height: int = HEIGHT  # image height (mel bins)
    max_batch: int | None = None  # most clips per call the backend takes (None: any)
    widths: tuple[int, int] | None = None  # narrowest and widest image the backend takes (None: any)
    sampled_vae: bool = True  # the VAE encoder takes posterior noise (False: the tiny VAE)
    guidance: bool = True  # the UNet takes two rows per clip (False: an export for guidance off)


@dataclass(frozen=True)
class StageEntry:
    """One exported stage: its spec, precision, fused operators and files."""

    spec: StageSpec
    precision: str  # fp32 or fp16 (the arithmetic the stage's file was verified in)
    fusions: dict[str, int]  # fused operator -> count (empty when unfused)
    files: dict[str, Any]  # file name -> {"bytes", "sha256"}
    verification: dict[str, dict[str, Any]]  # runtime -> output -> {"max_rel", "tolerance", ...}
    fallback: str | None = None  # why an fp16 stage was kept in fp32, if it was
    seconds: float = 0.0  # time its export and verification took
    # The UNet of an int8 export: its scheme, NNCF's version, calibration and held-out check
    int8: dict[str, Any] | None = None

    @property
    def bytes(self) -> int:
        return sum(record["bytes"] for record in self.files.values())

    def verification_entries(self) -> list[dict[str, Any]]:
        """Every output's check against torch, on every runtime it was verified on."""
        return [entry for report in self.verification.values() for entry in report.values()]

    @property
    def max_rel_error(self) -> float:
        """The largest relative error of any output on any runtime."""
        return max(entry["max_rel"] for entry in self.verification_entries())


def _stage_spec(name: str, record: dict[str, Any]) -> StageSpec:
    """A stage spec from its manifest record (``StageSpec.to_dict``'s form)."""

    def dim(dim_name: str) -> Dim:
        d = record["dims"][dim_name]
        return Dim(
            dim_name,
            d["min"],
            d["opt"],
            d["max"],
            base=d["base"],
            factor=d["factor"],
            divisor=d.get("divisor", 1),
        )

    def tensor(t: dict[str, Any]) -> TensorSpec:
        return TensorSpec(
            t["name"], t["dtype"], tuple(s if isinstance(s, int) else dim(s) for s in t["shape"])
        )

    return StageSpec(
        name, tuple(tensor(t) for t in record["inputs"]), tuple(tensor(t) for t in record["outputs"])
    )


@dataclass(frozen=True)
class Manifest:
    """The manifest of an export directory (the JSON as written is in ``raw``)."""

    directory: Path
    target: str  # onnx or tensorrt
    device: str  # the device the export was made and verified for
    profile: ShapeProfile  # the sizes it was built for
    pixel_multiple: int  # image sizes the exported UNet takes are multiples of this
    stages: dict[str, StageEntry]  # stage name -> entry, in export order
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], *, check_files: bool | Callable[[str], bool] = True
    ) -> Manifest:
        """The manifest of ``directory``, after checking every file (or, ``check_files`` a
        predicate of a file's name, those it accepts) against its recorded hash
        (ArtifactError for a missing, unreadable, incomplete or damaged export)."""
        try:
            return cls.of(directory, artifacts.load_manifest(directory, check_files=check_files))
        except artifacts.ArtifactError:
            raise  # says itself what is wrong (missing, unreadable, damaged)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            # A manifest of the right format with a field missing or of the wrong kind.
            what = f"no {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
            raise artifacts.ArtifactError(
                f"export {str(directory)!r} has an incomplete manifest ({what}); export again"
            ) from None

    @classmethod
    def of(cls, directory: str | os.PathLike[str], raw: dict[str, Any]) -> Manifest:
        """The manifest ``raw`` (as read, or as the exporter just wrote it) of ``directory``."""
        profile = raw["profile"]
        return cls(
            directory=Path(directory),
            target=raw["target"],
            device=raw.get("device", "cpu"),
            profile=ShapeProfile(
                height=profile["height"],
                width=profile["width"],
                max_width=profile["max_width"],
                max_batch=profile["max_batch"],
                static=bool(profile["static"]),
                guidance=bool(profile.get("guidance", True)),
                deep_cache_branch=profile.get("deep_cache_branch"),
            ),
            pixel_multiple=raw["model"]["pixel_multiple"],
            stages={
                name: StageEntry(
                    spec=_stage_spec(name, stage["spec"]),
                    precision=stage["precision"],
                    fusions=dict(stage.get("fusions", {})),
                    files=dict(stage["files"]),
                    verification=stage.get("verification", {}),
                    fallback=stage.get("fallback"),
                    seconds=stage.get("seconds", 0.0),
                    int8=stage.get("int8"),
                )
                for name, stage in raw["stages"].items()
            },
            raw=raw,
        )

    @property
    def cache_key(self) -> str:
        return self.raw["cache_key"]

    @property
    def int8(self) -> bool:
        """Whether the export holds an int8 UNet (``unet.int8.xml``) beside its fp32 stages."""
        return "unet" in self.stages and self.stages["unet"].int8 is not None

    def stage(self, name: str) -> StageEntry:
        if name not in self.stages:
            raise artifacts.ArtifactError(f"export {str(self.directory)!r} has no {name} stage")
        return self.stages[name]

    def model_shape(self) -> ModelShape:
        """The sizes the chain runs this export at: the widths it was made and verified
        for (TensorRT takes no others)."""
        missing = [s for s in NEEDED_STAGES if s not in self.stages]
        if missing:
            raise artifacts.ArtifactError(
                f"export {str(self.directory)!r} lacks the {', '.join(missing)} stage(s)"
            )
        (sample,) = [t for t in self.stages["unet"].spec.inputs if t.name == "sample"]
        decoder = self.stages["vae_decoder"].spec
        (image,) = decoder.outputs
        height, width = image.shape[2], image.shape[3]
        assert isinstance(height, Dim) and isinstance(width, Dim)
        channels = sample.shape[1]
        assert isinstance(channels, int)
        return ModelShape(
            latent_channels=channels,
            vae_factor=height.factor,
            pixel_multiple=self.pixel_multiple,
            height=self.profile.height,
            max_batch=self.profile.max_batch,
            widths=(width.min, width.max),
            guidance=self.profile.guidance,
            sampled_vae="vae_encoder" not in self.stages
            or "noise" in self.stages["vae_encoder"].spec.input_names,
        )
