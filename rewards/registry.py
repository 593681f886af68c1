"""The reward registry: a dict of factories, a decorator, spec parsing and ``load_reward``.

A *spec* names a reward and its options, in any of the forms a user writes:

    "pickscore"                                        # a bare name
    "vlm:model=Qwen/Qwen2.5-VL-7B-Instruct,batch_size=4"   # name:key=value,... (values typed by YAML)
    {"clip": {"model": "ViT-B-32"}}                    # the YAML mapping form
    {"composite": {"pickscore": 1.0, "aesthetic": 0.1}}

``parse_reward_spec`` turns any of them into ``(name, options)`` and checks the name and option keys
without building a model, so configs can be validated up front. ``load_reward`` builds the reward.
"""

from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import yaml

from diffalign.errors import UserError

from .base import Reward

RewardSpec = str | Mapping[str, Any] | Reward


@dataclass(frozen=True)
class RewardEntry:
    """One registered reward.

    Attributes:
        name: the registry name.
        factory: ``factory(**options) -> Reward``; heavy imports happen inside it.
        differentiable: known before building (``None`` when it depends on options, e.g. composite).
        options: the option names the factory accepts (``None``: anything).
        rest_into: if set, option keys the factory does not know are gathered into this option
            (composite: ``{"pickscore": 1.0}`` becomes ``weights={"pickscore": 1.0}``).
        uses_prompts: False for rewards that ignore the prompt (aesthetic, rule-based).
        weights: what the reward needs on disk, for ``diffalign rewards``: ``"none"``, ``"bundled ..."``
            (ships with a package) or ``"download: <hub ids>"`` (the defaults; options point elsewhere).
    """

    name: str
    factory: Callable[..., Reward]
    differentiable: bool | None
    options: tuple[str, ...] | None
    rest_into: str | None = None
    uses_prompts: bool = True
    weights: str | None = None


_REGISTRY: dict[str, RewardEntry] = {}
_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def register_reward(
    name: str, *, differentiable: bool | None = None, rest_into: str | None = None, uses_prompts: bool = True,
    weights: str | None = None,
) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Register ``factory(**options) -> Reward`` under ``name``.

    Usage::

        @register_reward("brightness", differentiable=True)
        def build_brightness(batch_size: int | None = None) -> Reward: ...
    """
    if ":" in name or "," in name or "=" in name:
        raise ValueError(f"reward name {name!r} may not contain ':', ',' or '='")

    def decorator(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ValueError(f"reward {name!r} is already registered by {_REGISTRY[name].factory!r}")
        parameters = inspect.signature(factory).parameters.values()
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        options = None if takes_any else tuple(p.name for p in parameters)
        _REGISTRY[name] = RewardEntry(name, factory, differentiable, options, rest_into, uses_prompts, weights)
        return factory

    return decorator


def list_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REGISTRY)


def describe_rewards() -> list[dict[str, str]]:
    """One row per registered reward, sorted: name, differentiable (yes / no / depends), weights, summary
    (the first line of the factory's docstring)."""
    rows = []
    for name in list_rewards():
        entry = _REGISTRY[name]
        grad = {True: "yes", False: "no", None: "depends"}[entry.differentiable]
        doc = (inspect.getdoc(entry.factory) or "").strip().splitlines()
        rows.append({"name": name, "differentiable": grad, "weights": entry.weights or "-",
                     "summary": doc[0] if doc else ""})
    return rows


def get_reward_entry(name: str) -> RewardEntry:
    """The registry entry for ``name``; a misspelt name is a :class:`UserError` listing the known ones."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown reward '{name}'{hint}; known rewards: {', '.join(list_rewards())}")
    return _REGISTRY[name]


def parse_reward_spec(spec: RewardSpec) -> tuple[str, dict[str, Any]]:
    """Split a spec into ``(name, options)`` and validate both without building anything.

    Raises:
        UserError: malformed spec, unknown reward name, an option the reward does not take, or a
            composite with no parts.
    """
    if isinstance(spec, Reward):
        return spec.name, {}
    name, options = _parse_reward_spec(spec)
    _require_parts(name, options)
    return name, options


def _parse_reward_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``parse_reward_spec`` without the check that a composite has parts (``load_reward`` may add them)."""
    if isinstance(spec, str):
        name, options = _parse_spec_string(spec)
    elif isinstance(spec, Mapping):
        if len(spec) != 1:
            raise UserError(
                f"reward spec {dict(spec)!r} must have exactly one key, the reward name "
                f"(e.g. {{'clip': {{'model': 'ViT-B-32'}}}})"
            )
        name, value = next(iter(spec.items()))
        if value is None:
            options = {}
        elif isinstance(value, Mapping):
            options = dict(value)
        else:
            raise UserError(f"reward '{name}': options must be a mapping of option: value, got {value!r}")
    else:
        raise UserError(f"a reward spec must be a name, 'name:key=value,...' or a mapping, got {spec!r}")
    entry = get_reward_entry(str(name))
    return entry.name, _check_options(entry, options)


def load_reward(spec: RewardSpec, **options: Any) -> Reward:
    """Build a reward from a spec; keyword ``options`` override those in the spec.

    Examples::

        load_reward("pickscore", device="cuda")
        load_reward("vlm:model=/models/qwen-vl,batch_size=4")
        load_reward({"composite": {"pickscore": 1.0, "aesthetic": 0.1}})
        load_reward("composite", weights={"pickscore": 1.0, "aesthetic": 0.1}, standardize="batch")
    """
    if isinstance(spec, Reward):
        if options:
            raise UserError(f"reward '{spec.name}' is already built; options {sorted(options)} cannot be applied")
        return spec
    name, spec_options = _parse_reward_spec(spec)
    entry = _REGISTRY[name]
    merged = {**spec_options, **_check_options(entry, options)}
    if entry.rest_into and entry.rest_into in spec_options and entry.rest_into in options:
        merged[entry.rest_into] = {**spec_options[entry.rest_into], **options[entry.rest_into]}
    _require_parts(name, merged)
    return entry.factory(**merged)


def options_taken(spec: RewardSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that are not None and that the reward ``spec`` names takes.

    For settings shared by rewards of every kind, e.g. placing each one on the training device::

        load_reward(spec, **options_taken(spec, {"device": device, "dtype": dtype}))

    passes ``device`` to every built-in reward, ``dtype`` to those with weights (and to composite,
    which hands both on to its parts), and neither to a registered reward whose factory does not
    take them. A built :class:`Reward` takes nothing.
    """
    if isinstance(spec, Reward):
        return {}
    accepted = _REGISTRY[_parse_reward_spec(spec)[0]].options
    return {key: value for key, value in options.items() if value is not None and (accepted is None or key in accepted)}


def is_differentiable_spec(spec: RewardSpec) -> bool:
    """Whether the reward a spec names is differentiable, without building it."""
    if isinstance(spec, Reward):
        return spec.differentiable
    name, options = parse_reward_spec(spec)
    entry = _REGISTRY[name]
    if entry.differentiable is not None:
        return entry.differentiable
    if entry.rest_into:  # composite: differentiable iff every part is
        return all(is_differentiable_spec(part) for part in options.get(entry.rest_into, {}))
    return False


def spec_uses_prompts(spec: RewardSpec) -> bool:
    """Whether the reward a spec names reads the prompts (False for aesthetic and rule-based ones)."""
    if isinstance(spec, Reward):
        return True
    name, options = parse_reward_spec(spec)
    entry = _REGISTRY[name]
    if entry.rest_into:
        return any(spec_uses_prompts(part) for part in options.get(entry.rest_into, {}))
    return entry.uses_prompts


def require_differentiable(reward: RewardSpec, where: str) -> None:
    """Raise :class:`UserError` unless ``reward`` (built or a spec) is differentiable.

    Args:
        reward: a built :class:`Reward` or any spec ``parse_reward_spec`` accepts.
        where: the config key that needs the gradient, e.g. ``"draft.reward"``.
    """
    if is_differentiable_spec(reward):
        return
    name = reward.name if isinstance(reward, Reward) else parse_reward_spec(reward)[0]
    examples = ", ".join(n for n in list_rewards() if _REGISTRY[n].differentiable)
    raise UserError(
        f"reward '{name}' is not differentiable; {where} needs a differentiable reward (e.g. {examples})"
    )


def format_reward_spec(name: str, options: Mapping[str, Any]) -> str:
    """The inverse of string parsing: ``("clip", {"model": "ViT-B-32"}) -> "clip:model=ViT-B-32"``."""
    if not options:
        return name
    parts = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
             for key, value in options.items()]
    return f"{name}:{','.join(parts)}"


# ---------------------------------------------------------------------- helpers
def _require_parts(name: str, options: Mapping[str, Any]) -> None:
    """A composite with nothing to sum is a mistake (and would pass as differentiable): say so."""
    rest_into = _REGISTRY[name].rest_into
    if rest_into and not options.get(rest_into):
        raise UserError(f"reward '{name}' needs weights: {rest_into} names no reward; list at least one, "
                        f"e.g. {{{name}: {{pickscore: 1.0, aesthetic: 0.1}}}}")


def _check_options(entry: RewardEntry, options: Mapping[str, Any]) -> dict[str, Any]:
    options = dict(options)
    if entry.options is None:
        return options
    unknown = [key for key in options if key not in entry.options]
    if entry.rest_into:
        rest = options.get(entry.rest_into) or {}
        if not isinstance(rest, Mapping):
            raise UserError(f"reward '{entry.name}': {entry.rest_into} must map reward names to numbers, got {rest!r}")
        rest = dict(rest)
        for key in unknown:
            rest[key] = options.pop(key)
        for part in rest:  # every gathered key must itself be a valid reward spec
            if not isinstance(part, str):
                raise UserError(f"reward '{entry.name}': keys of {entry.rest_into} must be reward names, got {part!r}")
            parse_reward_spec(part)
        if rest or entry.rest_into in options:
            options[entry.rest_into] = rest
        return options
    if unknown:
        close = difflib.get_close_matches(unknown[0], entry.options, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(
            f"reward '{entry.name}' has no option '{unknown[0]}'{hint}; its options are: {', '.join(entry.options)}"
        )
    return options


def _parse_spec_string(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = spec.strip().partition(":")
    if not name:
        raise UserError(f"reward spec {spec!r} has no name; write e.g. 'clip:model=ViT-B-32'")
    options: dict[str, Any] = {}
    for item in _split_top_level(rest):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"reward spec {spec!r}: '{item}' is not key=value; write e.g. '{name}:batch_size=8'")
        options[key.strip()] = _parse_value(raw.strip())
    return name.strip(), options


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"color=[1,0,0],bt_scale=2"`` -> two items."""
    items, depth, current = [], 0, []
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if current or items:
        items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _parse_value(raw: str) -> Any:
    """Type a value the way YAML would; ``1e-3`` (a string in YAML 1.1) becomes a float."""
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return raw
    if isinstance(value, str) and _SCIENTIFIC.match(value):
        return float(value)
    return value
