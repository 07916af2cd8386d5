"""Typed, validated params: one pydantic model per params.yaml section, defaults equal to params.yaml."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from slimloop.yamlfile import load_yaml_model

STRIDE = 32  # largest YOLOv5 stride: input sizes must be multiples of it


class StrictModel(BaseModel):
    """Base for every params section: unknown keys are errors, values immutable, numbers finite
    (``lam: .inf`` would pass every bound check)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_number_mixup(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse ``true`` for a number (lax pydantic makes ``lam: true`` 1.0) and anything but true or
        false for a switch. Numbers as strings stay accepted: YAML 1.1 reads ``1e-4`` as a string, and
        ``mode: off`` as false, which means ``"off"`` where that is a choice."""
        annotation = cls.model_fields[info.field_name].annotation
        if value is False and get_origin(annotation) is Literal and "off" in get_args(annotation):
            return "off"  # YAML 1.1 reads a bare `off` as false
        kinds = _scalar_kinds(annotation)
        if isinstance(value, bool) and kinds and bool not in kinds:
            raise ValueError(f"expected a number, got {str(value).lower()}")
        if kinds == {bool} and not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value


def _scalar_kinds(annotation: Any) -> set[type]:
    """The scalar types among ``int``, ``float``, ``bool`` a field annotation admits (None ignored)."""
    if annotation in (int, float, bool):
        return {annotation}
    if get_origin(annotation) in (Union, UnionType):
        return set().union(*(_scalar_kinds(a) for a in get_args(annotation) if a is not type(None)))
    return set()


def _check_imgsz(value: int) -> int:
    if value % STRIDE:
        raise ValueError(f"must be a multiple of the model stride {STRIDE}, got {value}")
    return value


ImgSize = Annotated[int, Field(ge=STRIDE, le=4096), AfterValidator(_check_imgsz)]
UserPath = Annotated[str, AfterValidator(os.path.expanduser)]  # a path the user writes: ~ is their home


class SyntheticParams(StrictModel):
    """The generated barcode dataset (the embedded default)."""

    image_size: int = Field(160, ge=64, le=4096, description="side of the square images, px")
    train: int = Field(800, ge=1)
    val: int = Field(200, ge=1)
    test: int = Field(200, ge=0)
    max_codes: int = Field(4, ge=0, le=32, description="codes per image: uniform in 0..max_codes")
    min_size: float = Field(0.15, gt=0, lt=1, description="smallest code, fraction of image side")
    max_size: float = Field(0.6, gt=0, le=1, description="largest code, fraction of image side")
    distractors: int = Field(1, ge=0, description="unlabelled distractors per image, at most")
    backgrounds_dir: UserPath | None = Field(None, description="folder of your own background images")

    @model_validator(mode="after")
    def _sizes(self) -> SyntheticParams:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        return self


class YoloSource(StrictModel):
    """An ultralytics-style dataset: a data.yaml with train/val (folders or list files) and names."""

    data_yaml: UserPath


class CocoSource(StrictModel):
    """A COCO JSON dataset: one annotation file and one image folder per split."""

    train_json: UserPath
    train_images: UserPath
    val_json: UserPath
    val_images: UserPath
    test_json: UserPath | None = None
    test_images: UserPath | None = None


class DataParams(StrictModel):
    """Where the dataset comes from and where the canonical form is written."""

    source: Literal["synthetic", "yolo", "coco"] = "synthetic"
    seed: int = 0
    out_dir: str = "data/prepared"
    skip_invalid: bool = False
    allow_val_equals_train: bool = Field(
        False, description="accept a val split of exactly the train images (else an error: val mAP would "
                           "measure memorization)")
    synthetic: SyntheticParams = SyntheticParams()
    yolo: YoloSource | None = None
    coco: CocoSource | None = None

    @model_validator(mode="after")
    def _source_section(self) -> DataParams:
        if self.source in ("yolo", "coco") and getattr(self, self.source) is None:
            raise ValueError(f"source is {self.source!r} but the section data.{self.source} is missing")
        return self


IMPORTS_DIR = "imports"  # dvc.yaml's baseline stage depends on this folder by content


def _inside_imports(value: str | None) -> str | None:
    """A relative path inside ``imports/``: only there does ``dvc repro`` see its content change."""
    if value is None:
        return None
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or len(path.parts) < 2 or path.parts[0] != IMPORTS_DIR:
        raise ValueError(f"must be a relative path inside {IMPORTS_DIR}/ (the folder dvc.yaml's baseline stage "
                         f"depends on by content), got {value!r}: copy the file there")
    return str(path)


class ModelParams(StrictModel):
    """Which detector to start from."""

    base: Literal["n", "s", "m"] = "n"
    width_multiple: float | None = Field(None, gt=0, le=2, description="overrides the base's width")
    depth_multiple: float | None = Field(None, gt=0, le=2, description="overrides the base's depth")
    spec: str | None = Field(None, description="a saved ModelSpec (JSON/YAML) to train instead")
    autoanchor: bool = True
    checkpoint: Annotated[str | None, AfterValidator(_inside_imports)] = Field(
        None, description="a yolov5 model to start from instead of training one: a train.py checkpoint "
                          "(best.pt), or a state dict (.pt or .safetensors) with checkpoint_yaml; under imports/")
    checkpoint_yaml: Annotated[str | None, AfterValidator(_inside_imports)] = Field(
        None, description="the model yaml of a state-dict checkpoint (a full checkpoint carries its own)")

    @model_validator(mode="after")
    def _one_start(self) -> ModelParams:
        if self.checkpoint_yaml and not self.checkpoint:
            raise ValueError("checkpoint_yaml is set but checkpoint is not")
        if self.checkpoint and self.spec:
            raise ValueError("give at most one of spec (train a structure) and checkpoint (import weights)")
        if self.checkpoint and self.checkpoint.lower().endswith(".safetensors") and not self.checkpoint_yaml:
            raise ValueError("a .safetensors checkpoint is a bare state dict: set checkpoint_yaml to its model yaml")
        return self


class AugmentParams(StrictModel):
    """Box-aware training augmentation."""

    hsv_h: float = Field(0.015, ge=0, le=0.5)
    hsv_s: float = Field(0.7, ge=0, le=1)
    hsv_v: float = Field(0.4, ge=0, le=1)
    degrees: float = Field(0.0, ge=0, le=180)
    translate: float = Field(0.1, ge=0, lt=1)
    scale: float = Field(0.5, ge=0, lt=1)
    fliplr: float = Field(0.5, ge=0, le=1)
    flipud: float = Field(0.0, ge=0, le=1)
    mosaic: float = Field(0.5, ge=0, le=1)


class LossParams(StrictModel):
    """YOLOv5 loss gains."""

    box: float = Field(0.05, ge=0)
    obj: float = Field(1.0, ge=0)
    cls: float = Field(0.5, ge=0)
    anchor_t: float = Field(4.0, gt=1)
    balance: tuple[float, float, float] = (4.0, 1.0, 0.4)


class TrainParams(StrictModel):
    """One training run (baseline, retrain, control all use this shape)."""

    imgsz: ImgSize = 160
    epochs: int = Field(19, ge=0, description="0: no training (only with model.checkpoint: evaluate the import)")
    batch_size: int = Field(16, ge=1)
    lr0: float = Field(0.02, gt=0, le=1)
    lrf: float = Field(0.01, gt=0, le=1, description="final lr as a fraction of lr0")
    momentum: float = Field(0.937, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    schedule: Literal["cosine", "linear"] = "cosine"
    bn_momentum: float = Field(0.1, gt=0, le=1, description="BatchNorm running-stat momentum")
    ema: bool = True
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    amp: bool = True
    device: str = "auto"
    workers: int = Field(0, ge=0)
    nproc: int = Field(1, ge=1, le=1024, description="data-parallel processes: above 1 the stage entry points "
                                                      "relaunch themselves under torchrun (batch_size is the global batch)")
    sync_bn: bool = Field(False, description="BatchNorm statistics over the global batch under torchrun "
                                              "(torch's SyncBatchNorm on CUDA, slimloop's own on CPU)")
    seed: int = 0
    val_every: int = Field(10, ge=1, description="validate every N epochs (and always on the last)")
    augment: AugmentParams = AugmentParams()
    loss: LossParams = LossParams()

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        ok = value in ("auto", "cpu", "mps", "cuda") or (
            value.startswith("cuda:") and value[5:].isdigit()
        )
        if not ok:
            raise ValueError(f"must be one of auto, cpu, mps, cuda, cuda:N; got {value!r}")
        return value

    @model_validator(mode="after")
    def _global_batch(self) -> TrainParams:
        if self.batch_size < self.nproc:  # every process needs a share of every batch
            raise ValueError(f"batch_size ({self.batch_size}) is the global batch: it must be at least "
                             f"nproc ({self.nproc})")
        return self


class EvalParams(StrictModel):
    """Evaluation: mAP sweep settings, the report's operating point, latency measurement."""

    conf_thres: float = Field(0.001, ge=0, lt=1, description="confidence floor for mAP")
    nms_iou: float = Field(0.6, gt=0, le=1)
    max_det: int = Field(300, ge=1)
    op_conf: float = Field(0.25, ge=0, lt=1, description="operating-point confidence")
    op_iou: float = Field(0.5, gt=0, le=1, description="operating-point match IoU")
    latency_runs: int = Field(50, ge=1)
    latency_warmup: int = Field(10, ge=0)
    threads: int | None = Field(None, ge=1, description="CPU threads for latency; None = all")
    imgsz_sweep: list[ImgSize] = Field(default_factory=lambda: [160, 128, 96], min_length=1)


class SparseParams(StrictModel):
    """Sparse training (network slimming): L1 on every prunable BN gamma."""

    epochs: int = Field(1, ge=1)
    lam: float = Field(0.01, ge=0, description="L1 strength: lam * sign(gamma) added to the grad")
    schedule: Literal["constant", "linear", "cosine", "rising"] = "constant"
    low_fraction: float = Field(
        0.1, ge=0, le=1, description="lam at the low end, fraction of lam: where linear/cosine end, rising starts")
    target_fraction: float | None = Field(
        None, gt=0, lt=1, description="raise lam by lam_growth after each epoch until this fraction of |gamma| "
                                      "is below target_threshold (null = fixed lam)")
    target_threshold: float = Field(1e-2, gt=0, description="|gamma| below this counts as switched off")
    lam_growth: float = Field(2.0, ge=1, description="factor lam grows by after an epoch short of the target")
    lr0: float | None = Field(0.002, gt=0, description="learning rate (null = train.lr0); no warm-up")


class BaselineParams(StrictModel):
    """Training the baseline: with network slimming's L1 penalty from the first epoch, or without."""

    sparse: bool = Field(False, description="train the baseline with the L1 penalty on BN gammas (the paper's recipe)")
    lam: float = Field(1e-3, ge=0, description="its strength")
    schedule: Literal["constant", "linear", "cosine", "rising"] = "constant"
    low_fraction: float = Field(0.1, ge=0, le=1, description="as sparse.low_fraction")


class PruneParams(StrictModel):
    """Channel selection: rank every channel by one criterion and cut the lowest globally."""

    criterion: Literal["gamma", "l1", "random"] = Field(
        "gamma", description="rank channels by BN |gamma| (network slimming), conv filter L1, or at random")
    threshold: float | None = Field(
        None, ge=0, description="cut every channel with |gamma| below this instead of compress.step_ratio")
    min_channels: int = Field(8, ge=1, description="every channel group keeps at least this many")
    recalibrate: int = Field(
        128, ge=0,
        description="training images that re-estimate BN statistics after prune and pad (0 = off)",
    )


PAD_CANDIDATES = (1, 4, 8, 16, 32)  # the multiples `pad.multiple: auto` measures


class PadParams(StrictModel):
    """Round kept widths up to a multiple (1 = off), or ``auto``: the fastest measured multiple."""

    multiple: Literal[1, 4, 8, 16, 32, "auto"] = Field(
        8, description="auto: measure the pruned structure padded to each of 1, 4, 8, 16, 32 on "
                       "latency.runtime and keep the fastest within max_growth")
    max_growth: float = Field(
        0.25, ge=0, le=10, description="auto: largest GFLOPs growth over the unpadded structure (0.25 = +25%)")


Runtime = Literal["onnxruntime", "openvino", "onnxruntime-cuda", "onnxruntime-tensorrt"]


class LatencyParams(StrictModel):
    """The side-by-side latency table: every model loaded once, measured in interleaved rounds."""

    runtime: Runtime = Field("onnxruntime", description="the target runtime: the report's latency column, "
                                                        "the choice of pad.multiple auto")
    compare: list[Runtime] = Field(default_factory=lambda: ["openvino"], description="further runtimes measured beside it")
    rounds: int = Field(7, ge=1, description="round-robin rounds over all models")
    runs: int = Field(50, ge=1, description="timed batch-1 runs of each model per round")
    warmup: int = Field(20, ge=0, description="untimed runs of each model after loading")
    round_warmup: int = Field(3, ge=0, description="untimed runs at the start of each model's turn")
    threads: int | None = Field(None, ge=1, description="intra-op threads; None = the CPUs this process may use")
    pad_rounds: int = Field(5, ge=1, description="rounds of the pad.multiple auto measurement")
    pad_runs: int = Field(30, ge=1, description="runs per round of the pad.multiple auto measurement")

    @field_validator("compare")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"names a runtime twice: {value}")
        return value


class QuantParams(StrictModel):
    """INT8 after the loop: static post-training quantization of the baseline and the final model."""

    enabled: bool = True
    calibration_images: int = Field(64, ge=1, description="training images that calibrate the ranges")
    per_channel: bool = Field(True, description="per-output-channel weight scales")
    tolerance: float = Field(0.01, ge=0, description="largest mAP@0.5:0.95 INT8 may cost the final model")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "percentile"
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8", description="activations: uint8 is ONNX Runtime's fast x86 path (u8s8); int8 for targets that want it")
    worst_layers: int = Field(5, ge=1, description="layers named when INT8 costs more than the tolerance")


class RetrainParams(StrictModel):
    """Training after pruning: inherit the weights, start from scratch, or rewind."""

    mode: Literal["finetune", "scratch", "rewind"] = "finetune"
    epochs: int = Field(2, ge=1)
    lr0: float | None = Field(0.002, gt=0, le=1, description="finetune lr; null = train.lr0")
    warmup_epochs: float | None = Field(
        0.0, ge=0, description="finetune warm-up epochs; null = train.warmup_epochs (0: start at lr0)")
    scratch_budget: bool = Field(False, description="scratch-B: epochs x FLOPs_base / FLOPs_pruned")
    budget_cap: float = Field(3.0, ge=1, description="scratch-B epochs at most this times epochs")
    rewind_epoch: int = Field(1, ge=1, description="baseline epoch whose weights rewind restores")


class DistillParams(StrictModel):
    """Knowledge distillation from a teacher: detection outputs and neck features."""

    mode: Literal["off", "separate", "joint"] = "off"
    teacher: Literal["baseline", "previous"] = "baseline"
    epochs: int = Field(3, ge=1, description="epochs of the separate distillation step")
    obj: float = Field(1.0, ge=0)
    cls: float = Field(1.0, ge=0)
    kl: float = Field(1.0, ge=0)
    box: float = Field(1.0, ge=0)
    feature: float = Field(1.0, ge=0)
    temperature: float = Field(2.0, gt=0)


class CompressParams(StrictModel):
    """The iterative loop (plan D)."""

    iterations: int = Field(3, ge=1, description="accepted iterations at most")
    step_ratio: float = Field(0.5, gt=0, lt=1, description="fraction of the remaining channels one iteration cuts")
    min_step_ratio: float = Field(
        0.0625, gt=0, lt=1, description="backtracking halves a failed step down to this; below it the loop stops")
    min_retention: float = Field(
        0.5, ge=0, le=1, description="an iteration is accepted when its finetuned model keeps this fraction of "
                                     "its parent's mAP@0.5:0.95; else it is retried with half the step")
    land: bool = Field(True, description="cut only as much as just meets the size targets when a full step "
                                         "would overshoot them")
    reach: float | None = Field(
        0.75, gt=0, lt=1, description="on the last allowed iteration, when a full step would leave a size target "
                                      "unmet, cut up to this fraction to meet it (with land); a rejected reach "
                                      "falls back to step_ratio; null (or at most step_ratio) = never more than step_ratio")
    tolerance: float = Field(
        0.01, ge=0, description="largest mAP@0.5:0.95 drop of the final model vs the baseline (absolute); "
                                "the report says whether it was met")
    imgsz: ImgSize | None = Field(None, description="evaluation size; null = train.imgsz")
    final_retrain: Literal["off", "scratch", "finetune"] = Field(
        "finetune", description="after the loop, train the final model once more: its weights further, or its "
                           "structure from random weights (plan C, the report's 'nas' row)")
    final_epochs: int | None = Field(12, ge=1, description="epochs of the final retraining; null = train.epochs")
    final_lr0: float | None = Field(0.01, gt=0, description="its initial learning rate (cosine to lrf); null = train.lr0")
    final_distill: bool = Field(False, description="distill from the baseline during the final retraining")
    task_runner: Literal["sequential", "process", "dask"] = Field(
        "sequential", description="how the input-size sweep's cells run: in turn, a Prefect process pool, or "
                                  "prefect-dask's DaskTaskRunner (a local cluster, or dask_address)")
    workers: int = Field(2, ge=1, le=1024, description="processes of the pool or of a local Dask cluster")
    dask_address: str | None = Field(None, description="scheduler of a running Dask cluster (tcp://host:8786); "
                                                      "null = start a local one of `workers` processes")

    @model_validator(mode="after")
    def _steps(self) -> CompressParams:
        if self.min_step_ratio > self.step_ratio:
            raise ValueError(f"min_step_ratio ({self.min_step_ratio}) must not exceed step_ratio ({self.step_ratio})")
        return self


class TargetParams(StrictModel):
    """When to stop compressing: every target given must be met (null = no target)."""

    gflops_ratio: float | None = Field(0.2, gt=0, le=1, description="GFLOPs / baseline GFLOPs")
    params_ratio: float | None = Field(0.1, gt=0, le=1, description="params / baseline params")
    latency_ms: float | None = Field(
        None, gt=0, description="ONNX Runtime CPU latency, ms: each step's quick single reading (latency_quick_ms)")


class ControlParams(StrictModel):
    """The control: YOLOv5 scaled uniformly in width to the final model's GFLOPs, trained from scratch."""

    enabled: bool = Field(True, description="false: skip training the control (metrics/control.json says so)")
    epochs: int | None = Field(
        None, ge=1, description="training epochs; null = the baseline's plus the loop's epochs to the final model")


class ReportParams(StrictModel):
    """reports/summary.md and its pictures."""

    gallery: int = Field(8, ge=0, le=64, description="val images in the gallery of boxes the final model misses")
    dpi: int = Field(110, ge=50, le=400, description="resolution of the PNG plots")


class Params(StrictModel):
    """All of params.yaml."""

    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    baseline: BaselineParams = BaselineParams()
    eval: EvalParams = EvalParams()
    sparse: SparseParams = SparseParams()
    prune: PruneParams = PruneParams()
    pad: PadParams = PadParams()
    latency: LatencyParams = LatencyParams()
    quant: QuantParams = QuantParams()
    retrain: RetrainParams = RetrainParams()
    distill: DistillParams = DistillParams()
    compress: CompressParams = CompressParams()
    target: TargetParams = TargetParams()
    control: ControlParams = ControlParams()
    report: ReportParams = ReportParams()

    @model_validator(mode="after")
    def _imported_start(self) -> Params:
        """What ``train.epochs: 0`` (an imported model evaluated as it is) leaves undefined."""
        if self.train.epochs == 0 and not self.model.checkpoint:
            raise ValueError("train.epochs is 0, which only means something with model.checkpoint "
                             "(evaluate the imported model as it is)")
        if self.train.epochs == 0 and self.compress.final_retrain != "off" and self.compress.final_epochs is None:
            raise ValueError("compress.final_epochs is null, which means train.epochs, and train.epochs is 0: "
                             "set compress.final_epochs")
        if self.model.checkpoint and self.retrain.mode == "rewind" and self.train.epochs < self.retrain.rewind_epoch:
            raise ValueError(
                f"retrain.mode rewind restores the baseline's weights after retrain.rewind_epoch = "
                f"{self.retrain.rewind_epoch} epochs of its training, but the imported model.checkpoint is "
                f"trained here for train.epochs = {self.train.epochs}: finetune it at least that long, or "
                "use retrain.mode finetune or scratch")
        return self


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file.

    Raises:
        ConfigError: the file is missing, not YAML, or a key is unknown or out of range.
    """
    return load_yaml_model(path, Params, "params file", "params")


def params_to_dict(params: BaseModel) -> dict[str, Any]:
    """JSON-ready dict of a params model (for provenance in checkpoints and metrics)."""
    return params.model_dump(mode="json")
