"""Record classes for the modules on the CLI's start-up path.

``@record`` gives a class what ``@dataclass(slots=True)`` gives it (``__init__`` from the
annotated fields and their defaults, ``__repr__``, ``__eq__``, slots, optionally frozen), and
``replace()`` copies one with changes. Importing ``dataclasses`` costs ``vdisk info`` more than
all of its own work (it loads ``inspect``, and with it ``re``, ``ast``, ``dis`` and ``enum``), so
the header and lock types use this instead. Type checkers see a dataclass: ``record`` carries
``dataclass_transform``.

Also here, for the same modules (``vdisk convert`` imports the block, copy and qcow2 code, and
importing ``typing`` costs about a bare interpreter start): run-time stand-ins for
``typing.Protocol``, ``runtime_checkable`` and ``NamedTuple``. Modules take them under
``if not TYPE_CHECKING``, so type checkers still see typing's.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform

    T = TypeVar("T")
    R = TypeVar("R")
else:

    def dataclass_transform(**_options: object) -> object:
        return lambda decorated: decorated


class _Factory:
    """A field default made fresh for each instance (``field(default_factory=...)``)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], T]) -> T:
    """A field whose default is ``default_factory()``, called for each new record."""
    return _Factory(default_factory)  # type: ignore[return-value]


def _frozen_setattr(self: object, name: str, value: object = None) -> None:
    raise AttributeError(f"cannot change field {name!r} of a frozen {type(self).__name__}")


def _make_init(fields: tuple[str, ...], defaults: dict[str, object]) -> Callable[..., None]:
    params = []
    body = []
    for name in fields:
        default = defaults.get(name, _make_init)  # _make_init: no default
        if default is _make_init:
            params.append(name)
        elif isinstance(default, _Factory):
            params.append(f"{name}=_absent")
            body.append(f"    if {name} is _absent: {name} = _defaults[{name!r}].make()")
        else:
            params.append(f"{name}=_defaults[{name!r}]")
        body.append(f"    _set(self, {name!r}, {name})")
    source = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body or ["    pass"])
    scope: dict[str, Any] = {"_defaults": defaults, "_absent": _Factory, "_set": object.__setattr__}
    exec(source, scope)  # one generated __init__, as dataclasses does: plain and fast to call
    init: Callable[..., None] = scope["__init__"]
    return init


def _first_init(owner: type, fields: tuple[str, ...], defaults: dict[str, object]) -> Any:
    """``owner.__init__`` until the first record is made: then the generated one replaces it.
    Compiling an ``__init__`` costs ~0.5 M instructions, and most record classes on the CLI's
    path (qcow2 header extensions, bitmap and snapshot tables, compressed writes) make no
    record in a given run."""

    def __init__(self: object, *args: object, **kwargs: object) -> None:
        init = _make_init(fields, defaults)
        type.__setattr__(owner, "__init__", init)
        init(self, *args, **kwargs)

    return __init__


def _repr(self: Any) -> str:
    fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__match_args__)
    return f"{type(self).__qualname__}({fields})"


def _eq(self: Any, other: Any) -> bool:
    if other.__class__ is not self.__class__:
        answer: bool = NotImplemented
        return answer
    return all(getattr(self, n) == getattr(other, n) for n in self.__match_args__)


def _hash(self: Any) -> int:
    return hash(tuple(getattr(self, n) for n in self.__match_args__))


@dataclass_transform(field_specifiers=(field,))
def record(cls: type[R] | None = None, *, frozen: bool = False) -> Any:
    """Make ``cls`` a record of its annotated fields (``@record`` or ``@record(frozen=True)``)."""

    def build(cls: type[R]) -> type[R]:
        # inspect.get_annotations would load inspect, which is what this module avoids.
        fields = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063
        namespace = {k: v for k, v in cls.__dict__.items() if k not in fields}
        defaults = {name: cls.__dict__[name] for name in fields if name in cls.__dict__}
        namespace.pop("__dict__", None)
        namespace.pop("__weakref__", None)
        namespace.update(
            __qualname__=cls.__qualname__,
            __slots__=fields,
            __match_args__=fields,
            __repr__=_repr,
            __eq__=_eq,
        )
        if frozen:
            namespace.update(
                __setattr__=_frozen_setattr, __delattr__=_frozen_setattr, __hash__=_hash
            )
        else:
            namespace["__hash__"] = None  # mutable and comparable: unhashable, like a dataclass
        made: type[R] = type(cls.__name__, cls.__bases__, namespace)
        type.__setattr__(made, "__init__", _first_init(made, fields, defaults))
        return made

    return build if cls is None else build(cls)


if not TYPE_CHECKING:

    class Protocol:
        """``typing.Protocol`` at run time: a plain base class (its methods are never called)."""

    class _ByMembers(type):
        """isinstance() as for a runtime-checkable protocol: the object has every member."""

        def __instancecheck__(cls, obj):
            return all(getattr(obj, name, None) is not None for name in cls._protocol_members)

    def runtime_checkable(cls):
        """``typing.runtime_checkable``: isinstance() checks the public members ``cls`` names."""
        namespace = dict(cls.__dict__)
        namespace.pop("__dict__", None)
        namespace.pop("__weakref__", None)
        members = [n for n in namespace if not n.startswith("_")]
        namespace["_protocol_members"] = tuple(members)
        return _ByMembers(cls.__name__, cls.__bases__, namespace)

    class _NamedTupleMeta(type):
        def __new__(mcls, name, bases, namespace):
            if not bases:  # NamedTuple itself
                return super().__new__(mcls, name, bases, namespace)
            from collections import namedtuple

            fields = tuple(namespace.get("__annotations__", {}))
            defaults = [namespace[f] for f in fields if f in namespace]
            made = namedtuple(name, fields, defaults=defaults, module=namespace["__module__"])
            skip = {*fields, "__annotations__", "__module__", "__dict__", "__weakref__"}
            for key, value in namespace.items():
                if key not in skip:
                    setattr(made, key, value)
            return made

    class NamedTuple(metaclass=_NamedTupleMeta):
        """``typing.NamedTuple``'s class syntax at run time: a collections.namedtuple of the
        annotated fields (defaults and methods kept)."""


def replace(obj: R, **changes: Any) -> R:
    """A copy of the record ``obj`` with ``changes`` to some fields."""
    values = {name: getattr(obj, name) for name in obj.__match_args__}  # type: ignore[attr-defined]
    values.update(changes)
    return type(obj)(**values)
