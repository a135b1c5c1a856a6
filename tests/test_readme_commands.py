"""The README's "Using it with your data" runs as written, on a machine without a GPU.

Every fenced block of that section (all of them must be ```bash) is run by bash with ``set -euo pipefail``: the
blocks above the first ``###`` heading (the environment) and then the blocks of one ``###`` subsection, in order,
in one shell per subsection, so that a subsection is one workflow (convert, plan and preprocess, train, evaluate,
predict). The only changes to the text, both stated in the README:

- data paths: ``/data/`` becomes a private folder in which ``LiTS`` is the session's synthetic LiTS release
  (``synthetic_lits_root``) and ``tn3k`` a synthetic TN3K release; everything else under ``/data/`` (nnU-Net's
  three folders, predictions) is written there by the commands themselves;
- training length: every trainer name ``nnUNetTrainer<X>`` becomes its smoke-run variant ``nnUNetTrainer<X>_quick``
  (a trainer without one fails the test).

Dataset ids, ``-device``, process counts and every other argument run as written, with CUDA hidden
(``CUDA_VISIBLE_DEVICES=""``) and none of nnU-Net's variables inherited. Conversion and planning are run, not
taken from the ``planned_dataset`` fixture: they are README commands, a converter refuses to overwrite a dataset
and ``nnUNetv2_plan_and_preprocess`` always plans anew. A failing command fails the test with its block's text and
the end of the output. After a run, every ``nnUNetv2_predict`` output holds one segmentation per input case and
every ``nnUNetv2_evaluate_folder`` summary scores each of its predictions against a reference of the same name.

A second test checks that every repository path the README names in backticks exists.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest

from nnunet_ext.synthetic.ultrasound_breast_thyroid import make_synthetic_tn3k
from nnunet_ext.training.registry import TRAINERS

REPOSITORY = Path(__file__).resolve().parents[1]
README = REPOSITORY / "README.md"
SECTION = "Using it with your data"
FENCE = re.compile(r"^(\s*)```(.*)$")
TRAINER_NAME = re.compile(r"\bnnUNetTrainer[A-Za-z0-9]+(?=__|\b)")


@dataclass(frozen=True)
class Block:
    """A fenced block of the README: the subsection it is in, its first line number and its text."""
    subsection: str
    line: int
    text: str


def section_lines(readme: str, title: str) -> List[tuple]:
    """``(line number, line)`` of the ``## title`` section, up to the next ``## `` heading."""
    lines = list(enumerate(readme.splitlines(), start=1))
    starts = [i for i, (_, line) in enumerate(lines) if line.strip() == f"## {title}"]
    if len(starts) != 1:
        raise AssertionError(f"README.md has {len(starts)} sections '## {title}', expected one")
    start = starts[0] + 1
    end = next((i for i in range(start, len(lines)) if lines[i][1].startswith("## ")), len(lines))
    return lines[start:end]


def fenced_blocks(lines: List[tuple]) -> List[Block]:
    """Every fenced block of ``lines`` with the ``###`` subsection it belongs to ("" above the first one).

    Fences may be indented (list items); the block is dedented by its fence's indentation. A fence that is not
    ``bash`` or never closes raises an ``AssertionError`` naming its line.
    """
    blocks, subsection, index = [], "", 0
    while index < len(lines):
        number, line = lines[index]
        index += 1
        if line.startswith("### "):
            subsection = line[4:].strip()
            continue
        opening = FENCE.match(line)
        if not opening:
            continue
        indent, language = opening.group(1), opening.group(2).strip()
        if language != "bash":
            raise AssertionError(f"README.md line {number}: a block of '{SECTION}' fenced as '```{language}'; "
                                 "this section's blocks are run by this test, fence them as ```bash")
        body = []
        while index < len(lines) and not FENCE.match(lines[index][1]):
            body.append(lines[index][1][len(indent):] if lines[index][1].startswith(indent) else lines[index][1])
            index += 1
        if index == len(lines) or FENCE.match(lines[index][1]).group(2).strip():
            raise AssertionError(f"README.md line {number}: the ```bash block is never closed")
        index += 1
        blocks.append(Block(subsection, number, "\n".join(body)))
    return blocks


def readme_blocks() -> List[Block]:
    return fenced_blocks(section_lines(README.read_text(), SECTION))


def workflow_names() -> List[str]:
    """The subsections with blocks (read at collection; the test reads the README again)."""
    try:
        return list(dict.fromkeys(block.subsection for block in readme_blocks() if block.subsection))
    except AssertionError as error:  # collected as one failing case that shows the problem
        return [f"unreadable README: {error}"]


def quick(text: str) -> str:
    """Every trainer name -> its ``_quick`` smoke-run variant, which must exist."""
    def replace(match: re.Match) -> str:
        name = match.group(0) if match.group(0).endswith("_quick") else match.group(0) + "_quick"
        if name not in TRAINERS:
            raise AssertionError(f"the README trains {match.group(0)}, which has no smoke-run variant {name}")
        return name
    return TRAINER_NAME.sub(replace, text)


def command_lines(script: str) -> List[List[str]]:
    """The commands of a bash script as argument lists (comments dropped, continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", script)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def option(arguments: List[str], name: str, default=None):
    return arguments[arguments.index(name) + 1] if name in arguments else default


def positional(arguments: List[str], options_with_values=("-djfile", "-pfile", "-o", "-np", "-l", "-il")) -> list:
    values, skip = [], False
    for argument in arguments[1:]:
        if skip:
            skip = False
        elif argument in options_with_values:
            skip = True
        elif not argument.startswith("-"):
            values.append(argument)
    return values


def check_outputs(commands: List[List[str]], variables: Dict[str, str]) -> List[str]:
    """What the run's predictions and evaluations must hold; returns the commands checked.

    ``variables``: the environment at the end of the run; assignments ``NAME=value`` are followed in order."""
    checked, variables = [], dict(variables)
    for arguments in commands:
        arguments = [expand(a, variables) for a in arguments]
        assignment = re.fullmatch(r"([A-Za-z_]\w*)=(.*)", arguments[0])
        if len(arguments) == 1 and assignment:  # a shell variable, as the following commands see it
            variables[assignment.group(1)] = assignment.group(2)
        elif arguments[0] == "nnUNetv2_predict":
            inputs = {p.name.rsplit("_", 1)[0] for p in Path(option(arguments, "-i")).iterdir() if p.is_file()}
            outputs = {p.name.split(".")[0] for p in Path(option(arguments, "-o")).iterdir()
                       if p.is_file() and not p.name.endswith(".json")}
            assert inputs and outputs == inputs, f"{arguments}: segmented {sorted(outputs)} of {sorted(inputs)}"
            checked.append(arguments[0])
        elif arguments[0] == "nnUNetv2_evaluate_folder":
            reference, predictions = map(Path, positional(arguments))
            summary = json.loads(Path(option(arguments, "-o", predictions / "summary.json")).read_text())
            cases = summary["metric_per_case"]
            predicted = sorted(p.name for p in predictions.iterdir() if p.suffix != ".json" and p.is_file())
            assert sorted(Path(c["prediction_file"]).name for c in cases) == predicted
            for case in cases:  # each prediction scored against the reference of its own name
                assert Path(case["reference_file"]) == reference / Path(case["prediction_file"]).name
                assert all(0.0 <= m["Dice"] <= 1.0 or m["Dice"] != m["Dice"] for m in case["metrics"].values())
            checked.append(arguments[0])
    return checked


def expand(argument: str, variables: Dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), argument)


@pytest.fixture
def data_folder(tmp_path: Path, synthetic_lits_root: Path) -> Path:
    """The README's ``/data``: the synthetic LiTS and TN3K releases under the README's folder names."""
    data = tmp_path / "data"
    make_synthetic_tn3k(data)  # data/tn3k
    (data / "LiTS").symlink_to(synthetic_lits_root, target_is_directory=True)
    return data


@pytest.mark.parametrize("workflow", workflow_names())
def test_readme_workflow_runs_on_the_synthetic_data(workflow: str, data_folder: Path):
    blocks = readme_blocks()
    environment = [block for block in blocks if not block.subsection]
    steps = environment + [block for block in blocks if block.subsection == workflow]
    assert environment and len(steps) > len(environment), f"no blocks for '{workflow}' and the environment"
    texts = [quick(block.text).replace("/data/", f"{data_folder}/") for block in steps]
    marker = data_folder.parent / "block"
    variables_file = data_folder.parent / "variables.json"
    script = ["set -euo pipefail", f"cd {shlex.quote(str(data_folder.parent))}"]
    for number, text in enumerate(texts):
        script += [f"echo {number} > {shlex.quote(str(marker))}", text]
    script.append(f"{shlex.quote(sys.executable)} -c 'import json, os; print(json.dumps(dict(os.environ)))' "
                  f"> {shlex.quote(str(variables_file))}")
    env = {key: value for key, value in os.environ.items() if not key.startswith("nnUNet")}
    env.update(CUDA_VISIBLE_DEVICES="", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    result = subprocess.run(["bash", "-c", "\n".join(script)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        failed = steps[int(marker.read_text())] if marker.exists() else steps[0]
        pytest.fail(f"README.md block at line {failed.line} ('{failed.subsection or SECTION}') failed "
                    f"(exit {result.returncode}):\n{failed.text}\n--- output (end) ---\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}", pytrace=False)
    checked = check_outputs(command_lines("\n".join(texts)), json.loads(variables_file.read_text()))
    assert "nnUNetv2_evaluate_folder" in checked, f"'{workflow}' evaluates nothing"


PATH_TOKEN = re.compile(r"\.?[\w.-]+(/[\w.-]+)+/?")


def test_every_repository_path_named_in_the_readme_exists():
    """Backticked paths whose first folder is one of the repository's (or of the package's, or ``papers``, which
    lives outside the repository) must exist; dataset layouts (``Testing/img``) and placeholders are not checked."""
    text = re.sub(r"^\s*```.*?^\s*```", lambda m: "\n" * m.group(0).count("\n"), README.read_text(),
                  flags=re.S | re.M)
    roots = {p.name for p in REPOSITORY.iterdir()} | {"papers"}
    package = {p.name for p in (REPOSITORY / "nnunet_ext").iterdir() if p.is_dir()}
    missing = []
    for match in re.finditer(r"`([^`\n]+)`", text):
        token = match.group(1)
        if not PATH_TOKEN.fullmatch(token):
            continue
        first = token.split("/")[0]
        if first in roots and not (REPOSITORY / token).exists():
            missing.append(token)
        elif first in package and first not in roots and not (REPOSITORY / "nnunet_ext" / token).exists():
            missing.append(token)
    assert not missing, f"README.md names paths that do not exist: {missing}"
