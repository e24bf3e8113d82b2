"""Bad settings are caught up front, with one message whatever the entry point: `apply`, lm-eval's
``--model_args``, ``recipes/generate.py`` and the demo all say which settings the policy takes."""

import numpy as np
import pytest

import longflow_patch
from longflow_patch import toy
from longflow_patch.eval.policy_options import parse_settings, policy_options

from models import tiny_model
from recipe_loader import load_recipe

BUDGET_ERROR = r"budget must be an integer number of KV slots per sequence per layer, "
LONGFLOW_SETTINGS = "budget, sink_tokens, recent_window, per_head, observation_window, pooling_kernel"


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3")


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (100.5, r"got 100\.5 \(float\)$"),
        ("256", r"got '256' \(str\); pass budget=256, a number"),
        (None, r"got None \(NoneType\)"),
        (True, r"got True \(bool\)"),
        (0.2, r"got 0\.2 \(float\): it looks like a compression ratio.*budget=int\(f \* N\)"),
    ],
)
def test_budget_must_be_a_slot_count(model, budget, message):
    with pytest.raises(
        TypeError, match=r"budget must be an integer number of KV slots per sequence per layer, " + message
    ):
        longflow_patch.apply(model, budget=budget)
    assert not hasattr(model, "_longflow_policy")  # refused before anything was patched


def test_budget_accepts_any_integer_and_refuses_too_small_ones(model):
    longflow_patch.apply(model, budget=np.int64(32))
    assert model._longflow_policy.budget == 32
    longflow_patch.unapply(model)
    with pytest.raises(ValueError, match=r"budget=12 is too small for policy 'longflow'.* = 13"):
        longflow_patch.apply(model, budget=12)
    with pytest.raises(TypeError, match="budget must be an integer"):
        longflow_patch.make_policy("h2o", budget="64")


@pytest.mark.filterwarnings("ignore:policy .* uses budgets measured under 'rkv'")  # R-KV profiles, LongFlow scorer
@pytest.mark.parametrize("method", ["lukv", "reasonalloc"])
def test_an_allocator_refuses_a_budget_below_its_profiles_floor(method):
    """The toy's profiles give every head at least 16 slots: 15 on average cannot be allocated."""
    profile = toy.profile_paths(method)[0]
    assert longflow_patch.make_policy(method, budget=16, profile=profile, scorer="longflow").budget == 16
    with pytest.raises(ValueError, match=rf"budget=15 is too small for policy '{method}': its profile gives every KV "
                       r"head at least 16 slots"):  # fmt: skip
        longflow_patch.make_policy(method, budget=15, profile=profile, scorer="longflow")


def _message(call) -> str:
    with pytest.raises((ValueError, SystemExit)) as error:
        call()
    return str(error.value)


@pytest.mark.parametrize(
    ("policy", "setting", "expected"),
    [
        ("longflow", "sink_token", f"(did you mean 'sink_tokens'?); its settings: {LONGFLOW_SETTINGS}"),
        ("longflow", "buffer", "(a setting of snapkv, rkv, random, lukv, reasonalloc); its settings: "
                               + LONGFLOW_SETTINGS),
        ("rkv", "colour", "; its settings: budget, sink_tokens, recent_window, per_head, observation_window, "
                         "pooling_kernel, buffer, importance_weight"),
    ],
)  # fmt: skip
def test_a_mistyped_setting_gives_one_message_from_every_entry_point(model, policy, setting, expected):
    message = f"policy {policy!r} has no setting {setting!r}{' ' if expected[0] == '(' else ''}{expected}"
    from_apply = _message(lambda: longflow_patch.apply(model, policy=policy, budget=128, **{setting: 4}))
    from_text = _message(lambda: policy_options(policy, {"budget": "128", setting: "4"}))
    generate = load_recipe("generate.py")
    args = generate.parse_args(["--model", "m", "--prompts", "p", "--out", "o", "--policy", policy,
                                "--setting", f"{setting}=4"])  # fmt: skip
    from_generate = _message(lambda: generate.settings(args))
    assert from_apply == from_text == from_generate == message
    assert not hasattr(model, "_longflow_policy")


def test_lm_eval_model_args_name_the_policy_settings_not_the_model_class():
    pytest.importorskip("lm_eval")
    from longflow_patch.eval.model import LongFlowLM

    # refused before the model loads, so the path need not exist
    message = _message(lambda: LongFlowLM.create_from_arg_string("pretrained=unused,sink_token=4", {"device": "cpu"}))
    expected = "policy 'longflow' has no setting 'sink_token' (did you mean 'sink_tokens'?); its settings: "
    assert message == expected + LONGFLOW_SETTINGS
    message = _message(lambda: LongFlowLM.create_from_arg_string("pretrained=unused,buffer=4", {"device": "cpu"}))
    assert message.startswith("policy 'longflow' has no setting 'buffer' (a setting of snapkv")


def test_command_line_settings_parse_as_name_value():
    assert parse_settings(["profile=a.json", "floor-share=0.9", "x=a=b"]) == {
        "profile": "a.json",
        "floor_share": "0.9",
        "x": "a=b",
    }
    with pytest.raises(ValueError, match="--setting takes NAME=VALUE, got 'buffer'"):
        parse_settings(["buffer"])


@pytest.mark.parametrize("policy", ["lukv", "reasonalloc"])
def test_profiled_policies_say_where_profiles_come_from(model, policy, tmp_path):
    with pytest.raises(ValueError) as error:
        longflow_patch.apply(model, policy=policy, budget=64)
    message = str(error.value)
    assert "needs profile=PATH" in message
    assert f"longflow_patch.toy.profile_paths({policy!r})" in message and "--setting profile=PATH" in message
    missing = tmp_path / "nowhere.json"
    with pytest.raises(FileNotFoundError, match=rf"policy {policy!r}: no budget profile at .*nowhere\.json"):
        longflow_patch.apply(model, policy=policy, budget=64, profile=missing)
    assert not hasattr(model, "_longflow_policy")


def test_policy_settings_lists_fields_budget_first():
    assert longflow_patch.policy_settings("longflow") == tuple(LONGFLOW_SETTINGS.split(", "))
    assert "profile" in longflow_patch.policy_settings("lukv")
    with pytest.raises(ValueError, match="unknown policy 'nope'; available: longflow, h2o"):
        longflow_patch.policy_settings("nope")
