"""`r1`: run recipes and single stages.

    r1 run RECIPE [key.sub=value ...]        a built-in recipe by name, or a recipe file
    r1 sft|grpo|eval CONFIG [key=value ...]  one stage from a recipe file (its section) or a bare stage file
    r1 rewards list | score ...              inspect and debug reward functions
    r1 serve MODEL ...                       a vLLM rollout server for a remote trainer

Config and data problems print one line (`r1: error: ...`) and exit 2, before any model is built.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpo.config import ConfigError, GRPOConfig, RecipeConfig, load_recipe, load_stage


def preflight(sections) -> None:
    """Checks that need no model: templates compile, rewards resolve, the rollout engine is installed."""
    import jinja2

    import rewards
    from grpo import templates

    for sec in sections:
        try:
            templates.check(sec.template)
        except (FileNotFoundError, jinja2.TemplateError) as e:
            raise ConfigError(f"template: {e}") from None
        for r in getattr(sec, "rewards", []):
            try:
                rewards.resolve(r.name)
            except (KeyError, ImportError, AttributeError, FileNotFoundError, SyntaxError) as e:
                raise ConfigError(f"rewards: {e.args[0] if e.args else e}") from None
        if isinstance(sec, GRPOConfig) and sec.rollout == "vllm":
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
    preflight(recipe.sections[s] for s in recipe.stages)
    from grpo import pipeline

    pipeline.run(recipe)
    return 0


def _stage(args) -> int:
    from rich.console import Console

    sec, recipe = load_stage(args.command, args.config, args.overrides)
    preflight([sec])
    out = Path(args.output or (Path(recipe.output_dir) / args.command if recipe else Path("runs") / args.command))
    console = Console()
    if args.command == "sft":
        from grpo import sft

        console.print(f"checkpoint: {sft.train(sec, sec.model, out, console)}")
    elif args.command == "grpo":
        if sec.model is None:
            raise ConfigError("grpo.model is not set: pass model=PATH (an HF checkpoint directory)")
        from grpo import trainer

        console.print(f"checkpoint: {trainer.train(sec, sec.model, out, console)}")
    else:
        if sec.model is None:
            raise ConfigError("eval.model is not set: pass model=PATH (an HF checkpoint directory)")
        from grpo import evaluate

        for k, v in evaluate.evaluate(sec, sec.model, console).items():
            console.print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    for name in ("sft", "grpo", "eval"):
        p = sub.add_parser(name, help=f"run one {name} stage")
        p.add_argument("config")
        p.add_argument("overrides", nargs="*", help="key.sub=value")
        p.add_argument("--output", help="output directory (default: <recipe output_dir>/<stage>)")
    sub.add_parser("rewards", help="r1 rewards list | score --reward NAME --data FILE")
    sub.add_parser("serve", help="r1 serve MODEL: a vLLM rollout server")
    args = parser.parse_args(argv)
    from grpo.data import DataError
    from grpo.runtime import keep_freed_memory

    keep_freed_memory()  # reuse freed activation and gradient pages across steps instead of faulting them in again

    try:
        return _run(args) if args.command == "run" else _stage(args)
    except (ConfigError, DataError) as e:
        print(f"r1: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("r1: interrupted (the last complete checkpoint is intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
