"""condense_parse_error on jsonargparse's reports as jsonargparse 4.x writes them (copied from real runs): known
shapes become one line, anything else is left to jsonargparse (None)."""

from __future__ import annotations

import pytest

from diffusion_pl.parse_errors import condense_parse_error

BASES = {"model": "lightning.pytorch.core.module.LightningModule",
         "data": "lightning.pytorch.core.datamodule.LightningDataModule"}  # fmt: skip


def class_problem(top: str, class_path: str, inner: str, given: str) -> str:
    """jsonargparse's report of a value its model/data class refuses (``inner``: the class's own report)."""
    inner = "\n".join("        " + line for line in inner.strip("\n").splitlines())
    return f"""Parser key "{top}":
  Does not validate against any of the Union subtypes
  Subtypes: [<class '{BASES[top]}'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path '{class_path}':
{inner}
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: {given}"""


UNKNOWN_OPTION = class_problem("model", "diffusion_pl.lightning.NoisyClassifierModule",
                               "Option 'weight_decy' is not accepted", "NestedArg(key='weight_decy', val='1')")
UNKNOWN_BASE_OPTION = class_problem("data", "diffusion_pl.data.CIFAR10DataModule",  # num_workers: the base's option
                                    "Option 'num_workerz' is not accepted", "NestedArg(key='num_workerz', val='2')")
NESTED_TYPE = class_problem("data", "diffusion_pl.data.CIFAR10DataModule", """
Parser key "batch_size":
  Expected a <class 'int'>. Got value: many""", "NestedArg(key='batch_size', val='many')")
NESTED_UNION = class_problem("model", "diffusion_pl.lightning.DiffusionModule", """
Parser key "channel_mult":
  Does not validate against any of the Union subtypes
  Subtypes: [tuple[int, ...], <class 'NoneType'>]
  Errors:
    - Expected a <class 'int'>. Got value: a
    - Expected a <class 'NoneType'>
  Given value type: <class 'list'>
  Given value: [1, 'a']""", "NestedArg(key='channel_mult', val=[1, 'a'])")

UNION_OF_LITERALS = """Parser key "trainer.precision":
  Does not validate against any of the Union subtypes
  Subtypes: [typing.Literal[64, 32, 16], typing.Literal['16-mixed', 'bf16-mixed', '32-true'], <class 'NoneType'>]
  Errors:
    - Expected a typing.Literal[64, 32, 16]
    - Expected a typing.Literal['16-mixed', 'bf16-mixed', '32-true']
    - Expected a <class 'NoneType'>
  Given value type: <class 'str'>
  Given value: bf16-mixd"""

NOT_A_CLASS = """Parser key "data":

  - Expected a path but Cifar10 either not accessible or invalid
  - Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.datamodule.LightningDataModule'>, <class 'NoneType'>]
  Errors:
    - Expected a dot import path string: Cifar10
    - Expected a <class 'NoneType'>
  Given value type: <class 'str'>
  Given value: Cifar10"""

CASES = [
    (UNKNOWN_OPTION, "model.init_args.weight_decy: NoisyClassifierModule has no option 'weight_decy' (did you mean "
     "'weight_decay'?); list its options with `diffusion-pl fit --model.help NoisyClassifierModule`"),
    (UNKNOWN_BASE_OPTION, "data.init_args.num_workerz: CIFAR10DataModule has no option 'num_workerz' (did you "
     "mean 'num_workers'?); list its options with `diffusion-pl fit --data.help CIFAR10DataModule`"),
    (NESTED_TYPE, "data.init_args.batch_size: expected int, got 'many'"),
    (NESTED_UNION, "model.init_args.channel_mult: expected int, got 'a' (in [1, 'a'])"),
    (UNION_OF_LITERALS, "trainer.precision: expected one of 64, 32, 16, '16-mixed', 'bf16-mixed', '32-true', got "
     "'bf16-mixd' (did you mean 'bf16-mixed'?)"),
    (NOT_A_CLASS, "data: no LightningDataModule named 'Cifar10' (did you mean CIFAR10DataModule?); give one of "
     "diffusion-pl's classes (MNIST5kDataModule, CIFAR10DataModule, ImageNet64DataModule, ImageFolderDataModule) "
     "or a full import path"),
    ('Parser key "steps":\n  Expected a <class \'int\'>. Got value: 2x', "steps: expected int, got '2x'"),
    ("unrecognized arguments: --clasifier_scale 3", "unrecognized option --clasifier_scale 3 (did you mean "
     "--classifier_scale?); `diffusion-pl fit --help` lists the options"),
]  # fmt: skip


LIST_CASES = [
    ("Parser key \"classifier_scales\":\n  Expected a <class 'list'>. Got value: 2",
     "--classifier_scales: expected list, got '2' (a list is written in brackets: [2])"),
    ("Parser key \"labels\":\n  Expected a <class 'list'>. Got value: 1,2",
     "--labels: expected list, got '1,2' (a list is written in brackets: [1,2])"),
    ("Parser key \"metrics\":\n  Expected a <class 'list'>. Got value: fid",
     "--metrics: expected list, got 'fid' (a list is written [1, 2])"),
]  # fmt: skip


@pytest.mark.parametrize("message,expected", LIST_CASES, ids=["one-number", "comma-separated", "word"])
def test_a_list_written_without_brackets_gets_the_bracketed_form(message, expected):
    assert condense_parse_error(message, key_prefix="--") == expected


IDS = ["unknown-option", "unknown-base-option", "nested-type", "nested-union", "union-literals", "not-a-class",
       "plain-type", "unrecognized"]


@pytest.mark.parametrize("message,expected", CASES, ids=IDS)
def test_known_shapes_become_one_line(message, expected):
    options = ["--help", "--classifier_scale", "--cfg_scale"]
    assert condense_parse_error(message, "diffusion-pl fit", options) == expected


def test_no_suggestion_when_nothing_is_close():
    message = UNKNOWN_OPTION.replace("weight_decy", "zzzz")
    out = condense_parse_error(message, "diffusion-pl fit")
    assert "did you mean" not in out and out.startswith("model.init_args.zzzz: NoisyClassifierModule has no option")


def test_key_prefix_for_command_line_only_keys():
    assert condense_parse_error(CASES[IDS.index("plain-type")][0], key_prefix="--") == "--steps: expected int, got '2x'"


@pytest.mark.parametrize("prog,hint", [("diffusion-pl fit", ""),
                                       ("diffusion-pl validate", " (or --ckpt_path: the checkpoint holds them)")])
def test_missing_required_options_name_them_and_where_they_come_from(prog, hint):
    command = prog.split()[-1]
    message = f"the following arguments are required: {command}.data, {command}.model"
    expected = f"missing --data, --model: give them on the command line or in a --config file{hint}"
    assert condense_parse_error(message, prog) == expected


@pytest.mark.parametrize("message", [
    'Parser key "model":\n  Something jsonargparse may say in a later version',
    "Configuration check failed :: No action for destination key \"x\" to check its value.",
    "",
])  # fmt: skip
def test_unknown_shapes_are_left_to_jsonargparse(message):
    assert condense_parse_error(message) is None
