"""Rewards with weights are built straight on the target device and dtype, never whole on the CPU first.

The ``meta`` device stands in for a GPU: a parameter created there holds no memory, and a parameter
created on the CPU and moved afterwards is seen by torch's global parameter-registration hook. So
"every parameter was registered on meta" fails for a factory that ignores ``device`` (or builds on
the CPU and calls ``.to(device)`` at the end), as ``load_frozen_reward`` used to.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from rewards_fixtures import PROMPTS, make_images, single_thread, tiny_options, tiny_rewards  # noqa: F401
from torch.nn.modules.module import register_module_parameter_registration_hook

from diffalign.errors import UserError
from diffalign.rewards import Reward, load_reward, options_taken, register_reward
from diffalign.rewards.registry import _REGISTRY
from diffalign.rewards.tiny import TINY_REWARDS
from diffalign.training import load_frozen_reward

# Loading a checkpoint into meta parameters is a no-op that torch (rightly) warns about.
pytestmark = pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")


@contextlib.contextmanager
def registered_parameter_devices():
    """Yields a list that collects the device type of every parameter any module registers meanwhile."""
    devices: list[str] = []
    handle = register_module_parameter_registration_hook(
        lambda module, name, param: devices.append(param.device.type) if param is not None else None
    )
    try:
        yield devices
    finally:
        handle.remove()


def weights_of(reward: Reward) -> list[torch.nn.Parameter]:
    """The scoring model's parameters (the aesthetic MLP head is kept in float32 by design)."""
    return list(reward.model.parameters())


def spec_string(name: str, options: dict) -> str:
    return f"{name}:" + ",".join(f"{key}={value}" for key, value in options.items())


@pytest.mark.parametrize("name", TINY_REWARDS)
def test_weights_are_created_on_the_device_not_moved_there(tiny_options, name):
    with registered_parameter_devices() as devices:
        reward = load_reward(name, **tiny_options[name], device="meta")
    assert devices and set(devices) == {"meta"}, f"{devices.count('cpu')} of {len(devices)} parameters built on the CPU"
    assert {p.device.type for p in reward.parameters()} == {"meta"} and reward.device.type == "meta"


@pytest.mark.parametrize("name", TINY_REWARDS)
def test_dtype_reaches_the_weights_and_scores_agree_with_float32(tiny_options, tiny_rewards, name):
    reward = load_reward(name, **tiny_options[name], dtype=torch.float64)
    assert {p.dtype for p in weights_of(reward)} == {torch.float64}
    images = make_images(2)
    scores = reward(images, PROMPTS[:2])
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, tiny_rewards[name](images, PROMPTS[:2]), rtol=1e-4, atol=1e-4)


def test_load_frozen_reward_builds_a_composite_on_the_device_and_freezes_it(tiny_options):
    parts = {spec_string("clip", tiny_options["clip"]): 1.0, spec_string("vlm", tiny_options["vlm"]): 0.5,
             "brightness": 0.1}
    with registered_parameter_devices() as devices:
        reward = load_frozen_reward({"composite": parts}, torch.device("meta"))
    assert devices and set(devices) == {"meta"}
    assert [part.device.type for part in reward.parts.values()] == ["meta", "meta", "meta"]
    assert not any(p.requires_grad for p in reward.parameters())
    assert not reward.training and not any(module.training for module in reward.modules())


def test_load_frozen_reward_dtype_overrides_the_spec_and_reaches_composite_parts(tiny_options):
    clip = spec_string("clip", {**tiny_options["clip"], "dtype": "bfloat16"})
    assert {p.dtype for p in weights_of(load_frozen_reward(clip, "cpu"))} == {torch.bfloat16}  # the spec's own dtype
    reward = load_frozen_reward({"composite": {clip: 1.0, "saturation": 1.0}}, "cpu", dtype=torch.float64)
    assert {p.dtype for p in weights_of(reward.parts["0"])} == {torch.float64}
    assert not any(p.requires_grad for p in reward.parameters())


def test_load_frozen_reward_moves_rewards_whose_factory_takes_no_device():
    class Linear(Reward):
        def __init__(self) -> None:
            super().__init__("test_no_device", differentiable=True)
            self.layer = torch.nn.Linear(3, 1)

        def score_batch(self, images, prompts):
            return self.layer(images.mean(dim=(2, 3))).squeeze(-1)

    register_reward("test_no_device")(lambda: Linear())
    try:
        assert options_taken("test_no_device", {"device": "meta", "dtype": torch.float64}) == {}
        reward = load_frozen_reward("test_no_device", "meta")
        assert reward.layer.weight.device.type == "meta" and not reward.layer.weight.requires_grad
    finally:
        del _REGISTRY["test_no_device"]


def test_options_taken_keeps_what_each_factory_accepts():
    shared = {"device": "meta", "dtype": torch.float64, "batch_size": None}
    assert options_taken("pickscore", shared) == {"device": "meta", "dtype": torch.float64}
    assert options_taken("brightness", shared) == {"device": "meta"}  # rule-based: no dtype option
    assert options_taken({"composite": {"brightness": 1.0}}, shared) == {"device": "meta", "dtype": torch.float64}
    assert options_taken(load_reward("brightness"), shared) == {}  # already built


def test_a_bad_device_name_is_a_one_line_user_error(tiny_options):
    with pytest.raises(UserError) as error:
        load_reward("clip", **tiny_options["clip"], device="gpu")
    assert str(error.value) == "reward 'clip': device='gpu' is not a torch device; use e.g. cpu, cuda, cuda:1"
