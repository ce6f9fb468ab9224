"""A tiny declarative schema language for our messages.

Each message is a frozen dataclass whose fields carry a :class:`Spec` (type and limits). The same specs
  * validate values decoded from the wire (raising :class:`SchemaError` with the field's path),
  * convert dataclasses to plain msgpack-able values and back,
  * and describe themselves as JSON for proto/schema.json, so the spec can never drift from the code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import SchemaError

U64_MAX = (1 << 64) - 1


class Spec:
    """The type and limits of one field."""

    def check(self, value: Any, path: str) -> Any:  # wire value -> python value
        raise NotImplementedError

    def to_wire(self, value: Any) -> Any:  # python value -> wire value
        return value

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Spec):
    min: int = 0
    max: int = U64_MAX

    def check(self, value: Any, path: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(f"expected an integer, got {_type_name(value)}", path=path)
        if not self.min <= value <= self.max:
            raise SchemaError(f"{value} is outside [{self.min}, {self.max}]", path=path)
        return value

    def describe(self) -> dict[str, Any]:
        return {"type": "int", "min": self.min, "max": self.max}


@dataclass(frozen=True)
class Float(Spec):
    """A finite float64 in [min, max]."""

    min: float = -math.inf
    max: float = math.inf

    def check(self, value: Any, path: str) -> float:
        if not isinstance(value, float):
            raise SchemaError(f"expected a float64, got {_type_name(value)}", path=path)
        if not math.isfinite(value) or not self.min <= value <= self.max:
            raise SchemaError(f"{value} is outside [{self.min}, {self.max}]", path=path)
        return value

    def to_wire(self, value: Any) -> float:
        return float(value)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "float64"}
        if math.isfinite(self.min):
            d["min"] = self.min
        if math.isfinite(self.max):
            d["max"] = self.max
        return d


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise SchemaError(f"expected a boolean, got {_type_name(value)}", path=path)
        return value

    def describe(self) -> dict[str, Any]:
        return {"type": "bool"}


@dataclass(frozen=True)
class Bytes(Spec):
    min_len: int = 0
    max_len: int = 1 << 20

    @classmethod
    def exactly(cls, n: int) -> "Bytes":
        return cls(n, n)

    def check(self, value: Any, path: str) -> bytes:
        if not isinstance(value, bytes):
            raise SchemaError(f"expected bytes, got {_type_name(value)}", path=path)
        if not self.min_len <= len(value) <= self.max_len:
            size = f"exactly {self.min_len}" if self.min_len == self.max_len else f"{self.min_len}..{self.max_len}"
            raise SchemaError(f"{len(value)} bytes, expected {size}", path=path)
        return value

    def describe(self) -> dict[str, Any]:
        return {"type": "bin", "min_len": self.min_len, "max_len": self.max_len}


@dataclass(frozen=True)
class Str(Spec):
    """A UTF-8 string of at most ``max_len`` bytes (encoded)."""

    max_len: int = 256
    min_len: int = 0

    def check(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise SchemaError(f"expected a string, got {_type_name(value)}", path=path)
        n = len(value.encode("utf-8"))
        if not self.min_len <= n <= self.max_len:
            raise SchemaError(f"string of {n} bytes, expected {self.min_len}..{self.max_len}", path=path)
        return value

    def describe(self) -> dict[str, Any]:
        return {"type": "str", "min_len": self.min_len, "max_len": self.max_len}


@dataclass(frozen=True)
class Enum(Spec):
    """A string from a fixed set."""

    values: tuple[str, ...]

    def check(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in self.values:
            raise SchemaError(f"expected one of {', '.join(self.values)}, got {value!r:.40}", path=path)
        return value

    def describe(self) -> dict[str, Any]:
        return {"type": "enum", "values": list(self.values)}


@dataclass(frozen=True)
class Optional(Spec):
    """``nil`` or a value of ``inner``. The field is always present on the wire."""

    inner: Spec

    def check(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.check(value, path)

    def to_wire(self, value: Any) -> Any:
        return None if value is None else self.inner.to_wire(value)

    def describe(self) -> dict[str, Any]:
        return {"type": "optional", "of": self.inner.describe()}


@dataclass(frozen=True)
class List(Spec):
    item: Spec
    max_items: int = 256
    min_items: int = 0

    def check(self, value: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise SchemaError(f"expected an array, got {_type_name(value)}", path=path)
        if not self.min_items <= len(value) <= self.max_items:
            raise SchemaError(f"{len(value)} items, expected {self.min_items}..{self.max_items}", path=path)
        return tuple(self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value))

    def to_wire(self, value: Any) -> list[Any]:
        return [self.item.to_wire(v) for v in value]

    def describe(self) -> dict[str, Any]:
        return {"type": "array", "of": self.item.describe(), "min_items": self.min_items, "max_items": self.max_items}


@dataclass(frozen=True)
class Struct(Spec):
    """A nested :class:`Record`."""

    cls: type["Record"]

    def check(self, value: Any, path: str) -> "Record":
        return self.cls.from_wire(value, path)

    def to_wire(self, value: Any) -> dict[str, Any]:
        return value.to_wire()

    def describe(self) -> dict[str, Any]:
        return {"type": "struct", "name": self.cls.__name__}


def spec(s: Spec, **kwargs: Any) -> Any:
    """Attach a wire spec to a dataclass field: ``name: int = spec(Int(max=10))``."""
    return dataclasses.field(metadata={"spec": s}, **kwargs)


class Record:
    """Base class of structs and messages. Subclasses are ``@dataclass(frozen=True)`` with ``spec`` fields.

    On the wire a record is a msgpack map from field names to values; every field is present (optional
    fields as nil) and no other key is allowed.
    """

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    @classmethod
    def wire_fields(cls) -> list[tuple[str, Spec]]:
        cached = cls.__dict__.get("_wire_fields_cache")
        if cached is None:
            cached = [(f.name, f.metadata["spec"]) for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
            setattr(cls, "_wire_fields_cache", cached)
        return cached

    def to_wire(self) -> dict[str, Any]:
        return {name: s.to_wire(getattr(self, name)) for name, s in self.wire_fields()}

    @classmethod
    def from_wire(cls, value: Any, path: str = "") -> Any:
        path = path or cls.__name__
        if not isinstance(value, dict):
            raise SchemaError(f"expected a map, got {_type_name(value)}", path=path)
        fields = cls.wire_fields()
        names = {name for name, _ in fields}
        missing = [name for name in names if name not in value]
        if missing:
            raise SchemaError(f"missing field(s) {', '.join(sorted(missing))}", path=path)
        unknown = [key for key in value if key not in names]
        if unknown:
            raise SchemaError(f"unknown field(s) {', '.join(sorted(unknown))}", path=path)
        return cls(**{name: s.check(value[name], f"{path}.{name}") for name, s in fields})

    def validate(self) -> None:
        """Check this record against its own schema (used before signing, so we never send garbage)."""
        type(self).from_wire(self.to_wire())

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "fields": [
                {"name": name, **s.describe(), "doc": _field_doc(cls, name)} for name, s in cls.wire_fields()
            ]
        }


def _field_doc(cls: type, name: str) -> str:
    return getattr(cls, "FIELD_DOCS", {}).get(name, "")


def _type_name(value: Any) -> str:
    if value is None:
        return "nil"
    return {dict: "map", list: "array", bytes: "bytes", str: "string", bool: "boolean", float: "float"}.get(
        type(value), type(value).__name__
    )
