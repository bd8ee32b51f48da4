"""One evaluation report for one or several checkpoints: sample -> GenEval -> FID/KID -> CLIP score.

    t2i eval --ckpt base=runs/demo/pretrain --ckpt mixflow=runs/demo/mixflow --out runs/demo/eval
    t2i eval --ckpt sd35=/weights/sd3.5-medium --config configs/sd3.5-medium-512.yaml \\
        --prompts geneval/evaluation_metadata.jsonl --detector mask2former:/weights/m2f \\
        --object-names geneval/object_names.txt --color clip:/weights/clip-l.pt \\
        --fid-ref coco30k.npz --fid-extractor inception:/weights/inception-2015-12-05.pt --nproc 8

    t2i eval --ckpt digits=runs/digits --out runs/digits/eval --prompts digits-prompts.txt \\
        --fid-shards 'data/digits-val/*.tar'                                 # another domain: FID/KID only

Without --prompts the shapes-domain GenEval set is written to <out>/prompts and used. GenEval runs only
when the prompts carry GenEval tags (a metadata .jsonl); with a .txt prompt list or shard captions, or
with --no-geneval, it is skipped (said in the log and the report) and the report has FID/KID (and the
CLIP score with --clip). Per checkpoint <out>/<label>/ holds the samples (GenEval layout, resumable)
and geneval/ results; <out>/report.md, report.json and grid.png compare them (each written
atomically). Every number carries the settings it came from.

FID reference: --fid-ref is used as it is; --fid-shards builds <out>/fid_ref.npz (or the given
--fid-ref path when it does not exist yet) at the sampling resolution. Its meta records the source,
--fid-max, the extractor and the resolution: when they no longer match the arguments, the default
<out>/fid_ref.npz is rebuilt and a user-given --fid-ref is refused. A reference made at another
resolution than the samples' is refused unless --allow-resolution-mismatch; sizes are compared as
(width, height), so samples at --resolution 1216x832 need a reference made at 1216x832 (shards
cover-resized and centre-cropped to it), not one at a square (docs/design/evaluation.md §5.7).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from t2i.errors import EvalError
from t2i.io import write_json, write_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", action="append", required=True, metavar="LABEL=PATH",
                   help="a checkpoint to evaluate (repeat); PATH as for t2i sample")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--raw", action="store_true", help="raw weights instead of the EMA")
    p.add_argument("--lora", action="append", default=[], metavar="LABEL=FILE",
                   help="apply a diffusers-format LoRA file (or folder) to the --ckpt of that label (repeat); "
                        "a LoRA run as --ckpt needs none")
    p.add_argument("--prompts", default=None, help="GenEval metadata .jsonl, a .txt (one prompt per line) or shards "
                                                   "(their captions); default: the shapes-domain GenEval set")
    p.add_argument("--no-geneval", action="store_true",
                   help="skip GenEval (FID/KID and CLIP score only); it is skipped anyway when the prompts carry "
                        "no GenEval tags")
    p.add_argument("--per-tag", type=int, default=16, help="shapes-domain set: prompts per tag")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("SIGMA_LO", "SIGMA_HI"),
                   help="CFG only while sigma_lo <= sigma <= sigma_hi, one conditional pass elsewhere (default: "
                        "sample.guidance_interval; [0, 1] guides every step)")
    p.add_argument("--shift", type=float, default=None)
    from t2i.cliargs import resolution_arg

    p.add_argument("--resolution", type=resolution_arg, default=None, metavar="N|WxH",
                   help="a square side or WIDTHxHEIGHT in pixels (e.g. 1216x832); default as for t2i sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--detector", default=None, help="shapes | mask2former:<folder> (default: shapes)")
    p.add_argument("--object-names", default=None)
    p.add_argument("--color", default=None, help="shapes | clip:<file>")
    p.add_argument("--fid-ref", default=None, help="reference statistics .npz (t2i fid ref), or built from "
                                                   "--fid-shards into <out>/fid_ref.npz")
    p.add_argument("--fid-shards", default=None, help="shards (or an image folder) for the reference statistics")
    p.add_argument("--fid-max", type=int, default=None, help="at most this many reference images")
    p.add_argument("--fid-extractor", default=None, help="random-conv | inception:<local .pt file> (default: "
                                                         "random-conv for --fid-shards, else the reference's)")
    p.add_argument("--allow-resolution-mismatch", action="store_true",
                   help="score FID against a reference made at another resolution than the samples")
    p.add_argument("--custom-tags", action="store_true",
                   help="accept prompt tags outside GenEval's six (reported separately, never in the overall)")
    p.add_argument("--clip", default=None, metavar="FILE", help="open_clip weights for the CLIP score")
    p.add_argument("--clip-model", default="ViT-L-14-quickgelu")


def _label_path(spec: str) -> tuple[str, str]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise EvalError(f"--ckpt must be LABEL=PATH, got {spec!r}")
    return label, path


def adapters_by_label(args) -> dict[str, str]:
    """--lora LABEL=FILE -> {label: file}, each label one of the --ckpt labels (checked before any sampling)."""
    labels = [_label_path(spec)[0] for spec in args.ckpt]
    out = {}
    for spec in args.lora:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise EvalError(f"--lora must be LABEL=FILE (LABEL one of the --ckpt labels), got {spec!r}")
        if label not in labels:
            raise EvalError(f"--lora {spec}: no --ckpt is labelled {label!r} (labels: {', '.join(labels)})")
        if label in out:
            raise EvalError(f"--lora: two adapters for {label!r}")
        out[label] = path
    return out


def _image_folder(spec: str) -> bool:
    """--fid-shards names a folder of image files (not shards) when it is a folder without .tar files."""
    return Path(spec).is_dir() and not any(Path(spec).glob("*.tar"))


def geneval_skipped(args, entries: list[dict], prompts: str) -> str | None:
    """Why GenEval is not run (None: it is): --no-geneval, or prompts without GenEval tags (a .txt list or
    shard captions). Refused before sampling when nothing else would be scored."""
    from t2i.eval.geneval import is_tagged

    if args.no_geneval:
        reason = "--no-geneval"
    elif not any(is_tagged(e) for e in entries):
        reason = (f"the prompts ({prompts}) carry no GenEval tags (a .txt list or shard captions; GenEval needs a "
                  f"metadata .jsonl, e.g. from `t2i geneval-prompts`)")
    else:
        return None
    if not (args.fid_ref or args.fid_shards or args.clip):
        raise EvalError(f"nothing to score: GenEval is skipped ({reason}) and no --fid-shards / --fid-ref or --clip "
                        f"is given; pass held-out shards with --fid-shards for FID/KID")
    return reason


def check_fid_arguments(args) -> None:
    """The FID flags on their own, before anything is sampled."""
    from t2i.eval import fid

    if args.fid_max is not None and args.fid_max < 1:
        raise EvalError(f"--fid-max must be >= 1, got {args.fid_max}")
    if args.fid_max is not None and not args.fid_shards:
        raise EvalError("--fid-max only applies when the reference is built from --fid-shards")
    if args.fid_shards and not _image_folder(args.fid_shards):  # a wrong pattern fails now, not after sampling
        from t2i.data.shards import expand_shards
        expand_shards(args.fid_shards, key="--fid-shards")
    if args.fid_ref and not args.fid_shards:
        meta = fid.load_reference(args.fid_ref).meta  # missing / unreadable: refused now
        if args.resolution is not None:
            fid.check_resolution(meta, args.resolution, f"--fid-ref {args.fid_ref}", args.allow_resolution_mismatch)


def fid_reference(args, out: Path, resolution, device, barrier, rank: int = 0) -> Path:
    """The FID reference to score against: --fid-ref as it is, or built from --fid-shards at `resolution`
    (an int side, or (width, height) / "WxH" for non-square samples).

    An existing reference whose recorded provenance (source, --fid-max, extractor, resolution) differs
    from the arguments is rebuilt when it is the default <out>/fid_ref.npz, and refused when the user
    named it with --fid-ref (it may be shared; it is never overwritten)."""
    from t2i.eval import fid
    from t2i.eval.features import build_extractor
    from t2i.eval.image_source import ImageSource

    ref = Path(args.fid_ref or out / "fid_ref.npz")
    if not args.fid_shards:
        return ref
    src = Path(args.fid_shards)
    is_folder = _image_folder(args.fid_shards)
    source = ImageSource(folder=str(src) if is_folder else None, shards=None if is_folder else args.fid_shards,
                         resolution=resolution, max_images=args.fid_max, key="--fid-shards")
    extractor = build_extractor(args.fid_extractor or "random-conv", device)
    build = not ref.exists()
    if not build:
        diffs = fid.reference_differences(fid.load_reference(ref).meta, fid.reference_provenance(source, extractor))
        if diffs and args.fid_ref:
            raise EvalError(f"--fid-ref {ref} was built from other inputs than --fid-shards/--fid-max/--fid-extractor "
                            f"and the sampling resolution ask for: {'; '.join(diffs)}. Pass a new --fid-ref path "
                            f"to build one there, or drop --fid-shards to score against {ref} as it is")
        if diffs:
            build = True
            if rank == 0:
                print(f"[eval] rebuilding {ref}: {'; '.join(diffs)}", flush=True)
    barrier()  # every rank has looked before any writes it (identical contents, atomic renames)
    if build:
        fid.make_reference(source, extractor, ref, device=device, progress=rank == 0)
    return ref


def grid(folders: dict[str, Path], out: Path, per_row: int = 8) -> Path | None:
    """Rows = checkpoints, columns = the first image of `per_row` prompts spread over the set; written
    atomically (None when no image can be read)."""
    import numpy as np
    import torch

    from t2i.eval import geneval
    from t2i.io import atomic_write
    from t2i.viz import save_grid

    images, labels = [], []
    for label, folder in folders.items():
        found = geneval.list_images(folder)
        keys = sorted(found)
        picks = [keys[round(i * (len(keys) - 1) / max(1, per_row - 1))] for i in range(min(per_row, len(keys)))]
        for k in picks:
            meta, files = found[k]
            if files:
                try:
                    arr = torch.from_numpy(np.array(geneval.load_image(files[0]))).float()
                except geneval.BadImage:
                    continue  # named by the GenEval step
                images.append(arr.permute(2, 0, 1) / 127.5 - 1)
                labels.append(f"{label}: {meta['prompt']}")
    if not images:
        return None

    def write(tmp: Path) -> None:
        png = tmp.with_name(tmp.name + ".png")  # PIL picks the format from the suffix
        try:
            save_grid(images, labels, png, cols=per_row)  # a list: sizes may differ
            os.replace(png, tmp)
        finally:
            png.unlink(missing_ok=True)

    return atomic_write(out, write)


def paired_geneval(folders: dict[str, Path]) -> dict:
    """Image-level accuracy with its 95 % Wilson interval per checkpoint, and McNemar's exact test for every
    pair of checkpoints on the images both scored. The pairing is exact: every checkpoint samples the same
    prompts from the same noise (image k of prompt p is seeded by (seed, p, k)), so only the discordant
    images carry the difference (t2i.eval.stats)."""
    from t2i.eval.geneval import read_results
    from t2i.eval.stats import mcnemar, wilson

    outcomes = {}
    for label, folder in folders.items():
        path = next((p for p in (Path(folder) / "geneval" / "results.jsonl", Path(folder) / "results.jsonl")
                     if p.exists()), None)  # geneval_folder.score writes <folder>/geneval/
        if path is not None:
            outcomes[label] = {"/".join(Path(r["filename"]).parts[-3:]): bool(r["correct"]) for r in read_results(path)}
    accuracy = {label: {"correct": sum(o.values()), "images": len(o), "ci95": wilson(sum(o.values()), len(o))}
                for label, o in outcomes.items()}
    labels, pairs = list(outcomes), []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            keys = sorted(outcomes[a].keys() & outcomes[b].keys())
            test = mcnemar([outcomes[a][k] for k in keys], [outcomes[b][k] for k in keys])
            pairs.append({"a": a, "b": b, **test})
    return {"accuracy": accuracy, "pairs": pairs}


def paired_markdown(paired: dict) -> list[str]:
    if not paired.get("accuracy"):
        return []
    lines = ["## Paired comparison", "",
             "Images judged correct (all tags pooled) with a 95 % Wilson interval, and McNemar's exact test on the "
             "images two checkpoints got differently (same prompts, same noise). A difference inside the intervals "
             "or with p ≥ 0.05 is not distinguishable from sampling noise at this number of images.", "",
             "| checkpoint | images correct | 95 % interval |", "|---|---:|---:|"]
    for label, a in paired["accuracy"].items():
        frac = a["correct"] / a["images"] if a["images"] else 0.0
        lines.append(f"| {label} | {a['correct']}/{a['images']} = {frac:.3f} | {a['ci95'][0]:.3f}–{a['ci95'][1]:.3f} |")
    if paired["pairs"]:
        lines += ["", "| A vs B | only A correct | only B correct | B − A | p (McNemar) |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {t['a']} vs {t['b']} | {t['a_only']} | {t['b_only']} | {t['diff']:+.3f} | {t['p']:.3g} |"
                  for t in paired["pairs"]]
    return ["", *lines]


def interval_note(settings: dict) -> str:
    """" for sigma in [lo, hi]" when guidance was limited to an interval, else ""."""
    lo, hi = settings.get("guidance_interval") or (0.0, 1.0)
    return "" if (lo, hi) == (0.0, 1.0) else f" for sigma in [{lo:g}, {hi:g}]"


def markdown(report: dict) -> str:
    from t2i.geneval_spec import TAGS

    rows = report["checkpoints"]
    tags = [t for t in TAGS if any(t in r.get("geneval", {}).get("tags", {}) for r in rows.values())]
    has_geneval = any("geneval" in r for r in rows.values())
    head = ["checkpoint", *["GenEval"] * has_geneval, *tags]
    has_fid = any("fid" in r for r in rows.values())
    has_clip = any("clipscore" in r for r in rows.values())
    head += ["FID", "KID"] * has_fid + ["CLIP score"] * has_clip
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for label, r in rows.items():
        g = r.get("geneval", {})
        overall = g.get("overall")
        cells = [label, *(["n/a" if overall is None else f"{overall:.4f}"] * has_geneval)]
        cells += [f"{g['tags'][t]['score']:.3f}" if t in g.get("tags", {}) else "" for t in tags]
        if has_fid:
            cells += [f"{r['fid']['fid']:.4f}", f"{r['fid']['kid']:.5f}"] if "fid" in r else ["", ""]
        if has_clip:
            cells += [f"{r['clipscore']['mean']:.3f}"] if "clipscore" in r else [""]
        lines.append("| " + " | ".join(cells) + " |")
    s = report["settings"]
    notes = [f"- sampling: {s['steps']} Euler steps on the {s.get('sigmas', 't2i')} sigma grid, "
             f"guidance {s['guidance']}{interval_note(s)}, shift {s['shift']}, "
             f"{s['images_per_prompt']} images per prompt, seed {s['seed']}, {s['resolution']} px, "
             f"{s['weights']} weights",
             f"- prompts: {s['prompts']} ({s['num_prompts']} prompts)",
             f"- GenEval: detector {s.get('detector')}, colours {s.get('color_classifier')}; overall = mean of "
             f"the tag scores" if has_geneval else f"- GenEval: {s.get('geneval', 'skipped')}"]
    for label, r in rows.items():
        custom = r.get("geneval", {}).get("custom_tags") or {}
        if custom:
            cells = ", ".join(f"{t} {v['score']:.3f} ({v['correct']}/{v['images']})"
                              for t, v in sorted(custom["tags"].items()))
            notes.append(f"- {label}: custom tags, NOT in the GenEval score: {cells}")
        skipped = r.get("geneval", {}).get("skipped_images") or []
        if skipped:
            notes.append(f"- {label}: {len(skipped)} unreadable or oversized images skipped by GenEval")
    if has_fid:
        notes.append(f"- FID/KID: extractor {s.get('fid_extractor')}, reference {s.get('fid_reference')}")
        for label, r in rows.items():
            for w in r.get("fid", {}).get("warnings", []):
                if w.startswith("resolution mismatch"):
                    notes.append(f"- {label}: {w}")
    if has_clip:
        notes.append(f"- CLIP score: {s.get('clip')} (100 x max(cos, 0))")
    return "\n".join(["# Evaluation", "", *lines, "", *notes, *paired_markdown(report.get("paired", {})), "",
                      "![samples](grid.png)", ""])


def main(args, cfg) -> int:
    import torch

    from t2i.checkpoint import loading
    from t2i.eval import geneval, geneval_folder, sample_folder
    from t2i.eval.image_source import as_resolution, size_record
    from t2i.eval.prompts import write_shapes_geneval
    from pipelines.sample import lora_lines, plan_for

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    check_fid_arguments(args)  # before any sampling: a wrong reference fails in seconds, not after hours
    adapters = adapters_by_label(args)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    barrier = (lambda: torch.distributed.barrier()) if world > 1 else (lambda: None)  # noqa: E731
    out = Path(args.out)
    prompts = args.prompts
    if prompts is None:
        prompts = str(out / "prompts" / "evaluation_metadata.jsonl")
        if rank == 0 and not Path(prompts).exists():
            write_shapes_geneval(out / "prompts", per_tag=args.per_tag)
        barrier()
    entries = geneval_folder.load_prompt_set(prompts, None, "--prompts")
    skip_geneval = geneval_skipped(args, entries, prompts)
    if skip_geneval is None:
        geneval.check_tags(entries, args.custom_tags)  # a misspelled tag fails before sampling, not after
        geneval.check_includes(entries)
    elif rank == 0:
        print(f"[eval] GenEval skipped: {skip_geneval}; scoring "
              + " and ".join(["FID/KID"] * bool(args.fid_ref or args.fid_shards) + ["CLIP score"] * bool(args.clip)),
              flush=True)
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")

    report: dict = {"checkpoints": {}, "settings": {}}
    folders, resolutions = {}, {}
    for spec in args.ckpt:
        label, path = _label_path(spec)
        t0 = time.time()
        loaded = loading.load_any(path, cfg, ema=not args.raw, device=device, lora=adapters.get(label))
        chosen = plan_for(loaded, args)
        if rank == 0:
            for line in chosen.describe() + lora_lines(loaded.lora):
                print(f"[eval] {label}: {line}", flush=True)
        kw = dict(images_per_prompt=args.images_per_prompt, steps=chosen.steps, guidance=chosen.guidance,
                  guidance_interval=list(chosen.guidance_interval), shift=chosen.shift,
                  resolution=chosen.resolution, sigmas=chosen.grid, seed=args.seed, batch_size=args.batch_size)
        folders[label] = out / label
        stats = sample_folder.run(loaded, entries, folders[label], prompts_source=prompts, plan=chosen,
                                  **{k: v for k, v in kw.items() if k != "sigmas"})
        loaded_kind = loaded.source.rsplit("(", 1)[1].rstrip(")")  # ema | raw | diffusers
        adapter = loaded.lora
        del loaded
        if world > 1:  # all ranks' images over the slowest rank's time
            parts = [None] * world
            torch.distributed.all_gather_object(parts, stats)
            stats = {"images": sum(p["images"] for p in parts), "skipped": sum(p["skipped"] for p in parts),
                     "seconds": max(p["seconds"] for p in parts), "ranks": world}
            stats["images_per_s"] = stats["images"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
        recorded = {**kw, **size_record(kw["resolution"])}  # resolution: an int, or "WxH"; width, height
        row = {"checkpoint": path, "weights": loaded_kind, "sampling": {**stats, "seconds": round(time.time() - t0, 2)},
               "settings": {**recorded, "model": chosen.model, "sources": chosen.sources}}
        if adapter:
            row["lora"] = adapter
        if skip_geneval is None:
            row["geneval"] = geneval_folder.score(folders[label], detector=args.detector, color=args.color,
                                                  object_names=args.object_names, device=device,
                                                  progress=rank == 0, custom_tags=args.custom_tags)
        resolutions[label] = kw["resolution"]
        if rank == 0:
            overall = row["geneval"]["overall"] if "geneval" in row else None
            score = "skipped" if skip_geneval else "n/a" if overall is None else f"{overall:.4f}"
            print(f"[eval] {label}: GenEval {score} ({stats['images']} new images, {stats['images_per_s']:.2f} "
                  f"img/s)", flush=True)
        report["checkpoints"][label] = row
        weights = sorted({r["weights"] for r in report["checkpoints"].values()})
        report["settings"] = {**recorded, "weights": "/".join(weights), "prompts": prompts,
                              "num_prompts": len(entries)}
        if skip_geneval is None:
            report["settings"].update(detector=row["geneval"].get("detector"),
                                      color_classifier=row["geneval"].get("color_classifier"))
        else:
            report["settings"]["geneval"] = f"skipped: {skip_geneval}"
    if args.fid_ref or args.fid_shards:  # every rank extracts its share of the features
        from t2i.eval import fid
        ref = fid_reference(args, out, as_resolution(report["settings"]["resolution"]), device, barrier, rank)
        meta = fid.load_reference(ref).meta
        for label, folder in folders.items():
            notes = fid.check_resolution(meta, resolutions[label], f"the FID reference {ref}",
                                         args.allow_resolution_mismatch)
            result = fid.score_folder(folder, ref, args.fid_extractor, device=device, progress=rank == 0)
            result["warnings"] = notes + result["warnings"]
            report["checkpoints"][label]["fid"] = result
        report["settings"].update(fid_extractor=report["checkpoints"][label]["fid"]["extractor"],
                                  fid_reference=f"{ref} ({report['checkpoints'][label]['fid']['n_reference']} images)",
                                  fid_reference_meta={k: meta.get(k) for k in ("source", "max_images", "resolution",
                                                                               "extractor", "n", "created")})
    if rank != 0:
        return 0
    if args.clip:
        from t2i.eval.clipscore import score_folder as clip_folder
        for label, folder in folders.items():
            report["checkpoints"][label]["clipscore"] = clip_folder(folder, args.clip_model, args.clip, device=device)
        report["settings"]["clip"] = f"{args.clip_model} ({args.clip})"

    if skip_geneval is None and len(folders) > 1:
        report["paired"] = paired_geneval(folders)
    if grid(folders, out / "grid.png") is None:
        print("[eval] no readable sample image: grid.png not written", flush=True)
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))
    print(markdown(report))
    print(f"[eval] report: {out / 'report.md'}")
    return 0
