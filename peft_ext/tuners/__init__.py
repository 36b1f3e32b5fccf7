"""Our own peft methods, and the one way we add a method to peft.

Importing this package registers them with peft: the bottleneck adapters, and SIBO's LoRA (`peft_ext.sibo`).

peft registers a method with `peft.utils.register_peft_method(name=...)`, which only accepts names that are
already members of its `PeftType` enum, and Python enums are closed to new members. `add_peft_type` adds
the member the way the enum module itself does (the member object, then its entries in the class's name
and value tables), so that everything peft does with a peft type works unchanged for ours:
`PeftType("BOTTLENECK")`, `PeftType.BOTTLENECK.value`, the registry dicts, `adapter_config.json`'s
`"peft_type"`. It touches Python's enum internals, not peft's; `tests/test_bottleneck.py` checks it
against the installed peft and Python and fails loudly if an upgrade breaks it.
"""
from peft.utils import PeftType, register_peft_method

_ADDED: set[str] = set()


def add_peft_type(name: str) -> PeftType:
    """The `PeftType` member for `name` (e.g. "BOTTLENECK"), added to the enum if peft lacks it."""
    if name in PeftType.__members__:
        if name in _ADDED:
            return PeftType[name]
        raise RuntimeError(
            f"peft now defines PeftType.{name} itself; peft_ext's {name.lower()} method would clash with it. "
            "Pin peft to the range in requirements.txt or rename our method."
        )
    try:
        member = str.__new__(PeftType, name)
        member._name_ = name
        member._value_ = name
        member.__objclass__ = PeftType
        member._sort_order_ = len(PeftType._member_names_)
        setattr(PeftType, name, member)  # before the member tables: the enum forbids reassigning members
        PeftType._member_names_.append(name)
        PeftType._member_map_[name] = member
        PeftType._value2member_map_[name] = member
    except (AttributeError, TypeError) as e:
        raise RuntimeError(
            f"cannot add {name} to peft's PeftType on this Python ({e}); the enum internals changed"
        ) from e
    _ADDED.add(name)
    return member


def register_method(name: str, config_cls, model_cls) -> None:
    """Register a peft method under `name` (lower case) through peft's public registration."""
    add_peft_type(name.upper())
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)


from peft_ext.tuners.bottleneck import BottleneckConfig, BottleneckModel  # noqa: E402  (registers it)
from peft_ext import sibo  # noqa: E402,F401  (registers SIBO's LoRA)

__all__ = ["BottleneckConfig", "BottleneckModel", "add_peft_type", "register_method"]
