"""The `diffrl` command.

    diffrl train RECIPE [key=value ...]            run on a local Ray cluster (127.0.0.1), started and stopped here
    diffrl train RECIPE --address HEAD:6379        run on an existing Ray cluster (ray.address; docs/MULTINODE.md)
    diffrl submit RECIPE [key=value ...] --address http://HEAD:8265 [--follow]   run as a Ray job on a cluster
    diffrl resume RUN_DIR [key=value ...]          continue from the run's latest checkpoint, exactly
    diffrl eval CKPT --data FILE [--k N] [--decoding static|dynamic] [--reward auto|recipe|builtin]
                                                   accuracy of a checkpoint on a data file, scored by reward functions
    diffrl eval CKPT --baseline OTHER --data FILE  paired before/after: flips, exact McNemar p, bootstrap CI
    diffrl status [RUNS_DIR]                       runs under runs/: state, step, last metrics

Bad input (recipe, data, checkpoint, reward) ends with one line `diffrl: error: ...` naming the field or file and
exit status 2; a failed run exits 1 (a node lost mid-run: one line `diffrl: error: node lost: ...` all the same).
Heavy modules (torch, Ray) are imported only by the command that needs them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Sequence

EXIT_BAD_INPUT = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "bad input": reported as one line, no traceback."""
    from launch.data import DataError
    from launch.eval_stats import ItemSetMismatch
    from launch.preflight import PreflightError
    from launch.recipe import RecipeError
    from launch.submit import SubmitError
    from rl.checkpoint import CheckpointError
    from rl.store import StoreError

    # FileExistsError: an output directory that would be overwritten (sft, eval) is refused, never clobbered.
    errors: list[type[BaseException]] = [RecipeError, DataError, CheckpointError, StoreError, SubmitError,
                                         PreflightError, FileExistsError, ItemSetMismatch]
    from rollout.models.spec import ModelLoadError

    errors.append(ModelLoadError)
    try:
        from rewards.result import RewardConfigError
    except ImportError:  # the rewards package is optional for `status`
        pass
    else:
        errors.append(RewardConfigError)
    from launch.driver_setup import SetupError

    errors.append(SetupError)
    return tuple(errors)


def _unwrap(err: BaseException) -> BaseException:
    """The user error inside a Ray task error (raised in an actor), else err itself."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


# ------------------------------------------------------------------------------------------------- commands
def _with_address(args: argparse.Namespace) -> list[str]:
    """The overrides, with --address as ray.address (join that cluster instead of starting a local one); the
    recipe's sizing of a local cluster (ray.num_cpus, ray.object_store_mb) does not apply to it."""
    if not args.address:
        return list(args.overrides)
    return [*args.overrides, f"ray.address={args.address}", "ray.num_cpus=null", "ray.object_store_mb=null"]


def cmd_train(args: argparse.Namespace) -> int:
    from launch.recipe import load_recipe

    recipe = load_recipe(args.recipe, _with_address(args))  # before importing torch/Ray: a bad recipe fails at once
    from launch.driver import run_training

    result = run_training(recipe, progress=not args.quiet, recipe_dir=Path(args.recipe).resolve().parent,
                          verbose=args.verbose)
    if result.ok:
        from launch.metrics import closing_summary

        print(closing_summary(result.run_dir), flush=True)
    return 0 if result.ok else 1


def cmd_resume(args: argparse.Namespace) -> int:
    from launch.driver import run_training
    from launch.recipe import load_recipe
    from rl.checkpoint import load_checkpoint

    run_dir = Path(args.run_dir)
    ckpt = load_checkpoint(run_dir)
    overrides = [f"output_dir={run_dir}", *_with_address(args)]
    recipe = load_recipe(ckpt.path / "recipe.yaml", overrides)
    result = run_training(recipe, resume=ckpt, progress=not args.quiet, verbose=args.verbose)
    if result.ok:
        from launch.metrics import closing_summary

        print(closing_summary(result.run_dir), flush=True)
    return 0 if result.ok else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from launch.recipe import check_paths, load_recipe
    from launch.preflight import check_run_inputs
    from launch.submit import outside_project, submit, working_directory

    project = Path(args.working_dir or Path.cwd()).resolve()  # uploaded as the job's working directory
    recipe_file = Path(args.recipe).resolve()
    with working_directory(project):  # overrides' relative paths are read from the project, as on the cluster
        recipe = load_recipe(recipe_file, args.overrides)  # fail here, not on the cluster
        check_paths(recipe)
        check_run_inputs(recipe)  # checkpoint and data files whole and parseable, before anything is uploaded
    for where in outside_project(recipe, project):
        print(f"note: {where} is outside the project: the cluster must see it at that path", file=sys.stderr)
    if not Path(recipe.output_dir).is_absolute():
        print(f"note: output_dir {recipe.output_dir!r} is relative: the run's files stay in the job's working "
              "directory on the head node; set output_dir=/shared/path to keep them", file=sys.stderr)
    job_id, status = submit(recipe_file, args.overrides, address=args.address, follow=args.follow,
                            wait=args.wait, timeout_s=args.timeout, working_dir=project)
    print(job_id)
    return 1 if status in ("FAILED", "STOPPED") else 0


def cmd_eval(args: argparse.Namespace) -> int:
    """A seam over the evaluation harness (launch/evaluate.py): resolve CKPT, build the typed EvalRun from the
    checkpoint's own recipe when there is one (its rollout, model, data and reward sections) and the flags, hand over."""
    policy_dir = policy_dir_of(Path(args.checkpoint))
    run = eval_run(args, _recipe_of(policy_dir), policy_dir)
    if args.baseline is not None:  # the same items, decoding and seeds for both: a paired comparison
        from launch.evaluate_paired import run_paired_eval

        baseline_dir = policy_dir_of(Path(args.baseline))
        run_paired_eval(str(policy_dir), str(baseline_dir), run, progress=not args.quiet)
        return 0
    from launch.evaluate import run_eval

    run_eval(str(policy_dir), run, progress=not args.quiet)
    return 0


_DECODING = {"static": "low_confidence_static", "dynamic": "low_confidence_dynamic"}


def eval_run(args: argparse.Namespace, trained: dict | None, policy_dir: Path):
    """The EvalRun of `diffrl eval`: the trained recipe's rollout / model / data / reward sections (EvalRun.
    from_recipe), then the flags given. Decoding: --decoding, else the recipe's remasking, else static;
    temperature: --temperature, else greedy for k = 1 and the recipe's (else 1.0) for k > 1; budget: --max-tokens,
    else the recipe's, else each dataset's; toy tasks: the held-out split of the task trained on."""
    from launch.evaluate import EvalRun

    own = is_own_data(trained, args.data)
    data = (trained or {}).get("data") or {}
    run = EvalRun.from_recipe(trained or {}, [args.data])
    rollout: dict = {"temperature": args.temperature if args.temperature is not None else (
        0.0 if args.k == 1 else run.rollout.temperature or 1.0)}
    if args.decoding is not None or "remasking" not in run.rollout.model_fields_set:
        rollout["remasking"] = _DECODING[args.decoding or "static"]
    own_fields = own and not data.get("task")
    changes: dict = {
        "rollout": run.rollout.model_copy(update=rollout), "n": args.k, "k": args.k, "limit": args.limit,
        "seed": args.seed, "out": args.out, "chat_template": False if args.no_chat_template else run.chat_template,
        "format": args.format or "prompt", "overlap": args.overlap,
        "max_tokens": args.max_tokens or run.max_tokens,
        "prompt_field": args.prompt_field or (data.get("prompt_field") if own_fields else None),
        "answer_field": args.answer_field or (data.get("answer_field") if own_fields else None)}
    if data.get("task") and data.get("task") == args.data:  # the held-out split of the task trained on
        task_seed = data.get("task_seed")  # data.task_seed, else the run's seed (launch.data.task_seed_of)
        changes.update(task_kwargs=data.get("task_kwargs") or {},
                       task_seed=int((trained or {}).get("seed", 0) if task_seed is None else task_seed))
    reward = eval_rewards(trained, args.reward, own)
    changes.update(reward=reward, reward_base_dir=str(policy_dir.parent) if reward is not None else None)
    return EvalRun.model_validate({**run.model_dump(), **changes})


def is_own_data(trained: dict | None, data: str) -> bool:
    """Whether `--data` is what the run trained on: its toy task's name, or its train / eval file."""
    section = (trained or {}).get("data") or {}
    if section.get("task"):
        return data == section["task"]
    files = {Path(f).resolve() for f in (section.get("train"), section.get("eval")) if f}
    return Path(data).resolve() in files


def eval_rewards(trained: dict | None, choice: str, own_data: bool) -> list[dict] | None:
    """The reward specs `diffrl eval` scores with: the run's own `reward` section (custom rewards included) for
    the run's own data or with `--reward recipe`; None (each item's built-in reward) for other data, for a
    checkpoint without a recipe, or with `--reward builtin`."""
    from launch.recipe import RecipeError

    if choice == "builtin":
        return None
    specs = (trained or {}).get("reward")
    if choice == "recipe" and not specs:
        raise RecipeError("--reward recipe: the checkpoint has no recipe with a reward section (a bare policy "
                          "directory); use --reward builtin")
    if choice == "recipe" or (choice == "auto" and own_data and specs):
        return [{key: spec[key] for key in ("fn", "weight", "kwargs") if key in spec} for spec in specs]
    return None


def cmd_sft(args: argparse.Namespace) -> int:
    """Supervised fine-tuning to a starting checkpoint (launch/sft.py); prints its summary line."""
    from launch.sft import run_sft

    summary = run_sft(sft_run(args), progress=not args.quiet)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}))
    return 0


def sft_run(args: argparse.Namespace):
    """The SFTRun of `diffrl sft`: with --recipe, that recipe's model and data sections (and seed), overridden by
    the flags given; without, a tiny model (--tiny, --hidden-size, ...) on --data or the toy --task."""
    from launch.recipe import load_recipe
    from launch.sft import SFTRun
    from rl.sft import SFTConfig

    training = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup_steps}
    size = {"hidden_size": args.hidden_size, "num_layers": args.num_layers, "num_heads": args.num_heads,
            "num_kv_heads": args.num_kv_heads, "intermediate_size": args.intermediate_size}
    run = SFTRun.from_recipe(load_recipe(args.recipe, args.overrides), args.out) if args.recipe else SFTRun(
        out=args.out, model={"tiny": _TINY[args.tiny or "block"]}, data={"task": args.task or "arithmetic"})
    model, data = run.model.model_dump(exclude_unset=False), run.data.model_dump()
    if args.model is not None:
        model.update(path=args.model, tiny=None, tiny_vocab=None)
    elif args.tiny is not None:
        model.update(path=None, tiny=_TINY[args.tiny])
    if args.block_size is not None:
        model["block_size"] = args.block_size
    model["trust_remote_code"] = model["trust_remote_code"] or args.trust_remote_code
    if args.data is not None:
        data.update(train=args.data, task=None, task_kwargs={})
    elif args.task is not None:
        data.update(task=args.task, train=None)
    if args.heldout_data is not None:
        data["eval"] = args.heldout_data
    for key in ("prompt_field", "answer_field"):
        data[key] = getattr(args, key) or data[key]
    seed = args.seed if args.seed is not None else run.training.seed
    return SFTRun.model_validate({
        **run.model_dump(), "model": model, "data": data, "tiny_size": size, "eval_items": args.eval_items,
        "eval_decoding": args.eval_decoding, "overwrite": args.overwrite,
        "training": SFTConfig(**{**{k: v for k, v in training.items() if v is not None}, "seed": seed})})


# `diffrl sft --tiny` kinds: every recipe model.tiny but diffusion-gemma (no SFT layout for its canvas decoder).
_TINY = {"block": "qwen3-block", "sdar": "sdar", "sdar-moe": "sdar-moe", "llada": "llada", "dream": "dream",
         "llada2": "llada2"}


def policy_dir_of(path: Path) -> Path:
    """A run dir (its latest checkpoint), a checkpoint dir, or an HF policy directory -> the policy directory."""
    from rl.checkpoint import resolve_checkpoint

    if (path / "config.json").is_file():
        return path
    return resolve_checkpoint(path) / "policy"


def _recipe_of(policy_dir: Path) -> dict | None:
    """The recipe saved beside a checkpoint's policy directory, as a plain mapping (None for a bare HF dir)."""
    import yaml

    path = policy_dir.parent / "recipe.yaml"
    return yaml.safe_load(path.read_text()) if policy_dir.name == "policy" and path.is_file() else None


def cmd_status(args: argparse.Namespace) -> int:
    from launch.metrics import read_metrics, summary_line
    from rollout.errors import one_line

    root = Path(args.runs_dir)
    runs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "recipe.yaml").is_file()) if root.is_dir() else []
    if not runs:
        print(f"no runs under {root}")
        return 0
    for run in runs:
        info = {}
        if (run / "run.json").is_file():
            info = json.loads((run / "run.json").read_text())
        rows = read_metrics(run / "metrics.jsonl")
        last = rows[-1] if rows else {}
        latest = run / "checkpoints" / "latest"
        ckpt = latest.read_text().strip() if latest.is_file() else "-"
        state = info.get("status", "?")
        if state == "running" and info.get("host") == socket.gethostname() and not _alive(info.get("pid")):
            state = f"died (process {info.get('pid')} is gone; `diffrl resume {run}` continues it)"
        elif state == "running" and time.time() - float(info.get("updated", 0) or 0) > 3600:
            state = "running? (no update for over an hour)"
        total = info.get("total_steps", "?")
        print(f"{run.name}: {state}; step {last.get('step', 0)}/{total}; checkpoint {ckpt}")
        if last:
            print("  " + summary_line(int(last.get("step", 0)), total, last))
        if info.get("stop_reason") and state == "finished":
            print(f"  stopped: {info['stop_reason']}")
        if info.get("error"):  # one line, escape codes stripped (older runs stored Ray's coloured tracebacks)
            print(f"  error: {one_line(info['error'], 300)}")
    return 0


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# --------------------------------------------------------------------------------------------------- parser
ADDRESS_HELP = ("join the Ray cluster at HEAD:PORT (the GCS address `ray start --head` prints) instead of starting "
                "a local one: ray.address=HEAD:PORT, the recipe's ray.num_cpus / ray.object_store_mb dropped")
VERBOSE_HELP = "debug logging, and the output of Ray, DeepSpeed and transformers (hidden by default)"
# Set (unless the user set them) when --verbose is not given: inherited by the local Ray cluster's processes.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "RAY_DEDUP_LOGS": "1", "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}


def quiet_environment(verbose: bool, quiet: bool) -> None:
    """Library chatter off unless --verbose; with -q every tqdm bar off too (TQDM_DISABLE)."""
    if not verbose:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    if quiet and not verbose:
        os.environ.setdefault("TQDM_DISABLE", "1")


def build_parser() -> argparse.ArgumentParser:
    from launch.evaluate_data import FORMATS  # light: the standard library only at import

    parser = argparse.ArgumentParser(prog="diffrl", description="RL post-training of diffusion language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe on a local Ray cluster (127.0.0.1)")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.total_steps=10")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("submit", help="run a recipe as a Ray job on a cluster")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://head:8265")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument("--wait", action="store_true", help="wait for the job to end (without streaming logs)")
    p.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    p.add_argument("--working-dir", default=None, help="the project uploaded as the job's working directory "
                   "(default: the current directory); the recipe must be inside it")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("resume", help="continue a run from its latest checkpoint")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="e.g. trainer.total_steps=20 to train further")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--address", default=None, help=ADDRESS_HELP + "; a resumed run joins the cluster its recipe "
                   "names unless given")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("eval", help="evaluate a checkpoint (or HF policy directory) on a data file")
    p.add_argument("checkpoint", help="a run dir, a checkpoint dir or a policy directory")
    p.add_argument("--data", required=True, help=".jsonl / .json / .parquet file (or a toy task name)")
    p.add_argument("--k", type=int, default=1, help="samples per prompt (pass@k and mean accuracy)")
    p.add_argument("--decoding", choices=("static", "dynamic"), default=None,
                   help="default: the run recipe's remasking, else static")
    p.add_argument("--max-tokens", type=int, default=None, help="response budget (default: the harness default)")
    p.add_argument("--temperature", type=float, default=None, help="default: 0 (greedy) for k=1, else 1.0")
    p.add_argument("--prompt-field", default=None, help="default: prompt (as training reads a data file)")
    p.add_argument("--format", default=None, choices=FORMATS,
                   help="read a data file in a benchmark's own columns and instruction (gsm8k, math500: question/"
                        "problem + a \\boxed{} instruction; ...); default: prompt, as training reads it. Never guessed")
    p.add_argument("--answer-field", default=None, help="default: answer")
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--reward", choices=("auto", "recipe", "builtin"), default="auto",
                   help="score with the run's own reward functions (recipe), the built-in reward of each item's "
                        "kind (builtin), or auto: the run's for the run's own data, else built-in")
    p.add_argument("--limit", type=int, default=None, help="first N rows only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for per-sample results and summary.json")
    p.add_argument("--baseline", default=None, metavar="CKPT",
                   help="also evaluate this checkpoint (e.g. the SFT start) on the same items and seeds: per-item "
                        "flips, exact McNemar p-value, paired bootstrap CI (writes <out>/paired.json)")
    p.add_argument("--overlap", choices=("refuse", "drop", "allow"), default="refuse",
                   help="items whose prompt the checkpoint was trained on (its recipe's data, its SFT data): refuse "
                        "(default), drop them, or allow them (then not a held-out figure)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sft", help="supervised fine-tuning to a starting checkpoint (diffusion masked CE)")
    p.add_argument("out", help="checkpoint directory to write")
    p.add_argument("overrides", nargs="*", help="with --recipe: dotted key=value overrides of the recipe")
    p.add_argument("--recipe", default=None, help="take the model and data sections (and seed) from this recipe")
    p.add_argument("--model", default=None, help="start from this checkpoint (default: a tiny model built offline)")
    p.add_argument("--tiny", default=None, choices=tuple(_TINY), help="tiny model kind (default: block)")
    p.add_argument("--hidden-size", type=int, default=192, help="tiny model size (also --num-layers ...)")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=None, help="default: 4 x hidden size")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--task", default=None, help="toy task (arithmetic | countdown | sudoku; default: arithmetic)")
    p.add_argument("--data", default=None, help=".jsonl / .json / .parquet training file (instead of --task)")
    p.add_argument("--heldout-data", default=None)
    p.add_argument("--prompt-field", default=None, help="default: the recipe's, else prompt")
    p.add_argument("--answer-field", default=None, help="default: the recipe's, else answer")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 20)")
    p.add_argument("--seed", type=int, default=None, help="default: the recipe's, else 0")
    p.add_argument("--eval-items", type=int, default=0, help="greedy accuracy on this many held-out items after")
    p.add_argument("--eval-decoding", choices=("static", "dynamic"), default="static",
                   help="decoding of that greedy accuracy")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("status", help="runs, their step and last metrics")
    p.add_argument("runs_dir", nargs="?", default="runs")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the options (`diffrl submit R --address A k=v`)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_environment(args.verbose, getattr(args, "quiet", False))
    noisy = ("httpx", "urllib3", "filelock", "datasets", "transformers", "matplotlib", "PIL")
    for name in noisy if args.verbose else (*noisy, "ray", "deepspeed", "DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING if args.verbose or name in noisy else logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("diffrl: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # user errors become one line; anything else is re-raised with its traceback
        cause = _unwrap(err)
        from launch.cluster_nodes import NodeLostError

        if isinstance(cause, NodeLostError):  # a failed run, not bad input: exit 1, in one line all the same
            print(f"diffrl: error: {cause}", file=sys.stderr)
            return 1
        if isinstance(cause, _user_errors()):
            from rollout.errors import one_line

            print(f"diffrl: error: {one_line(cause)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


if __name__ == "__main__":
    sys.exit(main())
