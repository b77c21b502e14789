"""The training methods by name: the one place a method is registered, and where the modules
below the methods read their names and defaults without importing them (the methods import
``config``, so ``config`` cannot import the methods): ``config`` checks ``--method`` and fills in
β, the model card takes each method's title and settings. As PEFT's ``register_peft_method``,
registering fills a mapping both sides share; ``methods/__init__.py`` registers every method, and
importing ``cure_hub`` imports it."""

from __future__ import annotations

#: Method name -> its class (a :class:`cure_hub.methods.base.Method`), in the order registered.
METHOD_CLASSES: dict[str, type] = {}


def register_method(method_class: type) -> type:
    """Make ``method_class`` trainable as ``--method <its name>``: the one registration of a method."""
    registered = METHOD_CLASSES.setdefault(method_class.name, method_class)
    if registered is not method_class:
        raise ValueError(f"two methods are named {method_class.name!r}: {registered.__name__} and {method_class.__name__}")
    return method_class
