"""FID during training (``ldm train-ldm --eval-every N --eval-samples K``): sample K images with fixed seeds and
measure them against a reference with :mod:`ldmcli.eval` (torch-fidelity's Inception and metric functions); for an
autoencoder (``ldm train-ae``), rFID and PSNR of K examples' reconstructions against those examples.

:func:`check` runs before the data is scanned (the conditioning, the sampler settings, the reference, and the
Inception weights: fetched through the store, with progress, and read once so a corrupt file fails now rather than at
step N); :func:`prepare` completes the plan once the data is read. :class:`SampleEvaluator` does one evaluation; the
Lightning callback that calls it every N steps is :class:`ldmcli.training.callbacks.SampleQuality`, inside
:func:`evaluation_mode`.

What is sampled is what ``ldm eval model`` samples: image ``i`` has seed ``i`` (its own CPU generator for the initial
noise and every later draw), class ``i mod C`` for a class-conditional model (C: the classes of the training data),
and for a text model the caption of example ``i mod n`` of the validation data (else the training data). Sampling
runs with the EMA weights when the model keeps EMA, in eval mode, through the generation library
(:func:`ldmcli.pipelines.generation.generate`).

The reference is ``eval_ref`` (a folder of images, an ``.npz`` of images or of statistics, as ``ldm eval samples
--ref`` takes), or by default the validation data, else the training data: those examples exactly as the model sees
them (cropped and resized to its resolution, no flips), at most :data:`MAX_REFERENCE` of them, evenly spaced. Its
features are cached in ``<data dir>/cache/eval/`` by the hash of the pixels and of the Inception weights, so they are
computed once, not once per evaluation or per run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ldmcli.errors import UsageError
from ldmcli.training.events import Progress, TrainEvent

#: default reference: at most this many examples of the validation (or training) data, the usual FID sample size
MAX_REFERENCE = 50_000
INCEPTION_BATCH = 50


@dataclass
class DatasetReference:
    """Examples of a training/validation dataset as Inception's reference: uint8 ``[h, w, 3]`` at the model's
    resolution (the dataset's own crop and resize; no random flip, since no per-example seed is given)."""

    dataset: Any
    indices: list[int]
    label: str

    def __len__(self) -> int:
        return len(self.indices)

    def images(self) -> Iterator[np.ndarray]:
        for i in self.indices:
            x = np.asarray(self.dataset[i]["image"], dtype=np.float32)
            if x.ndim == 2:
                x = x[..., None]
            u8 = np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
            yield np.repeat(u8, 3, axis=-1) if u8.shape[-1] == 1 else u8[..., :3]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        pending: list[np.ndarray] = []
        for image in self.images():
            pending.append(image)
            if len(pending) == batch_size:
                yield np.stack(pending)
                pending = []
        if pending:
            yield np.stack(pending)

    def content_hash(self) -> str:
        digest = hashlib.sha256(b"pixels")
        for image in self.images():
            digest.update(repr(image.shape).encode())
            digest.update(image.tobytes())
        return digest.hexdigest()


def _dataset_reference(dataset: Any, what: str, limit: int = MAX_REFERENCE) -> DatasetReference:
    """At most ``limit`` examples of ``dataset``, evenly spaced (every class of a class-sorted folder)."""
    n = len(dataset)
    if n < 2:
        raise UsageError(f"FID needs at least 2 reference images; the {what} has {n}")
    if n <= limit:
        indices = list(range(n))
    else:
        indices = sorted({int(round(v)) for v in np.linspace(0, n - 1, limit)})
    return DatasetReference(dataset, indices, f"{len(indices)} images of the {what}")


@dataclass
class QualityPlan:
    """A checked FID setup: every ``every`` steps, ``len(items)`` images (``items``: class ids, captions or None)."""

    every: int
    items: list[Any]
    conditioning: str  # "unconditional", "class", "text", or "reconstruction" (autoencoders: items are indices)
    null_class: int | None
    settings: Any  # ldmcli.sampling.SamplerSettings (None for autoencoders)
    reference: Any  # DatasetReference, an ldmcli.eval.images.ImageSet, or the Path of a statistics .npz
    reference_label: str
    batch_size: int
    shape: tuple[int, int, int]


def _conditioning(model_cfg: Any, dataset: Any, val_dataset: Any, n: int, scale: float,
                  cond_drop: float) -> tuple[str, list[Any], int | None]:
    """(kind, the n items to sample, null class for guidance)."""
    ldm = model_cfg.ldm
    kind = ldm.cond_stage.type
    if ldm.conditioning_key is None or kind == "unconditional":
        if scale != 1.0:
            raise UsageError("eval_scale: an unconditional model takes no guidance scale (use 1)")
        return "unconditional", [None] * n, None
    if kind == "class":
        from ldmcli.pipelines.generation import class_range

        labels = getattr(dataset, "labels", None) or [0]
        classes = max(labels) + 1  # the classes the model is trained on (one when only the kind is checked)
        _, null = class_range(model_cfg)
        if null is not None and null < classes:
            null = None  # the data uses that id as a real class
        if cond_drop > 0:
            null = int(ldm.cond_stage.params.n_classes) - 1
        if scale != 1.0 and null is None:
            raise UsageError("eval_scale: this model has no null class to guide against (train with a condition "
                             "drop, or use 1)")
        return "class", [i % classes for i in range(n)], null
    if kind == "bert" and ldm.cond_stage_key == "caption":
        source = val_dataset if val_dataset is not None and getattr(val_dataset, "captions", None) else dataset
        captions = getattr(source, "captions", None)
        if dataset is None:
            return "text", [], None  # only the kind is checked: the data comes later
        if not captions:
            raise UsageError("FID during training of a text model takes its prompts from the data's captions, and "
                             "the data has none")
        return "text", [captions[i % len(captions)] for i in range(n)], None
    raise UsageError(f"FID during training samples unconditional, class- and text-conditional models; this one is "
                     f"conditioned on {kind} input ({ldm.cond_stage_key})")


@dataclass
class QualityCheck:
    """What :func:`check` settled before the data is read: the sampler settings and the reference (None: the data)."""

    settings: Any  # ldmcli.sampling.SamplerSettings, or None for an autoencoder
    reference: Any  # an ldmcli.eval.images.ImageSet, the Path of a statistics .npz, or None


def check(kind: str, settings: Any, model_cfg: Any, callback: Progress | None = None) -> QualityCheck | None:
    """Check a run's FID settings and fetch the Inception weights, before the data is scanned (which can take
    minutes); None when ``eval_every`` is 0."""
    if not settings.eval_every:
        return None
    from ldmcli.eval import fidelity, metrics

    sampler = None
    if kind == "autoencoder":
        if settings.eval_ref is not None:
            raise UsageError("eval_ref applies to latent diffusion models: an autoencoder's rFID compares its "
                             "reconstructions with their inputs")
    else:
        _conditioning(model_cfg, None, None, 0, settings.eval_scale, settings.cond_drop)  # a kind we can sample?
        from ldmcli.eval.sampling import sample_settings

        sampler = sample_settings(settings.eval_sampler, settings.eval_steps, settings.eval_scale)
        sampler.validate(model_cfg.ldm.timesteps)
    reference = metrics.open_reference(settings.eval_ref) if settings.eval_ref is not None else None
    fidelity.library()  # a missing torch-fidelity: one line with the install command
    inception = metrics.Inception("cpu", on_event=_download_events(callback))  # through the store, with progress
    inception.net()  # read once now, so a corrupt file fails before training (and says how to fetch it again)
    return QualityCheck(sampler, reference)


def prepare(checked: QualityCheck | None, settings: Any, model_cfg: Any, dataset: Any, val_dataset: Any,
            batch_size: int) -> QualityPlan | None:
    """The full plan once the data is read: what to sample (or, for an autoencoder, which examples to
    reconstruct), and the reference by default (validation data, else training data)."""
    if checked is None:
        return None
    n = settings.eval_samples
    data, what = (val_dataset, "validation data") if val_dataset is not None else (dataset, "training data")
    if checked.settings is None:  # an autoencoder: rFID of n examples' reconstructions against those examples
        inputs = _dataset_reference(data, what, limit=n)
        return QualityPlan(settings.eval_every, inputs.indices, "reconstruction", None, None, inputs, inputs.label,
                           max(1, min(batch_size, n)), (3, 0, 0))
    conditioning, items, null = _conditioning(model_cfg, dataset, val_dataset, n, settings.eval_scale,
                                              settings.cond_drop)
    if checked.reference is not None:
        reference, label = checked.reference, str(settings.eval_ref)
    else:
        reference = _dataset_reference(data, what)
        label = reference.label
    shape = (int(model_cfg.ldm.channels), int(model_cfg.ldm.image_size), int(model_cfg.ldm.image_size))
    return QualityPlan(settings.eval_every, items, conditioning, null, checked.settings, reference, label,
                       max(1, min(batch_size, n)), shape)


def _download_events(callback: Progress | None) -> Callable[[Any], None] | None:
    if callback is None:
        return None

    def adapt(event: Any) -> None:
        if event.kind == "download":
            callback(TrainEvent("download", path=event.stage, done=event.done, total=event.total))

    return adapt


@dataclass
class Evaluation:
    """One evaluation's numbers (``val/fid``, ``val/kid``, ...), how long it took, and where its samples are."""

    step: int
    metrics: dict[str, float]
    samples: int
    seconds: float
    folder: Path


class _MeasuringWriter:
    """An :class:`ldmcli.output.ImageWriter` that also runs Inception on the images as they come, a batch at a time
    (memory holds one batch of pixels, not K images)."""

    def __init__(self, outdir: Path, inception: Any) -> None:
        from ldmcli.output import ImageWriter

        self.writer = ImageWriter(outdir)
        self.inception = inception
        self.pending: list[np.ndarray] = []
        self.features: list[Any] = []
        self.logits: list[Any] = []
        self.count = 0

    def write_sample(self, image: np.ndarray, metadata: Any) -> Any:
        self.pending.append(np.asarray(image))
        self.count += 1
        if len(self.pending) == INCEPTION_BATCH:
            self._flush()
        return self.writer.write_sample(image, metadata)

    def write_grid(self, images: np.ndarray, per_row: int, metadata: Any) -> Any:
        return self.writer.write_grid(images, per_row, metadata)

    def _flush(self) -> None:
        if self.pending:
            feats, logits = self.inception.extract_batches([np.stack(self.pending)], None, "samples")
            self.features.append(feats)
            self.logits.append(logits)
            self.pending = []

    def result(self) -> tuple[Any, Any]:
        """``[n, 2048]`` features and ``[n, 1008]`` logits of every image written."""
        import torch

        self._flush()
        return torch.cat(self.features), torch.cat(self.logits)


class SampleEvaluator:
    """Samples the plan's images with a model and measures them; the latest evaluation's samples are kept in
    ``<run>/eval/samples/`` (replaced as a whole by the next) with ``<run>/eval/latest.json``."""

    def __init__(self, plan: QualityPlan, run_dir: Path, callback: Progress | None = None) -> None:
        self.plan = plan
        self.folder = Path(run_dir) / "eval"
        self.callback = callback
        self._real: Any = None
        self._net: Any = None

    def _inception(self, device: Any) -> Any:
        from ldmcli.eval.metrics import Inception

        if self._net is None or self._net.device != device:
            self._net = Inception(device)
        return self._net

    def reference(self, inception: Any) -> Any:
        """The reference's features: from the plan's statistics file, the cache, or computed once (then cached)."""
        if self._real is not None:
            return self._real
        from ldmcli.eval import metrics

        ref = self.plan.reference
        if self.callback is not None:
            what = "rFID inputs" if self.plan.conditioning == "reconstruction" else "FID reference"
            self.callback(TrainEvent("message", text=f"{what}: {self.plan.reference_label}"))
        if isinstance(ref, DatasetReference):
            self._real = metrics.cached_reference(
                ref.content_hash(), len(ref), ref.label, inception,
                lambda: inception.extract_batches(ref.batches(INCEPTION_BATCH), len(ref), "reference")[0])
        else:
            self._real = metrics.reference_features(ref, inception, INCEPTION_BATCH)
        return self._real

    def __call__(self, net: Any, step: int) -> Evaluation:
        """Sample with ``net`` (a LatentDiffusion), or reconstruct with it (an autoencoder), and measure. The caller
        sets eval mode, no grad and the EMA weights; the global random state is not used (every image draws from its
        own seeded generator)."""
        from ldmcli.eval import fidelity
        from ldmcli.eval.metrics import FeatureSet, SampleMetrics, compare

        plan = self.plan
        started = time.perf_counter()
        device = next(net.parameters()).device
        inception = self._inception(device)
        real = self.reference(inception)
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.folder / ".new"
        shutil.rmtree(staging, ignore_errors=True)
        writer = _MeasuringWriter(staging, inception)
        if plan.conditioning == "reconstruction":
            psnrs = self._reconstruct(net, step, writer)
        else:
            self._sample(net, step, writer, device)
        feats, logits = writer.result()
        fake = FeatureSet(len(feats), fidelity.fid_statistics(feats), feats, logits)
        if plan.conditioning == "reconstruction":
            values = {"val/rfid": fidelity.fid(fake.stats, real.stats), "val/psnr": float(np.mean(psnrs))}
        else:
            result = SampleMetrics(fake.count, real.count, plan.reference_label)
            compare(fake, real, result)
            values = {"val/fid": result.fid, "val/kid": result.kid_mean, "val/is": result.is_mean,
                      "val/precision": result.precision, "val/recall": result.recall}
        values = {k: float(v) for k, v in values.items() if v is not None}
        self._publish(staging / "samples", step, values)
        shutil.rmtree(staging, ignore_errors=True)
        return Evaluation(step, values, len(feats), time.perf_counter() - started, self.folder / "samples")

    def _sample(self, net: Any, step: int, writer: _MeasuringWriter, device: Any) -> None:
        from ldmcli.pipelines import generation as gen

        plan = self.plan
        jobs = gen.plan_jobs(plan.items, plan.batch_size, 1, 0)
        if plan.conditioning == "class":
            conditioner: Any = gen.ClassConditioner(net, plan.settings.scale, plan.null_class)
        elif plan.conditioning == "text":
            conditioner = gen.TextConditioner(net, plan.settings.scale)
        else:
            conditioner = gen.Conditioner()
        chosen = plan.settings.resolve()
        base = {"command": "train-ldm eval", "step": step, "sampler": chosen.sampler, "steps": chosen.steps,
                "eta": chosen.eta, "scale": chosen.scale}
        key = {"class": "class", "text": "prompt"}.get(plan.conditioning)

        def metadata(job: Any, k: int) -> dict[str, Any]:
            extra = {key: job.items[k]} if key else {}
            return {**base, **extra, "seed": job.seeds[k], "index": job.item_indices[k]}

        gen.generate(net, jobs, conditioner=conditioner, shape=plan.shape, settings=plan.settings, writer=writer,
                     metadata=metadata, device=device, seed=0)

    def _reconstruct(self, net: Any, step: int, writer: _MeasuringWriter) -> np.ndarray:
        """The plan's examples through the autoencoder (KL: the posterior's mode; VQ: quantised), as ``ldm eval
        ae`` reconstructs them; returns each image's PSNR."""
        from ldmcli.eval.reconstruction import psnr, reconstruct

        plan = self.plan
        done, psnrs = 0, []
        for batch in plan.reference.batches(plan.batch_size):
            rec = reconstruct(net, batch)
            psnrs.append(psnr(batch, rec))
            for image in rec:
                writer.write_sample(image, {"command": "train-ae eval", "step": step, "example": plan.items[done]})
                done += 1
        return np.concatenate(psnrs)

    def _publish(self, new: Path, step: int, values: dict[str, float]) -> None:
        """Replace ``eval/samples`` by the new samples (renames: a folder is never half-written under its name)."""
        from ldmcli.fileio import atomic_write_text

        final, old = self.folder / "samples", self.folder / ".old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        settings = dataclasses.asdict(self.plan.settings.resolve()) if self.plan.settings is not None else {}
        record = {"step": step, "samples": len(list(final.glob("*.png"))), "reference": self.plan.reference_label,
                  **settings, "metrics": values}
        atomic_write_text(self.folder / "latest.json", json.dumps(record, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def evaluation_mode(module: Any, net: Any) -> Iterator[None]:
    """Eval mode, no autograd, the EMA weights (when kept) and a forked random state (CPU and the module's CUDA
    device): the training's mode, weights and random streams are as they were afterwards."""
    import torch

    was_training = module.training
    device = getattr(module, "device", None)
    cuda = [device] if device is not None and getattr(device, "type", "") == "cuda" else []
    module.eval()
    try:
        ema = net.ema_scope() if hasattr(net, "ema_scope") else contextlib.nullcontext()
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), ema:
            yield
    finally:
        if was_training:
            module.train()
