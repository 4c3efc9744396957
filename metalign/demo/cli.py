"""Demo world commands: each writes one part of the demo world in the real datasets' file formats."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metalign.demo import effect, fmri, labelled, learning, planted, world
from metalign.io import write_csv


def cmd_demo_world(args: argparse.Namespace) -> None:
    summary = world.generate_world(Path(args.out), json.loads(args.spec))
    print(f"demo world in {args.out}: {summary['things']['n_images']} THINGS images, "
          f"{summary['things']['n_triplets']} triplets (expected accuracy {summary['expected_accuracy']:.3f}), "
          f"{summary['coco']['n_train']}+{summary['coco']['n_val']} COCO images")


def cmd_demo_vit(args: argparse.Namespace) -> None:
    from metalign.demo.models import save_tiny_vit  # torch and transformers only for this job

    save_tiny_vit(args.out, image_size=args.image_size, patch_size=args.patch_size,
                  hidden_size=args.hidden_size, layers=args.layers, heads=args.heads, seed=args.seed)


def cmd_demo_behaviour(args: argparse.Namespace) -> None:
    truth = learning.generate_behaviour(args.world, args.out, json.loads(args.spec))
    print(f"demo behaviour in {args.out}: Levels ideal-observer accuracy {truth['levels']['expected_accuracy']}")


def cmd_demo_fmri(args: argparse.Namespace) -> None:
    summary = fmri.generate(args.world, args.out, json.loads(args.spec))
    print(f"demo fMRI in {args.out}: {len(summary['things_fmri'])} THINGS-fMRI and {len(summary['bold5000'])} "
          "BOLD5000 subjects")


def cmd_demo_labelled(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.world).read_text())["spec"]
    summary = labelled.generate_labelled(Path(args.out), json.loads(args.spec), int(spec["image_size"]))
    print(f"labelled demo sets in {args.out}: " + ", ".join(f"{k} {v}" for k, v in summary["counts"].items()))


def cmd_demo_planted(args: argparse.Namespace) -> None:
    summary = planted.generate(args.world, args.labelled, args.out, json.loads(args.spec))
    expected = summary["expected"]
    print(f"planted backbone table in {args.out}: {summary['n_images']} images, dims {summary['dims']}; zero-shot "
          f"THINGS accuracy of the features {expected['zero_shot_features']:.3f}, of their factor part "
          f"{expected['zero_shot_factors']:.3f}")


def cmd_demo_effect(args: argparse.Namespace) -> None:
    table = effect.effect_table(args.results, args.backbone, args.planted, args.controls, args.level, args.shots,
                                args.seeds)
    write_csv(args.out, table)
    failed = table[table["verdict"] != "pass"]
    print(f"planted effect on {args.backbone}: {len(table) - len(failed)} of {len(table)} checks pass"
          + "".join(f"\n  FAIL {r.family} {r.metric} {r.variant}: gain {r.gain:+.3f}, margin {r.margin:.3f}, "
                    f"expected {r.expected}" for r in failed.itertuples()))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo-world", help="generate the seeded demo world (THINGS + COCO formats)",
                                   description=world.__doc__)
    parser.add_argument("--spec", required=True, help="the world spec as JSON (config `demo.world`)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (empty, or a previous demo world)")
    parser.set_defaults(func=cmd_demo_world)

    parser = subparsers.add_parser("demo-vit", help="save the demo's random-init ViT in Hugging Face format")
    parser.add_argument("--out", required=True, help="model folder (config.json + weights)")
    parser.add_argument("--image-size", type=int, default=64, help="input side in pixels")
    parser.add_argument("--patch-size", type=int, default=8, help="patch side in pixels")
    parser.add_argument("--hidden-size", type=int, default=64, help="token width")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads per block")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.set_defaults(func=cmd_demo_vit)

    parser = subparsers.add_parser("demo-behaviour", help="simulated Levels, category and reward learning data",
                                   description=learning.__doc__)
    parser.add_argument("--world", required=True, type=Path, help="demo world folder (from demo-world)")
    parser.add_argument("--spec", required=True, help="the behaviour spec as JSON (config `demo.behaviour`)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.set_defaults(func=cmd_demo_behaviour)

    parser = subparsers.add_parser("demo-fmri", help="simulate fMRI subjects on the demo world (THINGS-fMRI and "
                                   "BOLD5000 file formats)", description=fmri.__doc__)
    parser.add_argument("--world", required=True, type=Path, help="the demo world folder (demo-world --out)")
    parser.add_argument("--spec", required=True, help="the fMRI spec as JSON (config `demo.fmri`)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.set_defaults(func=cmd_demo_fmri)

    parser = subparsers.add_parser("demo-labelled", help="labelled demo image sets in real downstream layouts",
                                   description=labelled.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, help="the demo world's world.json (its image size is reused)")
    parser.add_argument("--spec", required=True, help="JSON spec (config `demo.labelled`)")
    parser.add_argument("--out", required=True, help="output folder (empty, or a previous labelled demo)")
    parser.set_defaults(func=cmd_demo_labelled)

    parser = subparsers.add_parser("demo-planted", help="the planted backbone's feature table (factors under nuisance)",
                                   description=planted.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, type=Path, help="the demo world folder (demo-world --out)")
    parser.add_argument("--labelled", type=Path, help="the labelled demo sets' folder (demo-labelled --out), if any")
    parser.add_argument("--spec", required=True, help="JSON spec (config `demo.planted`)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.set_defaults(func=cmd_demo_planted)

    parser = subparsers.add_parser("demo-effect", help="the planted effect table: meta − base with noise margins",
                                   description=effect.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, type=Path, help="the results root of the demo run")
    parser.add_argument("--backbone", required=True, help="the planted backbone")
    parser.add_argument("--planted", required=True, help="the variant trained on the planted functions")
    parser.add_argument("--controls", nargs="+", required=True, help="the control variants (no gain expected)")
    parser.add_argument("--level", type=float, default=0.99, help="two-sided level of the margins")
    parser.add_argument("--shots", type=int, default=5, help="few-shot column compared")
    parser.add_argument("--seeds", type=int, required=True, help="few-shot seeds behind each mean (config "
                        "`downstream.fewshot.seeds`): the margin's standard error")
    parser.add_argument("--out", required=True, type=Path)
    parser.set_defaults(func=cmd_demo_effect)
