"""Config loading: unknown keys and bad values give one line naming the key, its source and the fix."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from grpo.config import ConfigError, GRPOConfig, load_recipe, load_stage

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "r1-zero-tiny.yaml"


def test_builtin_recipe_loads_by_name_and_path():
    by_name = load_recipe("r1-zero-tiny")
    by_path = load_recipe(str(RECIPE))
    assert by_name.stages == by_path.stages == ["pretrain", "eval", "grpo", "eval"]
    assert by_name.sections["grpo"].kind == "grpo"
    assert by_name.sections["grpo"].epsilon_high == 0.28


def test_override_sets_values_with_types():
    r = load_recipe("r1-zero-tiny", ["grpo.learning_rate=1e-5", "grpo.sampling.stop=[x, y]", "grpo.rewards.1.weight=2", "eval.k=2"])
    g = r.sections["grpo"]
    assert g.learning_rate == 1e-5 and g.sampling.stop == ["x", "y"] and g.rewards[1].weight == 2.0
    assert r.sections["eval"].k == 2


def test_misspelt_override_names_key_and_suggestion():
    with pytest.raises(ConfigError) as e:
        load_recipe("r1-zero-tiny", ["grpo.lerning_rate=1e-5"])
    msg = str(e.value)
    assert "lerning_rate" in msg and "did you mean 'learning_rate'" in msg and "override" in msg
    assert "\n" not in msg


def test_misspelt_key_in_file_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text().replace("  group_size: 8", "  grup_size: 8"))
    with pytest.raises(ConfigError) as e:
        load_recipe(str(bad))
    msg = str(e.value)
    assert str(bad) in msg and "grup_size" in msg and "group_size" in msg and "grpo.grup_size" in msg


def test_nested_unknown_key_and_bad_value(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'temprature'.*did you mean 'temperature'"):
        load_recipe("r1-zero-tiny", ["grpo.sampling.temprature=0.7"])
    with pytest.raises(ConfigError, match=r"grpo\.steps: .*integer.*'many'"):
        load_recipe("r1-zero-tiny", ["grpo.steps=many"])
    with pytest.raises(ConfigError, match=r"grpo\.group_size: .*greater than or equal to 2"):
        load_recipe("r1-zero-tiny", ["grpo.group_size=1"])


def test_unknown_top_level_key_and_stage(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent("""
        name: x
        stagse: [grpo]
        grpo: {steps: 2}
    """))
    with pytest.raises(ConfigError, match=r"unknown key 'stagse'.*did you mean 'stages'"):
        load_recipe(str(f))
    f.write_text("name: x\nstages: [grpoo]\ngrpo: {steps: 2}\n")
    with pytest.raises(ConfigError, match=r"stage 'grpoo' has no section; did you mean 'grpo'"):
        load_recipe(str(f))


def test_bare_stage_file_and_unknown_recipe(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text("model: some/dir\nsteps: 3\nbeta: 0.0\n")
    cfg, recipe = load_stage("grpo", str(f))
    assert isinstance(cfg, GRPOConfig) and cfg.steps == 3 and recipe is None
    f.write_text("model: some/dir\nstep: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'step'.*did you mean 'steps'"):
        load_stage("grpo", str(f))
    with pytest.raises(ConfigError, match=r"no recipe named 'r1-zero-tin'; did you mean 'r1-zero-tiny'"):
        load_recipe("r1-zero-tin")


def _r1(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "grpo.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_error_is_one_line_without_traceback():
    p = _r1("grpo", "recipes/r1-zero-tiny.yaml", "grpo.lerning_rate=1e-5")
    assert p.returncode == 2
    err = p.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "lerning_rate" in err and "learning_rate" in err
    p = _r1("run", "r1-zero-tiny", "grpo.rewards.0.name=acuracy")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "unknown reward 'acuracy'; did you mean 'accuracy'" in p.stderr


def test_cli_names_missing_template_and_reward_file(tmp_path):
    p = _r1("run", "r1-zero-tiny", f"grpo.template={tmp_path}/nope.jinja")
    assert p.returncode == 2 and "nope.jinja" in p.stderr and "Traceback" not in p.stderr
    p = _r1("run", "r1-zero-tiny", f"grpo.rewards.0.name={tmp_path}/mine.py:score")
    assert p.returncode == 2 and "mine.py" in p.stderr and "does not exist" in p.stderr


def test_yaml_syntax_error_is_one_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("grpo:\n  steps: [1, 2\n")
    for load in (lambda: load_recipe(str(f)), lambda: load_stage("grpo", str(f))):
        with pytest.raises(ConfigError) as e:
            load()
        assert str(f) in str(e.value) and "not valid YAML" in str(e.value) and "\n" not in str(e.value)


def test_missing_paths_are_one_line_each_before_anything_is_built(tmp_path):
    """Every path field is checked up front: model, data file, template, reward file, output directory; each
    error is one line naming the field (the README's wording for a missing model)."""
    (tmp_path / "afile").write_text("x")
    cases = [
        (["grpo", "recipes/r1-zero-tiny.yaml", "grpo.model=/no/such/dir", "grpo.steps=1"],
         "r1: error: grpo.model: /no/such/dir is not a checkpoint directory (no config.json)"),
        (["run", "r1-zero-tiny", f"eval.model={tmp_path}"],  # a directory, but not a checkpoint
         f"r1: error: eval.model: {tmp_path} is not a checkpoint directory (no config.json)"),
        (["run", "r1-zero-tiny", f"grpo.data.source={tmp_path}/rows.jsonl"],
         f"r1: error: grpo.data.source: file {tmp_path}/rows.jsonl does not exist"),
        (["grpo", "recipes/r1-zero-tiny.yaml", f"template={tmp_path}/t.jinja"],
         f"r1: error: grpo.template: template file {tmp_path}/t.jinja does not exist"),
        (["grpo", "recipes/r1-zero-tiny.yaml", f"grpo.rewards.1.name={tmp_path}/mine.py:score"],
         f"r1: error: grpo.rewards.1.name: reward '{tmp_path}/mine.py:score': file {tmp_path}/mine.py does not exist"),
        (["grpo", "recipes/r1-zero-tiny.yaml", "--output", f"{tmp_path}/afile/out"],
         f"r1: error: output: {tmp_path}/afile/out cannot be created ({tmp_path}/afile is a file, not a directory)"),
        (["run", "r1-zero-tiny", f"output_dir={tmp_path}/afile/run"],
         f"r1: error: output: {tmp_path}/afile/run cannot be created ({tmp_path}/afile is a file, not a directory)"),
    ]
    for args, line in cases:
        p = _r1(*args)
        assert p.returncode == 2 and p.stderr.strip() == line, (args, p.stderr[-2000:])
    assert [f.name for f in tmp_path.iterdir()] == ["afile"]  # nothing was created


def test_bare_keys_apply_to_the_chosen_stage_of_a_recipe():
    """`r1 grpo RECIPE model=... steps=...` as the README writes it: bare keys go to the grpo section; dotted and
    top-level keys keep their meaning; a bare typo is still named with its suggestion."""
    cfg, recipe = load_stage("grpo", str(RECIPE), ["model=runs/x", "steps=3", "eval.k=2", "name=other"])
    assert (cfg.model, cfg.steps, recipe.sections["eval"].k, recipe.name) == ("runs/x", 3, 2, "other")
    cfg, _ = load_stage("sft", str(RECIPE), ["steps=5"])  # the recipe's sft-kind section is `pretrain`
    assert cfg.kind == "sft" and cfg.steps == 5
    with pytest.raises(ConfigError, match=r"unknown key 'lerning_rate'.*did you mean 'learning_rate'"):
        load_stage("grpo", str(RECIPE), ["lerning_rate=1e-5"])


def test_stage_references_resolve_in_order_and_only_inside_a_recipe(tmp_path):
    """stage:NAME points a section at an earlier stage's checkpoint or dataset; a later or unknown name, or a
    reference outside `r1 run`, is a one-line error before anything runs."""
    from grpo.cli import preflight
    from grpo.config import load_recipe
    from grpo.pipeline import resolve_refs

    recipe = load_recipe("r1-tiny")
    sections = [(s, recipe.sections[s]) for s in recipe.stages]
    preflight(sections, tmp_path / "out", recipe=True)  # the built-in recipe's references are all backwards
    swapped = [sections[0], sections[5], sections[4]]  # cold_start before the reject stage it reads
    with pytest.raises(ConfigError, match=r"cold_start.data.source: stage:cold_start_data names no stage before "
                                          r"cold_start \(earlier: pretrain\)"):
        preflight(swapped, tmp_path / "out", recipe=True)
    with pytest.raises(ConfigError, match="cold_start.model: stage:pretrain refers to another stage; run the recipe"):
        preflight([sections[5]], tmp_path / "out")
    dirs = {"pretrain": tmp_path / "00-pretrain", "cold_start_data": tmp_path / "04-cold_start_data"}
    sec = resolve_refs(recipe.sections["cold_start"], dirs, "cold_start")
    assert sec.model == str(tmp_path / "00-pretrain" / "final")
    assert sec.data.source == str(tmp_path / "04-cold_start_data" / "data" / "train.jsonl")


def test_recipe_seed_sets_every_section_seed_but_not_the_problems():
    from grpo.config import load_recipe

    r = load_recipe("r1-tiny", ["seed=7"])
    assert {sec.seed for sec in r.sections.values()} == {7}
    assert r.sections["zero"].data.seed == load_recipe("r1-tiny").sections["zero"].data.seed  # same problems
