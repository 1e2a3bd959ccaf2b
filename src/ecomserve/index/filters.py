"""The catalog filter language of `search` (and `similar`): the `FILTER` input, a JSON object over catalog fields,
fields AND-ed.

    {"brand": "ASICS"}                              equality
    {"brand": {"in": ["Yeti", "Hydro Flask"]}}      membership
    {"price": {"gte": 50, "lte": 300}}              ranges: gte, gt, lte, lt (AND-ed within the field too)
    {"in_stock": true}
    {"attributes.color": "black"}                   an attribute (string, number or bool)

`category` and `brand` take strings, `price` numbers, `in_stock` booleans, `attributes.<name>` any of the three
(ranges: numbers only). An item without the field never matches. Values compare by kind: the attribute 42 matches
42 and 42.0, not "42" or true.

`parse_filter` turns the JSON into an `ItemFilter` or raises InvalidInput naming what is wrong (an unknown field or
operator, a value of the wrong type, malformed JSON, too large). An `ItemFilter` matches an item's fields
(`matches`, what faiss selects rows with) and translates to a Milvus boolean expression over the collection's JSON
field (`milvus_expression`), every string written as a JSON string literal, which Milvus reads with the same
escapes."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property

from ecomserve.errors import InvalidInput

FILTER_MAX_BYTES = 4096
FILTER_MAX_FIELDS = 16
FILTER_MAX_IN = 256  # values in one `in` list
NUMBER_MAX = 1e15  # prices and numeric values, either sign: written as plain decimals for Milvus
# Catalog-side bounds, shared by the catalog reader (catalog.py).
ATTRIBUTE_MAX = 32  # attributes per item
ATTRIBUTE_NAME_MAX_BYTES = 64
VALUE_MAX_BYTES = 256  # category, brand, string attribute values, string filter values
# An attribute name: no dot (it would be ambiguous in `attributes.<name>`) and no control characters.
ATTRIBUTE_NAME = re.compile(r"[^.\x00-\x1f\x7f]+")

STRING_FIELDS = ("category", "brand")
FIELDS = ("category", "brand", "price", "in_stock")
ATTRIBUTES = "attributes"
RANGES = ("gte", "gt", "lte", "lt")
OPERATORS = ("in", *RANGES)
_MILVUS_OPS = {"eq": "==", "gte": ">=", "gt": ">", "lte": "<=", "lt": "<"}

Scalar = str | int | float | bool


@dataclass(frozen=True)
class Condition:
    field: str  # "brand", "price", "attributes.color"
    op: str  # "eq", "in", "gte", "gt", "lte", "lt"
    value: Scalar | tuple[Scalar, ...]

    @cached_property
    def path(self) -> tuple[str, ...]:
        return tuple(_path(self.field))

    def matches(self, fields: Mapping) -> bool:
        found: object = fields
        for part in self.path:
            if not isinstance(found, dict):  # dict, not Mapping: this runs per item and ABC checks are slow
                return False
            found = found.get(part)
        if found is None:
            return False
        if self.op == "eq":
            return _same(found, self.value)
        if self.op == "in":
            return any(_same(found, value) for value in self.value)
        if not _is_number(found):
            return False
        bound = self.value
        return {"gte": found >= bound, "gt": found > bound, "lte": found <= bound, "lt": found < bound}[self.op]

    def milvus(self, column: str) -> str:
        path = column + "".join(f"[{_string(part)}]" for part in self.path)
        if self.op == "in":
            return f"{path} in [{', '.join(_literal(value) for value in self.value)}]"
        return f"{path} {_MILVUS_OPS[self.op]} {_literal(self.value)}"


@dataclass(frozen=True)
class ItemFilter:
    conditions: tuple[Condition, ...]

    def matches(self, fields: Mapping | None) -> bool:
        """Whether an item with these catalog fields (`CatalogItem.filter_fields()`) passes."""
        if not fields:
            return False  # every condition needs a field
        for condition in self.conditions:
            if not condition.matches(fields):
                return False
        return True

    def milvus_expression(self, column: str = "fields") -> str:
        """The Milvus boolean expression over the JSON field `column` that holds each item's catalog fields."""
        return " and ".join(f"({condition.milvus(column)})" for condition in self.conditions)

    @property
    def key(self) -> str:
        """A canonical text of the filter (the same for any key order), for cache keys."""
        return json.dumps([[c.field, c.op, c.value] for c in sorted(self.conditions, key=_order)])


def parse_filter(value: str | bytes | Mapping, name: str = "FILTER") -> ItemFilter | None:
    """The typed filter of a FILTER value (JSON text or an already decoded object); None for `{}` (no filter)."""
    if isinstance(value, bytes | str):
        raw = value.encode("utf-8") if isinstance(value, str) else value
        if len(raw) > FILTER_MAX_BYTES:
            raise InvalidInput(f"{name}: {len(raw)} bytes, at most {FILTER_MAX_BYTES}")
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"{name}: not valid UTF-8") from None
        except RecursionError:
            raise InvalidInput(f"{name}: nested too deep") from None
        except ValueError as exc:
            raise InvalidInput(f"{name}: malformed JSON ({exc})") from None
    if not isinstance(value, Mapping):
        raise InvalidInput(f'{name}: expected a JSON object such as {{"brand": "ASICS"}}, got {_kind(value)}')
    if len(value) > FILTER_MAX_FIELDS:
        raise InvalidInput(f"{name}: {len(value)} fields, at most {FILTER_MAX_FIELDS}")
    conditions: list[Condition] = []
    for field, spec in value.items():
        _check_field(field, name)
        where = f"{name} field {field!r}"
        if isinstance(spec, Mapping):
            if not spec:
                raise InvalidInput(f"{where}: an empty operator object; use one of {', '.join(OPERATORS)}")
            for op, operand in spec.items():
                if op not in OPERATORS:
                    raise InvalidInput(f"{where}: unknown operator {op!r}; use one of {', '.join(OPERATORS)}")
                conditions.append(_condition(field, op, operand, f"{where} {op!r}"))
        else:
            conditions.append(_condition(field, "eq", spec, where))
    return ItemFilter(tuple(conditions)) if conditions else None


def _check_field(field: str, name: str) -> None:
    if field in FIELDS:
        return
    prefix = ATTRIBUTES + "."
    if field.startswith(prefix):
        attribute = field[len(prefix) :]
        if ATTRIBUTE_NAME.fullmatch(attribute) and len(attribute.encode("utf-8")) <= ATTRIBUTE_NAME_MAX_BYTES:
            return
        raise InvalidInput(
            f"{name}: bad attribute name in {field[:80]!r}: 1 to {ATTRIBUTE_NAME_MAX_BYTES} bytes, no dot or "
            "control character"
        )
    known = ", ".join((*FIELDS, "attributes.<name>"))
    raise InvalidInput(f"{name}: unknown field {field[:80]!r}; filterable fields: {known}")


def _condition(field: str, op: str, operand: object, where: str) -> Condition:
    if op == "in":
        if not isinstance(operand, list) or not operand:
            raise InvalidInput(f"{where}: expected a non-empty list of values, got {_kind(operand)}")
        if len(operand) > FILTER_MAX_IN:
            raise InvalidInput(f"{where}: {len(operand)} values, at most {FILTER_MAX_IN}")
        return Condition(field, op, tuple(_value(field, item, where) for item in operand))
    if op in RANGES:
        if not _is_number(operand):
            raise InvalidInput(f"{where}: expected a number, got {_kind(operand)}")
        if field in STRING_FIELDS or field == "in_stock":
            raise InvalidInput(f"{where}: ranges apply to numbers (price, numeric attributes), not to {field}")
        return Condition(field, op, _number(operand, where))
    return Condition(field, op, _value(field, operand, where))


def _value(field: str, value: object, where: str) -> Scalar:
    if field in STRING_FIELDS:
        expected, ok = "a string", isinstance(value, str)
    elif field == "price":
        expected, ok = "a number", _is_number(value)
    elif field == "in_stock":
        expected, ok = "true or false", isinstance(value, bool)
    else:
        expected, ok = "a string, number or boolean", isinstance(value, str | bool) or _is_number(value)
    if not ok:
        raise InvalidInput(f"{where}: expected {expected}, got {_kind(value)}")
    if isinstance(value, str):
        if len(value.encode("utf-8")) > VALUE_MAX_BYTES:
            raise InvalidInput(f"{where}: a string of {len(value.encode('utf-8'))} bytes, at most {VALUE_MAX_BYTES}")
        return value
    return value if isinstance(value, bool) else _number(value, where)


def _number(value: int | float, where: str) -> int | float:
    if abs(value) > NUMBER_MAX or not math.isfinite(value):  # abs first: a huge int overflows isfinite
        raise InvalidInput(f"{where}: {value} is out of range (finite, at most {NUMBER_MAX:g} either sign)")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same(found: object, wanted: Scalar) -> bool:
    """Equality within one kind: booleans are not numbers here."""
    if isinstance(wanted, bool) or isinstance(found, bool):
        return isinstance(wanted, bool) and isinstance(found, bool) and found == wanted
    if isinstance(wanted, str) or isinstance(found, str):
        return isinstance(wanted, str) and isinstance(found, str) and found == wanted
    return _is_number(found) and found == wanted


def _path(field: str) -> list[str]:
    prefix = ATTRIBUTES + "."
    return [ATTRIBUTES, field[len(prefix) :]] if field.startswith(prefix) else [field]


def _string(text: str) -> str:
    # Milvus string literals take double quotes with backslash escapes, as JSON writes them.
    return json.dumps(text, ensure_ascii=False)


def _literal(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, int):
        return str(value)
    # Milvus does not read exponents (1e2): a plain decimal, exactly the float's shortest repr.
    return format(Decimal(repr(float(value))), "f")


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if _is_number(value):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _order(condition: Condition) -> tuple[str, str]:
    return condition.field, condition.op
