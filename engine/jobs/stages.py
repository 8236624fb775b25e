"""The stages of `plabel run`, in order, as data (plabel.jobs.runner.Stage).

    stage      reads                                   writes
    ingest     data.source                             shards/ (+ manifest.json)
    teacher    labelled + val shards, teacher:         teacher.pt
    calibrate  val shards, teacher.pt, label:          gate_policy.json (the gate per class)
    label      unlabelled shards, teacher.pt,          pseudo_labels/ (the pseudo-label table)
               gate_policy.json, label:
    student    pseudo_labels/, shards, teacher.pt,     student.pt (student-k.pt: soup members)
               student:
    evaluate   test shards, teacher.pt, student.pt     dice_table.txt
    report     results.json, the table, the models,    report.html + report.json (plabel.report, no Ray)
               a few shard images

Self-training rounds (`student.rounds` R > 1): calibrate, label and student run once per round, and
round r's teacher is round r - 1's student. The last round's stages keep the names and files above
(student.pt is always the final student); round r < R runs as calibrate-r, label-r and student-r
and writes round-r/gate_policy.json, round-r/pseudo_labels and round-r/student.pt (:class:`Round`).

Each stage's key names what its result depends on; the runner skips a stage whose key and outputs
are unchanged. Adding a stage to `plabel run` is one more entry in :func:`run_stages_for`.
"""
from __future__ import annotations

from dataclasses import dataclass

from plabel.data import storage
from plabel.data.ingest import ingest
from plabel.data.table_commit import MARKER_NAME, table_marker
from plabel.jobs.calibrate_job import calibrate_stage, labelling_config
from plabel.jobs.evaluate_job import evaluate_checkpoint
from plabel.jobs.label_job import label_job_fingerprint, label_settings, run_label_job
from plabel.jobs.runner import RunContext, Stage
from plabel.jobs.train_job import labelled_dataset, maybe_materialize, student_dataset, train_unet
from plabel.method.calibration import POLICY_FILE
from plabel.method.metrics import format_dice_table
from plabel.method.unet import checkpoint_sha256, load_checkpoint
from plabel.report import build_report
from plabel.report.collect import REPORT_VERSION, stage_sort_key
from plabel.schemas.config import LabelSection, RunConfig
from plabel.training.selection import describe_guard, guard_average
from plabel.training.soup import average_checkpoints

# ------------------------------------------------------------------------------------------ ingest


def _ingest(ctx: RunContext) -> dict:
    d = ctx.cfg.data
    counts = {"labelled": d.labelled, "val": d.val, "test": d.test}
    manifest = ingest(d.source, ctx.at("shards"), counts=counts, seed=d.seed, shard_size=d.shard_size)
    return {"counts": {k: v["n_samples"] for k, v in manifest["splits"].items()}}


def _ingest_key(ctx: RunContext) -> dict:
    d = ctx.cfg.data
    return {"labelled": d.labelled, "val": d.val, "test": d.test, "seed": d.seed, "shard_size": d.shard_size}


# ----------------------------------------------------------------------------------------- teacher


def _validation_set(ctx: RunContext, size: int, intensity: str):
    C, split = len(ctx.classes), ctx.val_split
    return maybe_materialize(labelled_dataset(ctx.paths(split), C, size, intensity), ctx.n(split), C, size,
                             expected_rows=ctx.n(split), what=f"{split} split")


def _teacher(ctx: RunContext) -> dict:
    section, C = ctx.cfg.teacher, len(ctx.classes)
    S, I = section.image_size, section.intensity
    train = maybe_materialize(labelled_dataset(ctx.paths("labelled"), C, S, I), ctx.n("labelled"), C, S,
                              expected_rows=ctx.n("labelled"), what="labelled split")
    bar, on_epoch = ctx.epoch_progress("teacher", section.epochs)
    with bar:
        out = train_unet(train, _validation_set(ctx, S, I), ctx.classes, section, ctx.at("teacher.pt"),
                         ctx.at("ray_train"), "teacher", role="teacher", on_epoch=on_epoch)
    out["sha256"] = checkpoint_sha256(ctx.at("teacher.pt"))
    return out


def _data_key(ctx: RunContext) -> dict:
    """What every model stage reads of the data: the manifest (ids, splits, classes)."""
    return {"manifest": storage.read_text(storage.join(ctx.shards_dir, "manifest.json"))}


# ------------------------------------------------------------------------------ self-training rounds


@dataclass(frozen=True)
class Round:
    """Round r of R (``student.rounds``): the files and stage names of its calibrate, label and student
    stages. The last round uses the run directory's top-level names (gate_policy.json, pseudo_labels,
    student.pt, stages calibrate / label / student); an earlier round r writes under round-r/ and its
    stages are named calibrate-r, label-r, student-r. Round 1's teacher is teacher.pt, round r's is
    round r - 1's student."""

    r: int = 1
    rounds: int = 1

    @property
    def last(self) -> bool:
        return self.r == self.rounds

    def file(self, name: str) -> str:
        """A run-dir-relative path of this round's output ``name``."""
        return name if self.last else f"round-{self.r}/{name}"

    def stage(self, name: str) -> str:
        return name if self.last else f"{name}-{self.r}"

    @property
    def teacher(self) -> str:
        return "teacher.pt" if self.r == 1 else Round(self.r - 1, self.rounds).file("student.pt")

    @property
    def student(self) -> str:
        return self.file("student.pt")

    @property
    def policy(self) -> str:
        return self.file(POLICY_FILE)

    @property
    def table(self) -> str:
        return self.file("pseudo_labels")

    def tag(self) -> str:
        """'' for a run of one round, else ' (round r of R)': for console lines."""
        return "" if self.rounds == 1 else f" (round {self.r} of {self.rounds})"


def _at(ctx: RunContext, relative: str) -> str:
    return ctx.at(*relative.split("/"))


def _sha(ctx: RunContext, relative: str) -> str | None:
    return ctx.sha(*relative.split("/"))


# --------------------------------------------------------------------------------------- calibrate


def _calibrate_applies(ctx: RunContext) -> str | None:
    if not ctx.cfg.label.gate.calibrate:
        return "off (label.gate.calibrate: false): the configured gate is used"
    if not ctx.paths("val"):
        return "no validation split (data.val: 0): the configured gate is used"
    return None


def _calibrate(ctx: RunContext, rnd: Round = Round()) -> dict:
    return calibrate_stage(ctx.cfg, ctx.paths("val"), ctx.classes, _at(ctx, rnd.teacher), _sha(ctx, rnd.teacher),
                           _at(ctx, rnd.policy), ctx.echo)


def _calibrate_key(ctx: RunContext, rnd: Round = Round()) -> dict:
    label = ctx.cfg.label.model_dump()
    gate = {k: v for k, v in label["gate"].items() if k != "per_class"}  # overrides apply at labelling
    return {**_data_key(ctx), "teacher": _sha(ctx, rnd.teacher), "gate": gate, "cleaning": label["cleaning"],
            "sam": _sam_key(ctx.cfg.label)}


def _sam_key(label: LabelSection) -> dict:
    """The SAM settings that change its masks (not actor counts, devices or compilation)."""
    sam = label.sam
    return {"backend": sam.backend, "checkpoint": sam.checkpoint, "sha256": sam.sha256,
            "stages": [list(s) for s in sam.stages], "autocast": sam.autocast}


# ------------------------------------------------------------------------------------------- label


def label_section(ctx: RunContext, rnd: Round = Round()) -> LabelSection:
    """The label section the label stage uses: the config's, with the calibrated gate of
    gate_policy.json when the calibrate stage applies (its per_class overrides win)."""
    if _calibrate_applies(ctx) is None:
        return labelling_config(ctx.cfg, _at(ctx, rnd.policy))
    return ctx.cfg.label


def _label(ctx: RunContext, rnd: Round = Round()) -> dict:
    section, table, shards = label_section(ctx, rnd), _at(ctx, rnd.table), ctx.paths("unlabelled")
    teacher, stage = _at(ctx, rnd.teacher), rnd.stage("label")
    marker = table_marker(table)
    if marker is not None:
        if marker.get("job_fingerprint") == label_job_fingerprint(shards, ctx.classes, teacher, section):
            ctx.echo(f"[{stage}] the table of this teacher and gate was committed by an earlier run, reused")
            return {k: marker[k] for k in ("rows", "ok", "empty", "error")}
        ctx.echo(f"[{stage}] the committed table came from another teacher or other label settings: labelling again")
        storage.delete_dir(table)
    with ctx.progress(stage, ctx.n("unlabelled"), "images") as bar:
        out = run_label_job(shards, table, ctx.classes, teacher, section,
                            progress=lambda n, total: bar.advance(n, total=total))
    if out.get("shards_skipped"):
        ctx.echo(f"[{stage}] resumed: {out['shards_skipped']} of {out['shards']} shard(s) were committed by an "
                 "earlier run, skipped")
    return out


def _label_key(ctx: RunContext, rnd: Round = Round()) -> dict:
    """The label job's settings (classes, teacher, SAM, cleaning, the effective gate) and the data (by
    its manifest, not by where the shards lie: a run directory may be moved)."""
    section = label_section(ctx, rnd)
    return {**_data_key(ctx), "job": label_settings(ctx.classes, _at(ctx, rnd.teacher), section),
            "max_image_pixels": section.max_image_pixels}


def _label_summary(out: dict) -> str:
    plan = f"; {out['plan']}" if out.get("plan") else ""  # absent when an earlier run's table was reused
    return f"{out['rows']} rows (ok {out['ok']}, empty {out['empty']}, error {out['error']}){plan}"


# ----------------------------------------------------------------------------------------- student


def _student(ctx: RunContext, rnd: Round = Round()) -> dict:
    cfg, classes = ctx.cfg, ctx.classes
    section, stage = cfg.student, rnd.stage("student")
    labelled = ctx.paths("labelled") if section.include_labelled else []
    train = student_dataset(_at(ctx, rnd.table), ctx.paths("unlabelled"), labelled, classes, section.image_size,
                            section.intensity, ctx.n("unlabelled"), ctx.n("labelled") if labelled else 0,
                            what=f"{ctx.name}/{rnd.table} with the images of the unlabelled shards")
    val = _validation_set(ctx, section.image_size, section.intensity)
    teacher = _at(ctx, rnd.teacher)
    init = teacher if section.init == "teacher" else None
    distill = teacher if section.distill > 0 else None
    if section.soup == 1:
        bar, on_epoch = ctx.epoch_progress(stage, section.epochs)
        with bar:
            out = train_unet(train, val, classes, section, _at(ctx, rnd.student), ctx.at("ray_train"), stage,
                             role="student", init_checkpoint=init, distill_from=distill, on_epoch=on_epoch)
        if out.get("guard"):
            ctx.echo(f"[{stage}] guarded selection {describe_guard(out['guard'])}")
    else:
        out = _soup(ctx, train, val, init, distill, rnd)
    out["init"] = section.init
    out["distill"] = section.distill
    out["teacher"] = rnd.teacher
    # best_epoch -1: guarded selection kept the teacher's weights (every epoch lost a class on val)
    out["selection"] = section.selection if init is not None else "mean"
    out["sha256"] = checkpoint_sha256(_at(ctx, rnd.student))
    return out


def _soup(ctx: RunContext, train, val, init: str | None, distill: str | None, rnd: Round = Round()) -> dict:
    """student.soup k > 1: k students (seeds seed .. seed + k - 1; a member an earlier run finished is
    reused), student.pt = the average of their weights, held to the guarded rule."""
    section, classes, stage = ctx.cfg.student, ctx.classes, rnd.stage("student")
    members = []
    for k in range(section.soup):
        member_section = section.model_copy(update={"seed": section.seed + k})
        member_file = rnd.file(f"student-{k}.pt")
        ckpt = _at(ctx, member_file)
        if storage.exists(ckpt):  # written once its training finished: an earlier run got this far
            ctx.echo(f"[{stage}] soup member {k + 1} of {section.soup}: {member_file} of an earlier run, reused")
            extra = load_checkpoint(ckpt)[2]
            member = {"best_val_dice": extra.get("val_dice"), "best_epoch": extra.get("epoch"),
                      "epochs": member_section.epochs, "reused": True}
        else:
            ctx.echo(f"[{stage}] soup member {k + 1} of {section.soup} (seed {member_section.seed})")
            bar, on_epoch = ctx.epoch_progress(f"{stage} {k + 1}/{section.soup}", member_section.epochs)
            with bar:
                member = train_unet(train, val, classes, member_section, ckpt, ctx.at("ray_train"), f"{stage}-{k}",
                                    role="student", init_checkpoint=init, distill_from=distill, on_epoch=on_epoch)
            if member.get("guard"):
                ctx.echo(f"[{stage} {k + 1}/{section.soup}] guarded selection {describe_guard(member['guard'])}")
        members.append({**member, "seed": member_section.seed, "checkpoint": member_file,
                        "sha256": checkpoint_sha256(ckpt)})
    average_checkpoints([_at(ctx, m["checkpoint"]) for m in members], _at(ctx, rnd.student),
                        {"soup": [m["sha256"] for m in members]})
    # the average is a model none of the members' validation passes has seen: score it there too
    soup_val = evaluate_checkpoint(_at(ctx, rnd.student), ctx.paths(ctx.val_split), classes)
    out = {"soup": members, "epochs": section.epochs,
           "best_epoch": [m["best_epoch"] for m in members],
           "best_val_dice": [m["best_val_dice"] for m in members],
           "soup_val_dice": {"mean_dice": soup_val["mean_dice"], "per_class": soup_val["per_class"],
                             "split": ctx.val_split, "n_images": soup_val["n_images"]}}
    ctx.echo(f"[{stage}] soup of {len(members)}: validation Dice {soup_val['mean_dice']:.4f} (members' best: "
             + ", ".join(f"{m['best_val_dice']:.4f}" for m in members if m["best_val_dice"] is not None) + ")")
    if init is not None and section.selection == "guarded":
        out["soup_guard"] = _guard_soup(ctx, soup_val, members, rnd)
    return out


def _guard_soup(ctx: RunContext, soup_val: dict, members: list, rnd: Round = Round()) -> dict:
    """Guarded selection for the average (plabel.training.selection.guard_average): it may lose no
    class on the validation split by more than selection_tolerance against the round's teacher; if it
    does, student.pt becomes the member with the best validation Dice (each member is guarded)."""
    classes, tol = ctx.classes, ctx.cfg.student.selection_tolerance
    teacher_val = evaluate_checkpoint(_at(ctx, rnd.teacher), ctx.paths(ctx.val_split), classes)["per_class"]
    lost, k = guard_average([soup_val["per_class"][c] for c in classes], [teacher_val[c] for c in classes],
                            [m["best_val_dice"] for m in members], tol)
    lost, kept = [classes[i] for i in lost], "soup"
    if k is not None:
        best = members[k]
        storage.copy_file(_at(ctx, best["checkpoint"]), _at(ctx, rnd.student))
        kept = best["checkpoint"]
        ctx.echo(f"[{rnd.stage('student')}] the soup lost {', '.join(lost)} on the {ctx.val_split} split (more than {tol} "
                 f"below the teacher): {rnd.student} is {kept} (seed {best['seed']}), the member with the best "
                 "validation Dice")
    return {"teacher_val_dice": teacher_val, "tolerance": tol, "lost_classes": lost, "kept": kept}


def _student_key(ctx: RunContext, rnd: Round = Round()) -> dict:
    marker = table_marker(_at(ctx, rnd.table)) or {}
    student = {k: v for k, v in ctx.cfg.student.model_dump().items() if k != "rounds"}  # the round is in the files
    return {**_data_key(ctx), "teacher": _sha(ctx, rnd.teacher), "student": student,
            "table": {k: marker.get(k) for k in ("job_fingerprint", "files", "rows", "ok", "empty", "error",
                                                 "unet_checkpoint_sha256")}}


# ---------------------------------------------------------------------------------------- evaluate


def _evaluate_applies(ctx: RunContext) -> str | None:
    return None if ctx.paths("test") else "no test split (data.test: 0): nothing to evaluate"


def _models(ctx: RunContext) -> dict[str, str]:
    """The models the evaluate stage scores, {name: run-dir-relative file}: the teacher, each earlier
    round's student ('student round r') and the final student."""
    rounds = ctx.cfg.student.rounds
    earlier = {f"student round {r}": Round(r, rounds).student for r in range(1, rounds)}
    return {"teacher": "teacher.pt", **earlier, "student": "student.pt"}


def _evaluate(ctx: RunContext) -> dict:
    out = {m: evaluate_checkpoint(_at(ctx, f), ctx.paths("test"), ctx.classes) for m, f in _models(ctx).items()}
    table = format_dice_table(out, ctx.classes, hd95={m: s["hd95"] for m, s in out.items()})
    storage.write_text(ctx.at("dice_table.txt"), table + "\n")
    return out


def _evaluate_key(ctx: RunContext) -> dict:
    return {**_data_key(ctx), **{m: _sha(ctx, f) for m, f in _models(ctx).items()}}


# ------------------------------------------------------------------------------------------ report


def _report_applies(ctx: RunContext) -> str | None:
    if storage.is_remote(ctx.run):
        return "the run directory is in object storage: `plabel report` builds it from a local copy"
    return None


def _report(ctx: RunContext) -> dict:
    out = build_report(ctx.run)  # the review queue's defaults: 8 + 8 images, seed 0
    return {"html": "report.html", "json": "report.json", "bytes": out["bytes"], "images": out["images"]}


def _report_key(ctx: RunContext) -> dict:
    """Everything the report shows: the other stages' results, the table, the models, the gate."""
    return {"stages": {k: v for k, v in ctx.results["stages"].items() if k != "report"},
            "table": table_marker(ctx.at("pseudo_labels")), "teacher": ctx.sha("teacher.pt"),
            "student": ctx.sha("student.pt"), "gate_policy": ctx.sha(POLICY_FILE), "version": REPORT_VERSION}


def _round_stages(rnd: Round) -> tuple[Stage, ...]:
    """Calibrate, label and student of one self-training round (:class:`Round`)."""
    tag = rnd.tag()
    return (
        Stage(rnd.stage("calibrate"), reads=("shards: val", rnd.teacher, "label.gate", "label.cleaning", "label.sam"),
              writes=(rnd.policy,), key=lambda ctx: _calibrate_key(ctx, rnd), run=lambda ctx: _calibrate(ctx, rnd),
              applies=_calibrate_applies, summary=(lambda out: f"round {rnd.r} of {rnd.rounds}") if tag else None),
        Stage(rnd.stage("label"), reads=("shards: unlabelled", rnd.teacher, rnd.policy, "label"),
              writes=(f"{rnd.table}/{MARKER_NAME}",), key=lambda ctx: _label_key(ctx, rnd),
              run=lambda ctx: _label(ctx, rnd), summary=lambda out: _label_summary(out) + tag),
        Stage(rnd.stage("student"), reads=(rnd.table, "shards: unlabelled, labelled, val", rnd.teacher, "student"),
              writes=(rnd.student,), key=lambda ctx: _student_key(ctx, rnd), run=lambda ctx: _student(ctx, rnd),
              summary=(lambda out: f"{rnd.student} from {rnd.teacher}{tag}") if tag else None),
    )


def run_stages_for(cfg: RunConfig | None = None) -> tuple[Stage, ...]:
    """The stages of `plabel run` for ``cfg``: ingest, teacher, then calibrate, label and student once per
    self-training round (``student.rounds``; the last round's under their plain names), evaluate, report.
    None: one round."""
    rounds = 1 if cfg is None else cfg.student.rounds
    return (
        Stage("ingest", reads=("data.source",), writes=("shards/manifest.json",), key=_ingest_key, run=_ingest,
              applies=lambda ctx: None if ctx.cfg.data.source is not None else
              f"data.shards given: using the ingested shards in {storage.redact(ctx.cfg.data.shards)}",
              ray=False),
        Stage("teacher", reads=("shards: labelled, val", "teacher"), writes=("teacher.pt",),
              key=lambda ctx: {**_data_key(ctx), "teacher": ctx.cfg.teacher.model_dump()}, run=_teacher,
              summary=lambda out: f"best validation Dice {out['best_val_dice']:.4f} (epoch {out['best_epoch']})"
              if out.get("best_val_dice") is not None else ""),
        *(s for r in range(1, rounds + 1) for s in _round_stages(Round(r, rounds))),
        Stage("evaluate", reads=("shards: test", "teacher.pt", "student.pt"), writes=("dice_table.txt",),
              key=_evaluate_key, run=_evaluate, applies=_evaluate_applies),
        Stage("report", reads=("results.json", "pseudo_labels", POLICY_FILE, "teacher.pt", "student.pt", "shards"),
              writes=("report.html",), key=_report_key, run=_report, applies=_report_applies, ray=False,
              summary=lambda out: f"report.html ({out['bytes'] / 1e6:.1f} MB, {out['images']} images)"),
    )


#: the stages of a run of one self-training round (the default)
RUN_STAGES: tuple[Stage, ...] = run_stages_for()


def student_note(out: dict) -> str | None:
    """One line when the student stage handed back the teacher (guarded selection) or a soup
    fell back to one member; None when the student is what was trained and averaged."""
    if out.get("guard"):
        return f"the student is the teacher: guarded selection {describe_guard(out['guard'])}"
    members = out.get("soup") or []
    guarded = [m for m in members if m.get("guard")]
    if members and len(guarded) == len(members):
        return (f"the student is the teacher: every soup member kept the teacher's weights (member 1: "
                f"{describe_guard(guarded[0]['guard'])})")
    soup_guard = out.get("soup_guard") or {}
    if soup_guard.get("kept", "soup") != "soup":
        soup_val, teacher_val = (out.get("soup_val_dice") or {}).get("per_class", {}), soup_guard["teacher_val_dice"]
        lost = ", ".join(f"{c} by {teacher_val[c] - soup_val[c]:.4f}" if c in soup_val else c
                         for c in soup_guard["lost_classes"])
        return (f"the student is one soup member ({soup_guard['kept']}), not the average: the average fell below "
                f"the teacher on the validation images (tolerance {soup_guard['tolerance']}): {lost}")
    if guarded:
        return f"{len(guarded)} of {len(members)} soup members kept the teacher's weights (guarded selection)"
    return None


def final_report(ctx: RunContext) -> None:
    """The console's closing lines: the Dice table, stage times, the table's counts, the run directory."""
    stages = ctx.results["stages"]
    if "evaluate" in stages and storage.exists(ctx.at("dice_table.txt")):
        ctx.echo(storage.read_text(ctx.at("dice_table.txt")).rstrip("\n"))
    if "student" in stages and (note := student_note(stages["student"])):
        ctx.echo(f"note: {note}")
    ctx.echo("stage wall times (s): " + ", ".join(f"{k} {stages[k]['wall_s']:.1f}"
                                              for k in sorted(stages, key=stage_sort_key)))
    if "label" in stages:
        ctx.echo(f"pseudo labels: {_label_summary(stages['label'])} in {storage.join(ctx.name, 'pseudo_labels')}")
    ctx.echo(f"run directory: {ctx.name}")
    if "report" in stages and storage.exists(ctx.at("report.html")):
        ctx.echo(f"report: {ctx.at('report.html')}")
