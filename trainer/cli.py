"""`peftserve-train`: the command line. Its flags are TrainConfig's fields, with their help and defaults."""

import argparse
import logging
import sys
import types
import typing
import warnings

from tqdm import tqdm

from trainer.config import METHOD_ONLY_FIELDS, TrainConfig, make_config
from trainer.errors import TrainerError
from trainer.push import ADMIN_KEY_ENV

METAVARS = {"data": "FILE", "val_file": "FILE", "out": "DIR", "base": "MODEL", "push": "URL", "name": "NAME"}

GROUPS: dict[str, tuple[str, ...]] = {
    "data and output": (
        "data",
        "method",
        "out",
        "base",
        "overwrite",
        "val_file",
        "val_fraction",
        "max_length",
    ),
    "training loop": (
        "epochs",
        "max_steps",
        "batch_size",
        "grad_accum",
        "lr",
        "weight_decay",
        "warmup_fraction",
        "max_grad_norm",
        "eval_every",
        "patience",
        "gradient_checkpointing",
        "precision",
        "seed",
    ),
    "method hyperparameters": tuple(METHOD_ONLY_FIELDS),
    "publishing": ("push", "name"),
}

EPILOG = f"""\
exit status: 0 done; 1 failed (e.g. --push refused); 2 bad flags or bad data (nothing written);
130 stopped by Ctrl-C (the best adapter so far is written; a second Ctrl-C aborts without writing).
environment: {ADMIN_KEY_ENV} is sent as the bearer token of --push; PEFTSERVE_CACHE holds the
dequantized GGUF base, shared with the server (default ~/.cache/peftserve).
example: peftserve-train --data trainer/examples/uppercase.jsonl --method lora --out adapters_store/up"""


def comma_list(text: str) -> list[str]:
    """`a,b , c` -> ["a", "b", "c"]."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return items


def _flag_options(name: str) -> dict:
    """argparse options for one TrainConfig field: type or choices, help with the default, required."""
    info = TrainConfig.model_fields[name]
    annotation = info.annotation
    if isinstance(annotation, types.UnionType):  # X | None -> X
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    options: dict = {"help": info.description, "default": argparse.SUPPRESS}
    if annotation is bool:
        options["action"] = "store_true"
    elif typing.get_origin(annotation) is typing.Literal:
        options["choices"] = typing.get_args(annotation)
    elif typing.get_origin(annotation) is list:
        options["type"], options["metavar"] = comma_list, "A,B"
    else:
        options["type"] = annotation
        options["metavar"] = METAVARS.get(name, {int: "N", float: "X"}.get(annotation))
    if info.is_required():
        options["required"] = True
    elif info.default is not None and info.default is not False:
        options["help"] += f" (default: {info.default})"
    return options


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one flag per TrainConfig field, grouped for --help."""
    parser = argparse.ArgumentParser(
        prog="peftserve-train",
        description="Train a LoRA, QLoRA, DoRA, IA3, prompt, P-tuning, prefix, bottleneck, BitFit or "
        "LN-tuning adapter from a JSONL file and write it in peftserve's on-disk adapter format.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for title, names in GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            group.add_argument("--" + name.replace("_", "-"), dest=name, **_flag_options(name))
    return parser


class TqdmHandler(logging.Handler):
    """Log lines that do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging() -> None:
    """Timestamped INFO lines from the trainer; libraries only say something when it is an error."""
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("trainer").setLevel(logging.INFO)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `peftserve-train`; returns the exit status."""
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = make_config(**vars(args))
        # torch, transformers and peft load only once the flags are known to be valid
        from trainer.run import run

        outcome = run(cfg)
    except TrainerError as exc:
        print(f"peftserve-train: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("peftserve-train: aborted, nothing written", file=sys.stderr)
        return 130
    result = outcome.result
    print(
        f"{outcome.folder}: {cfg.method} adapter, {result.steps} steps ({result.stopped}), "
        f"final train loss {result.final_train_loss:.4f}"
        + (f", best eval loss {result.best_eval_loss:.4f}" if result.best_eval_loss is not None else "")
    )
    if outcome.pushed is not None:
        print(f"pushed to {cfg.push}: {outcome.pushed}")
    return 130 if result.stopped == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
