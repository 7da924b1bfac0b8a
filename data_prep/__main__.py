"""Command line: ``python -m data_prep <dataset> --root PATH --out manifest.csv [options]``.

``python -m data_prep <dataset> --help`` lists the files the dataset needs, where to
get them, and what each option sets.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Dict, Optional, Sequence

from data_prep import chexpert, common, covidx, folder_csv, iu_xray, mimic_cxr, rsna, siim
from msd_core.cli import terminal_text
from msd_core.manifest import ManifestError

logger = logging.getLogger("data_prep")

# Arguments every dataset shares; the rest of the namespace goes to build_manifest.
SHARED_ARGUMENTS = ("dataset", "root", "out", "verbose", "download", "build")


def _add_split_options(parser: argparse.ArgumentParser, fractions: Sequence[float]) -> None:
    parser.add_argument(
        "--fractions",
        type=float,
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        default=tuple(fractions),
        help=f"shares of patients per split, summing to 1 (default: {' '.join(map(str, fractions))})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split (default: 0)")


def _add_missing_images(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--missing-images",
        choices=common.MISSING_IMAGES,
        default=default,
        help=f"rows whose image file is missing: skip and count them, stop with an error, or keep them "
        f"unchecked (default: {default})",
    )


def _add_on_empty(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--on-empty",
        choices=common.ON_EMPTY,
        default="drop",
        help="rows whose report text is empty: drop and count them, or stop with an error (default: drop)",
    )


def _iu_xray(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--download",
        action="store_true",
        help="download both archives into MSD_DATA_DIR/iu_xray first and use that folder as --root",
    )
    parser.add_argument(
        "--reports",
        help="report archive (.tgz) or folder of XML files (default: ROOT/NLMCXR_reports.tgz)",
    )
    parser.add_argument("--images-dir", help="folder searched for <image id>.png (default: ROOT/NLMCXR_png)")
    parser.add_argument(
        "--metadata",
        help="view-position table (default: ROOT/nlmcxr_dicom_metadata.csv.gz if present)",
    )
    parser.add_argument(
        "--unknown-view",
        choices=iu_xray.UNKNOWN_VIEW_POLICIES,
        default="first",
        help="images without a view position: the first listed image is frontal, all are frontal, "
        "or none is (default: first)",
    )
    parser.add_argument(
        "--frontal-per-study",
        choices=iu_xray.FRONTAL_PER_STUDY,
        default="first",
        help="keep the first frontal image of each study, or all of them (default: first)",
    )
    parser.add_argument(
        "--use-automatic-mesh",
        action="store_true",
        help="also set labels from the automatic MeSH terms",
    )
    _add_missing_images(parser, "skip")
    _add_on_empty(parser)
    _add_split_options(parser, (0.8, 0.1, 0.1))


def _mimic_cxr(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reports-root", help="folder whose files/ contains the s<study>.txt reports (default: ROOT)")
    parser.add_argument("--views", nargs="+", default=["PA", "AP"], help="ViewPosition values to keep (default: PA AP)")
    parser.add_argument(
        "--uncertain",
        choices=common.UNCERTAIN_POLICIES,
        default="zeros",
        help="uncertain (-1) labels become 0, 1, or stay -1 (ignore) (default: zeros)",
    )
    parser.add_argument(
        "--fallback",
        choices=mimic_cxr.FALLBACKS,
        default="last_paragraph",
        help="reports without FINDINGS and IMPRESSION: use the last paragraph, or drop them (default: last_paragraph)",
    )
    _add_on_empty(parser)
    _add_missing_images(parser, "skip")


def _chexpert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--labels",
        help="label table (default: ROOT/CheXpert-v1.0-small/train.csv and other known names)",
    )
    parser.add_argument("--per-class", type=int, default=200, help="images per class (default: 200)")
    parser.add_argument(
        "--uncertain",
        choices=common.UNCERTAIN_POLICIES,
        default="zeros",
        help="uncertain (-1) labels count as negative, positive, or make the row ineligible (default: zeros)",
    )
    parser.add_argument("--selection", help="split file written earlier; reuse its rows instead of sampling")
    parser.add_argument(
        "--split-file",
        help="where to write the split file (default: OUT folder/chexpert_5x200_split.csv)",
    )
    _add_missing_images(parser, "error")
    _add_split_options(parser, (0.8, 0.1, 0.1))


def _rsna(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", help="stage_2_train_labels.csv or its .zip (default: found under ROOT)")
    parser.add_argument("--images-dir", help="folder of <patientId>.dcm (default: ROOT/stage_2_train_images)")
    _add_missing_images(parser, "skip")
    _add_split_options(parser, (0.7, 0.15, 0.15))


def _siim(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", help="train-rle.csv or .csv.gz (default: found under ROOT)")
    parser.add_argument("--images-dir", help="folder searched for <ImageId>.dcm (default: ROOT/dicom-images-train)")
    parser.add_argument(
        "--patient-ids",
        choices=siim.PATIENT_ID_SOURCES,
        default="image",
        help="patient id from the ImageId or from each DICOM header (default: image)",
    )
    _add_missing_images(parser, "skip")
    _add_split_options(parser, (0.7, 0.15, 0.15))


def _covidx(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-list", help="train list (default: ROOT/train.txt)")
    parser.add_argument("--test-list", help="test list (default: ROOT/test.txt)")
    parser.add_argument("--val-list", help="val list (default: ROOT/val.txt if present, else val is carved from train)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of train patients moved to val when there is no val list (default: 0.1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the val carve-out (default: 0)")
    _add_missing_images(parser, "skip")


def _folder_csv(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", help="the CSV, relative to ROOT or absolute (default: the only .csv in ROOT)")
    parser.add_argument("--image-column", default="image", help="column of image paths (default: image)")
    parser.add_argument(
        "--text-column",
        dest="text_columns",
        action="append",
        help="text column; repeat to join several in order (default: text)",
    )
    parser.add_argument("--text-separator", default=" ", help="string between joined text columns (default: one space)")
    parser.add_argument("--patient-column", help="column of patient ids (default: each image is its own patient)")
    parser.add_argument("--study-column", help="column of study ids (default: the image path)")

    parser.add_argument(
        "--label-column",
        dest="label_columns",
        action="append",
        default=[],
        help="label column copied as it is; repeatable",
    )
    parser.add_argument("--multilabel-column", help="column of separated findings, kept and one-hot encoded")
    parser.add_argument(
        "--multilabel-separator",
        default=", ",
        help="separator inside --multilabel-column (default: ', ')",
    )
    parser.add_argument(
        "--keep-column",
        dest="keep_columns",
        action="append",
        default=[],
        help="other column copied as it is; repeatable",
    )

    parser.add_argument("--images-dir", help="folder that relative image paths start from (default: ROOT)")
    parser.add_argument(
        "--images",
        choices=common.IMAGE_PLACEMENT,
        default="symlink",
        help="put images next to the manifest as symlinks or copies, or write relative paths that may "
        "leave its folder (default: symlink)",
    )

    _add_on_empty(parser)
    _add_missing_images(parser, "skip")
    _add_split_options(parser, (0.8, 0.1, 0.1))


# CLI name -> (module, function adding its options).
DATASETS: Dict[str, tuple] = {
    "iu_xray": (iu_xray, _iu_xray),
    "mimic_cxr": (mimic_cxr, _mimic_cxr),
    "chexpert_5x200": (chexpert, _chexpert),
    "rsna": (rsna, _rsna),
    "siim": (siim, _siim),
    "covidx": (covidx, _covidx),
    "folder_csv": (folder_csv, _folder_csv),
}


def build_parser() -> argparse.ArgumentParser:
    """Return the parser with one subcommand per dataset."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Turn a dataset into a manifest CSV (image_path, text, split, study_id, patient_id, labels).",
    )
    subparsers = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name, (module, add_options) in DATASETS.items():
        description = terminal_text(module.__doc__)
        summary = description.strip().splitlines()[0]
        sub = subparsers.add_parser(
            name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sub.add_argument("--root", help="the dataset folder")
        sub.add_argument("--out", required=True, help="path of the manifest CSV to write")
        sub.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
        add_options(sub)
        sub.set_defaults(build=module.build_manifest)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv``, build the manifest and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")

    root = args.root
    if args.dataset == "iu_xray" and args.download:
        root = str(iu_xray.download())
    if root is None:
        parser.error(f"{args.dataset}: --root is required")

    options = {k: v for k, v in vars(args).items() if k not in SHARED_ARGUMENTS}
    if "fractions" in options:
        options["fractions"] = tuple(options["fractions"])
    if args.dataset == "folder_csv" and not options["text_columns"]:
        options["text_columns"] = ["text"]

    build: Callable = args.build
    try:
        manifest = build(root, args.out, **options)
    except (FileNotFoundError, common.DataPrepError, ManifestError, ValueError) as error:
        logger.error("%s", error)
        return 1

    logger.info("done: %d rows in %s", len(manifest), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
