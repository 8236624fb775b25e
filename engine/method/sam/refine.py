"""Two-stage SAM refinement of coarse class masks, batched over images and classes.

The paper's procedure (per image, per class): stage 1 prompts SAM with the class's box; stage 2
prompts it with the positive point, the negative points and stage 1's low-resolution logits as
mask input. :func:`refine_reference` does exactly that with ``SamPredictor``, one ``predict`` call
per class per stage. :class:`SamRefiner` computes the same thing efficiently: the images of a batch
go through the image encoder in one call, and per image and stage all valid classes go through one
prompt-encoder + mask-decoder call (batch dimension = classes).

Pre- and post-processing follow ``SamPredictor`` step by step (ResizeLongestSide on the uint8
image, ``Sam.preprocess``, coordinates via ``apply_coords`` / ``apply_boxes``,
``Sam.postprocess_masks``, threshold ``Sam.mask_threshold``), so the two agree up to floating-point
reordering. One exception: when valid classes carry different numbers of points, the batched call
pads the shorter lists with label -1 ("not a point" tokens), which the reference does not see.
:func:`plabel.method.prompts.extract_prompts` gives every valid class the same number of points, so this
does not arise with its prompts.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.utils.transforms import ResizeLongestSide

from plabel.method.prompts import RefinementPrompts
from plabel.method.sam.backends import SamModel, load_sam
from plabel.method.sam.compile import compile_sam

STAGE_PROMPTS = frozenset({"box", "points", "mask"})
DEFAULT_STAGES: tuple[tuple[str, ...], ...] = (("box",), ("points", "mask"))
Stages = Sequence[Sequence[str] | str]


@dataclass
class RefinementResult:
    """Refinement of one image with C classes, original size H x W.

    masks:          bool    (C, H, W) final stage; all False for invalid classes.
    iou_pred:       float32 (C,) SAM's predicted IoU of the final stage; NaN for invalid classes.
    stage_masks:    list over stages of bool (C, H, W); stage_masks[-1] is ``masks``.
    stage_iou:      list over stages of float32 (C,); stage_iou[-1] is ``iou_pred``.
    low_res_logits: float32 (C, h, w) mask logits of the last stage before upsampling, h = w = 256
                    for all real backends (4x the embedding grid); NaN rows for invalid classes.
    """

    masks: np.ndarray
    iou_pred: np.ndarray
    stage_masks: list[np.ndarray]
    stage_iou: list[np.ndarray]
    low_res_logits: np.ndarray


def autocast_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of an autocast setting: "none" -> None, "bf16", "fp16" (ValueError otherwise)."""
    dtypes = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"autocast {name!r} is not one of {tuple(dtypes)}")
    return dtypes[name]


def refiner_from_config(sam: Mapping, device: str, cache_dir: str | None = None,
                        compile: bool | None = None) -> "SamRefiner":
    """The SamRefiner a ``label.sam`` config describes (the dict form of plabel.schemas.config.SamSection).

    Loads sam["backend"] from sam["checkpoint"] onto device ("cuda" or "cpu"), verifying
    sam["sha256"] when given; autocasts to sam["autocast"] on CUDA only; with compile (default
    sam["compile"]) compiles the model (plabel.method.sam.compile) and pads every encoder call to
    sam["batch_size"] images, so the compiled encoder sees one static shape.
    """

    model = load_sam(sam["backend"], sam.get("checkpoint"), device=device, cache_dir=cache_dir,
                     sha256=sam.get("sha256"))
    encoder_batch = None
    if sam.get("compile") if compile is None else compile:
        compile_sam(model)
        encoder_batch = int(sam["batch_size"])
    autocast = autocast_dtype(sam.get("autocast", "none"))
    return SamRefiner(model, stages=tuple(tuple(s) for s in sam["stages"]),
                      autocast_dtype=autocast if device == "cuda" else None, encoder_batch=encoder_batch)


def validate_stages(stages: Stages) -> tuple[tuple[str, ...], ...]:
    """Normalised stages config; ValueError naming the offending value.

    A stage is a sequence of prompt names from STAGE_PROMPTS (a bare string is one name).
    Stages must be non-empty and "mask" (the previous stage's logits) cannot appear in stage 1.
    """
    if isinstance(stages, str) or len(stages) == 0:
        raise ValueError(f"stages must be a non-empty sequence of stages, got {stages!r}")
    out = []
    for k, stage in enumerate(stages, start=1):
        names = (stage,) if isinstance(stage, str) else tuple(stage)
        if not names:
            raise ValueError(f"stage {k} is empty: {stage!r}; give at least one of {sorted(STAGE_PROMPTS)}")
        for name in names:
            if name not in STAGE_PROMPTS:
                raise ValueError(f"unknown prompt {name!r} in stage {k}; choose from {sorted(STAGE_PROMPTS)}")
        if k == 1 and "mask" in names:
            raise ValueError("prompt 'mask' in stage 1: there is no previous stage to take logits from")
        out.append(tuple(dict.fromkeys(names)))
    return tuple(out)


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) view of an image given as uint8 (H, W, 3) or (H, W) grayscale."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB or (H, W) grayscale, got shape {image.shape}")
    return image


def _empty_result(prompts: RefinementPrompts, size: tuple[int, int], n_stages: int,
                  low_res: tuple[int, int]) -> RefinementResult:
    C = prompts.num_classes
    stage_masks = [np.zeros((C, *size), dtype=bool) for _ in range(n_stages)]
    stage_iou = [np.full(C, np.nan, dtype=np.float32) for _ in range(n_stages)]
    logits = np.full((C, *low_res), np.nan, dtype=np.float32)
    return RefinementResult(stage_masks[-1], stage_iou[-1], stage_masks, stage_iou, logits)


class SamRefiner:
    """Batched multi-stage SAM refinement.

    model:          a loaded SamModel (any backend); its device is used for all computation.
    stages:         prompt names per stage, see validate_stages; default the paper's two stages.
    autocast_dtype: torch.bfloat16 / torch.float16 to run the encoder and decoder under
                    torch.autocast on the model's device type; None = the model's own precision.
                    Outputs are float32 either way.
    encoder_batch:  None: one image-encoder call for all images of a batch. An int: calls of
                    exactly this many images, the last one padded with zero images (the shapes
                    a compiled encoder needs to stay static; see plabel.method.sam.compile).
    """

    PENDING_BYTES = 256 << 20  # device memory of full-size masks held before copying to host

    def __init__(self, model: SamModel, stages: Stages = DEFAULT_STAGES,
                 autocast_dtype: torch.dtype | None = None, encoder_batch: int | None = None):
        if encoder_batch is not None and encoder_batch < 1:
            raise ValueError(f"encoder_batch must be >= 1, got {encoder_batch}")
        self.model = model
        self.encoder_batch = encoder_batch
        self.sam = model.sam.eval()
        self.stages = validate_stages(stages)
        self.autocast_dtype = autocast_dtype
        self.transform = ResizeLongestSide(self.sam.image_encoder.img_size)
        self.low_res_size = tuple(self.sam.prompt_encoder.mask_input_size)

    @property
    def device(self) -> torch.device:
        return self.sam.device

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of an image of ``original_size`` (H, W) after ResizeLongestSide, before padding."""
        return ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1],
                                                      self.transform.target_length)

    def _preprocess(self, image: np.ndarray) -> torch.Tensor:
        """float32 (1, 3, S, S): resized, normalised and padded exactly as SamPredictor.set_image."""
        resized = self.transform.apply_image(as_rgb_uint8(image))
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        return self.sam.preprocess(tensor)

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Image embeddings, float32 (B, E, g, g) on the model's device (g = 64 for real backends).

        images: uint8 (H, W, 3) RGB (or (H, W) grayscale), any sizes. One image_encoder call.
        """
        batch = torch.cat([self._preprocess(im) for im in images], dim=0)
        if self.encoder_batch is None:
            with self._autocast():
                return self.sam.image_encoder(batch).float()
        out = []
        for k in range(0, batch.shape[0], self.encoder_batch):
            chunk = batch[k:k + self.encoder_batch]
            n = chunk.shape[0]
            if n < self.encoder_batch:
                chunk = torch.cat([chunk, chunk.new_zeros((self.encoder_batch - n, *chunk.shape[1:]))])
            with self._autocast():
                out.append(self.sam.image_encoder(chunk)[:n].float())
        return torch.cat(out)

    @torch.no_grad()
    def refine_batch(self, images: Sequence[np.ndarray],
                     prompts: Sequence[RefinementPrompts]) -> list[RefinementResult]:
        """Refine every image's classes. Returns one RefinementResult per image, in order.

        Images without any valid class are not encoded and get all-False masks. Decoded outputs
        stay on the device and are copied to host memory in groups (up to PENDING_BYTES), so the
        host does not wait for the device after every image.
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompt sets")
        todo = [i for i, p in enumerate(prompts) if np.asarray(p.valid).any()]
        sizes = [tuple(int(n) for n in np.asarray(im).shape[:2]) for im in images]
        results = [self._to_result(None, p, s) for p, s in zip(prompts, sizes)]
        if not todo:
            return results
        features = self.encode([images[i] for i in todo])
        dense_pe = self.sam.prompt_encoder.get_dense_pe()
        pending: dict[int, dict] = {}
        pending_bytes = 0
        for row, i in enumerate(todo):
            pending[i] = self._decode(features[row:row + 1], sizes[i], prompts[i], dense_pe)
            pending_bytes += len(pending[i]["valid"]) * sizes[i][0] * sizes[i][1] * len(self.stages)
            if pending_bytes > self.PENDING_BYTES or row == len(todo) - 1:
                for j, dec in pending.items():
                    results[j] = self._to_result(dec, prompts[j], sizes[j])
                pending, pending_bytes = {}, 0
        return results

    @torch.no_grad()
    def refine_features(self, features: torch.Tensor, original_size: tuple[int, int],
                        prompts: RefinementPrompts) -> RefinementResult:
        """Refine one image's classes from its embedding.

        features: float (1, E, g, g) from encode(); original_size: (H, W) of the image.
        One prompt_encoder + mask_decoder call per stage covering all valid classes.
        """
        size = (int(original_size[0]), int(original_size[1]))
        decoded = None
        if np.asarray(prompts.valid).any():
            decoded = self._decode(features, size, prompts, self.sam.prompt_encoder.get_dense_pe())
        return self._to_result(decoded, prompts, size)

    def _decode(self, features: torch.Tensor, size: tuple[int, int], prompts: RefinementPrompts,
                dense_pe: torch.Tensor) -> dict:
        """Run all stages for the valid classes of one image; outputs stay on the device.

        Returns {"valid": int array (n,), "masks": [bool (n, H, W)] per stage,
        "iou": [float32 (n,)] per stage, "logits": float32 (n, h, w) of the last stage}.
        """
        H, W = size
        valid = np.flatnonzero(np.asarray(prompts.valid, dtype=bool))
        dev = self.device
        boxes = torch.as_tensor(self.transform.apply_boxes(np.asarray(prompts.boxes)[valid], size),
                                dtype=torch.float, device=dev)
        labels = np.asarray(prompts.point_labels)[valid]
        keep = (labels != -1).any(axis=0)  # drop columns that are padding for every class
        points = None
        if keep.any():
            coords = self.transform.apply_coords(np.asarray(prompts.points)[valid][:, keep], size)
            points = (torch.as_tensor(coords, dtype=torch.float, device=dev),
                      torch.as_tensor(labels[:, keep], dtype=torch.int, device=dev))
        input_size = self.input_size(size)
        out = {"valid": valid, "masks": [], "iou": []}
        prev_logits = None
        for k, stage in enumerate(self.stages):
            point_arg = points if "points" in stage else None
            box_arg = boxes if "box" in stage else None
            mask_arg = prev_logits if "mask" in stage else None
            if point_arg is None and box_arg is None and mask_arg is None:
                raise ValueError(f"stage {k + 1} {stage}: no valid class of this image has such a prompt")
            with self._autocast():
                sparse, dense = self.sam.prompt_encoder(points=point_arg, boxes=box_arg, masks=mask_arg)
                low_res, iou = self.sam.mask_decoder(
                    image_embeddings=features, image_pe=dense_pe, sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense, multimask_output=False)
            low_res, iou = low_res.float(), iou.float()  # (n, 1, h, w), (n, 1)
            full = self.sam.postprocess_masks(low_res, input_size, (H, W)) > self.sam.mask_threshold
            out["masks"].append(full[:, 0])
            out["iou"].append(iou[:, 0])
            prev_logits = low_res
        out["logits"] = prev_logits[:, 0]
        return out

    def _to_result(self, decoded: dict | None, prompts: RefinementPrompts,
                   size: tuple[int, int]) -> RefinementResult:
        """Host-side RefinementResult from _decode's device tensors (None: no valid class)."""
        result = _empty_result(prompts, size, len(self.stages), self.low_res_size)
        if decoded is None:
            return result
        valid = decoded["valid"]
        for k in range(len(self.stages)):
            result.stage_masks[k][valid] = decoded["masks"][k].cpu().numpy()
            result.stage_iou[k][valid] = decoded["iou"][k].cpu().numpy()
        result.low_res_logits[valid] = decoded["logits"].cpu().numpy()
        return result


@torch.no_grad()
def refine_reference(model: SamModel, image: np.ndarray, prompts: RefinementPrompts,
                     stages: Stages = DEFAULT_STAGES) -> RefinementResult:
    """The paper's per-prompt procedure with SamPredictor, for equivalence checks.

    set_image once, then one predictor.predict call per valid class per stage (that class's
    non-padding points, its box, the previous stage's low-res logits), multimask_output=False.
    Same output layout as SamRefiner.refine_batch.
    """
    stages = validate_stages(stages)
    image = as_rgb_uint8(image)
    H, W = image.shape[:2]
    low_res_size = tuple(model.sam.prompt_encoder.mask_input_size)
    result = _empty_result(prompts, (H, W), len(stages), low_res_size)
    valid = np.flatnonzero(np.asarray(prompts.valid, dtype=bool))
    if valid.size == 0:
        return result
    predictor = SamPredictor(model.sam)
    predictor.set_image(image)
    for c in valid:
        own = prompts.point_labels[c] != -1
        prev = None
        for k, stage in enumerate(stages):
            use_points = "points" in stage and own.any()
            masks, iou, low_res = predictor.predict(
                point_coords=prompts.points[c][own] if use_points else None,
                point_labels=prompts.point_labels[c][own] if use_points else None,
                box=prompts.boxes[c] if "box" in stage else None,
                mask_input=prev if "mask" in stage else None,
                multimask_output=False,
            )
            result.stage_masks[k][c] = masks[0]
            result.stage_iou[k][c] = iou[0]
            prev = low_res  # (1, h, w)
        result.low_res_logits[c] = prev[0]
    return result
