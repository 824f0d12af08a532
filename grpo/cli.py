"""`r1`: run recipes and single stages.

    r1 run RECIPE [key.sub=value ...]        a built-in recipe by name, or a recipe file (--dry-run: check it)
    r1 sft|grpo|eval|reject CONFIG [k=v ...] one stage (grpo.config.STAGES) from a recipe file or a stage file
    r1 report RUN_DIR                        report.md, report.json and plots/*.png from a run directory
    r1 rewards list | score ...              inspect and debug reward functions
    r1 serve MODEL ...                       a vLLM rollout server for a remote trainer

run and the stages take --accelerate-config FILE: r1 starts itself again under `accelerate launch --config_file FILE`
(one process per GPU; DDP, or DeepSpeed ZeRO with a DeepSpeed config: recipes/accelerate/). Only rank 0 prints.

Config and data problems print one line (`r1: error: ...`) and exit 2, before any model is built.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from grpo.config import STAGES, ConfigError, load_recipe, load_stage, stage_runner


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "org/name": left to transformers (hub or its cache)


def check_model_path(field: str, path: str | None) -> None:
    """A model field names an HF checkpoint directory (config.json inside), or a hub id such as org/name."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        return
    if not p.exists() and _HUB_ID.fullmatch(path) and not path.startswith("."):
        return
    raise ConfigError(f"{field}: {path} is not a checkpoint directory (no config.json)")


def check_output_dir(field: str, path: Path) -> None:
    """The output directory can be created and written: its nearest existing ancestor is a writable directory."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"{field}: {path} cannot be created ({p} is a file, not a directory)")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: {path} is not writable ({p} does not allow writing)")


def preflight(sections, output: Path | None = None, recipe: bool = False) -> None:
    """Checks that need no model, on (name, section) pairs: model and data paths exist, templates compile,
    rewards resolve, the output directory is writable, the rollout engine is installed. `stage:NAME` references
    (grpo/pipeline.py) need a recipe run (`recipe`) in which NAME comes earlier."""
    import jinja2

    import rewards
    from grpo import templates

    if output is not None:
        check_output_dir("output", output)

    def made_here(path: str | None) -> bool:
        """A path inside the run's own output directory, or a stage:NAME reference: an earlier stage writes it."""
        return (recipe and path is not None and path.startswith("stage:")) or (
            output is not None and path is not None and Path(path).absolute().is_relative_to(output.absolute()))

    earlier: list[str] = []
    for name, sec in sections:
        refs = [(f, getattr(sec, f, None)) for f in ("model", "teacher", "tokenizer")]
        refs += [("data.source", sec.data.source)] if getattr(sec, "data", None) is not None else []
        for field, value in refs:
            if isinstance(value, str) and value.startswith("stage:"):
                if not recipe:
                    raise ConfigError(f"{name}.{field}: {value} refers to another stage; run the recipe with r1 run")
                if value[6:] not in earlier:
                    raise ConfigError(f"{name}.{field}: {value} names no stage before {name} "
                                      f"(earlier: {', '.join(earlier) or 'none'})")
        earlier.append(name)
        for field in ("model", "teacher", "tokenizer"):
            if not made_here(getattr(sec, field, None)):
                check_model_path(f"{name}.{field}", getattr(sec, field, None))
        datas = [(f"{name}.data", sec.data)] if sec.data is not None else []
        datas += [(f"{name}.decontaminate.{i}", d) for i, d in enumerate(getattr(sec, "decontaminate", []))]
        datas += [(f"{name}.benchmarks.{b}", d) for b, d in (getattr(sec, "benchmarks", None) or {}).items()]
        datas += [(f"{name}.eval_data", sec.eval_data)] if getattr(sec, "eval_data", None) is not None else []
        for field, data in datas:
            src = data.source
            if Path(src).suffix in (".jsonl", ".json", ".parquet") and not Path(src).is_file() and not made_here(src):
                raise ConfigError(f"{field}.source: file {src} does not exist")
        try:
            templates.check(sec.template)
        except (FileNotFoundError, jinja2.TemplateError) as e:
            raise ConfigError(f"{name}.template: {e}") from None
        for i, r in enumerate(getattr(sec, "rewards", [])):
            try:
                rewards.resolve(r.name)
            except (KeyError, ImportError, AttributeError, FileNotFoundError, SyntaxError) as e:
                raise ConfigError(f"{name}.rewards.{i}.name: {e.args[0] if e.args else e}") from None
        if getattr(sec, "rollout", None) == "vllm":  # grpo, reject and eval sample with a rollout engine
            try:
                from grpo.rollout.vllm import check_vllm
            except ImportError as e:
                raise ConfigError(f"rollout: vllm: {e}") from None
            try:
                check_vllm()
            except (ImportError, RuntimeError) as e:
                raise ConfigError(f"rollout: vllm: {e}") from None


def _run(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    preflight([(s, recipe.sections[s]) for s in recipe.stages], Path(recipe.output_dir), recipe=True)
    if (args.device != "cpu" or args.full_size or args.gpus != 1) and not args.dry_run:
        raise ConfigError("--device/--full-size/--gpus: only for --dry-run; a real run takes each stage's runtime")
    if args.gpus < 1:
        raise ConfigError(f"--gpus: {args.gpus}; give 1 or more")
    if args.dry_run:  # every stage one step on CPU stand-ins, and the memory plan of the real models
        from rich.console import Console

        from grpo.plan import dry_run

        dry_run(recipe, Console(), args.gpu_memory, args.device, args.full_size, args.gpus)
        return 0
    from grpo import pipeline

    pipeline.run(recipe, main_console())
    return 0


def _report(args) -> int:
    """Rebuild a run directory's report (the held-out table, a line per stage, PNG plots): grpo/report.py."""
    from rich.console import Console

    from grpo.report import write_report

    write_report(Path(args.run_dir), Console())
    return 0


def _stage(args) -> int:
    """One stage kind from STAGES, from a recipe's section or a bare stage file."""
    import json

    sec, recipe = load_stage(args.command, args.config, args.overrides)
    out = Path(args.output or (Path(recipe.output_dir) / args.command if recipe else Path("runs") / args.command))
    preflight([(args.command, sec)], out)
    spec = STAGES[args.command]
    if spec.needs_model and sec.model is None:
        raise ConfigError(f"{args.command}.model is not set: pass model=PATH (an HF checkpoint directory)")
    console = main_console()
    produced = stage_runner(args.command)(sec, sec.model, out, console)
    if spec.chains:
        console.print(f"checkpoint: {produced}")
    else:
        for k, v in json.loads(Path(produced).read_text()).items():
            console.print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def main_console():
    """The console a command prints on: rank 0's; under torchrun / accelerate launch the other ranks stay quiet."""
    from rich.console import Console

    return Console(quiet=int(os.environ.get("RANK", "0")) != 0)


def relaunch(argv: list[str]) -> list[str]:
    """argv without --accelerate-config FILE; when it is there and this is not a launched process yet, exec
    `accelerate launch --config_file FILE -m grpo.cli argv...` instead (so this returns only inside the launch)."""
    for i, a in enumerate(argv):
        if a == "--accelerate-config" or a.startswith("--accelerate-config="):
            path = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            rest = argv[:i] + argv[i + (1 if "=" in a else 2):]
            break
    else:
        return argv
    if not Path(path).is_file():  # a shipped config by name: deepspeed_zero2, deepspeed_zero3, fsdp2, ddp
        from importlib import resources

        shipped = resources.files("recipes") / "accelerate" / f"{path}.yaml"
        if not path or "/" in path or not shipped.is_file():
            known = sorted(f.name[:-5] for f in (resources.files("recipes") / "accelerate").iterdir()
                           if f.name.endswith(".yaml"))
            raise ConfigError(f"--accelerate-config: {path or '(missing)'} is not a file or a shipped config "
                              f"({', '.join(known)})")
        path = str(shipped)
    if "LOCAL_RANK" in os.environ:  # launched already (accelerate launch, torchrun): run here
        return rest
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", path, "-m", "grpo.cli", *rest]
    os.execv(sys.executable, cmd)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = relaunch(argv)
    except ConfigError as e:
        print(f"r1: error: {e}", file=sys.stderr)
        return 2
    if argv[:1] == ["rewards"]:
        from rewards.cli import main as rewards_main

        return rewards_main(argv[1:])
    if argv[:1] == ["serve"]:
        from grpo.rollout.server import main as serve_main

        return serve_main(argv[1:])
    parser = argparse.ArgumentParser(prog="r1", description="R1-style reasoning post-training")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a recipe (built-in name or YAML file)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, run each stage one step on CPU with tiny stand-ins, print the memory plan per GPU")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU for the --dry-run plan")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (one process each) the --dry-run plan spreads over: "
                   "what each stage's runtime.distributed shards is divided by it")
    p.add_argument("--device", default="cpu", help="where --dry-run runs its stand-in steps: cpu (fp32, native "
                   "sampling) or cuda[:N] (the recipe's precision and sampler; bench/gpu_check.sh)")
    p.add_argument("--full-size", action="store_true", help="--dry-run stand-ins at the real models' shapes "
                   "(random weights; transformers models only): for GPU checks")
    accel_help = "an accelerate config (recipes/accelerate/): run under `accelerate launch --config_file FILE`"
    p.add_argument("--accelerate-config", metavar="FILE", help=accel_help)
    p = sub.add_parser("report", help="report.md, report.json and plots/*.png from a run directory")
    p.add_argument("run_dir", help="a directory `r1 run` wrote (stage directories NN-name)")
    for name in STAGES:
        p = sub.add_parser(name, help=f"run one {name} stage")
        p.add_argument("config")
        p.add_argument("overrides", nargs="*", help="key.sub=value")
        p.add_argument("--output", help="output directory (default: <recipe output_dir>/<stage>)")
        p.add_argument("--accelerate-config", metavar="FILE", help=accel_help)
    sub.add_parser("rewards", help="r1 rewards list | score --reward NAME --data FILE")
    sub.add_parser("serve", help="r1 serve MODEL: a vLLM rollout server")
    args, extra = parser.parse_known_args(argv)  # key=value after --output lands here: overrides too
    bad = [a for a in extra if "=" not in a or a.startswith("-") or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from grpo.data import DataError
    from grpo.runtime import keep_freed_memory

    keep_freed_memory()  # reuse freed activation and gradient pages across steps instead of faulting them in again

    try:
        return _run(args) if args.command == "run" else _report(args) if args.command == "report" else _stage(args)
    except (ConfigError, DataError) as e:
        print(f"r1: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("r1: interrupted (the last complete checkpoint is intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
