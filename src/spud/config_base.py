"""The strict base of every config section: unknown keys are errors, and no silent coercion (a
boolean is not an integer, 64.0 is not an int), for YAML and `key=value` overrides alike."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _scalar_kinds(ann: Any) -> set[Any]:
    """The plain types a field annotation accepts: `int | None` → {int, NoneType}."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return set().union(*(_scalar_kinds(a) for a in typing.get_args(ann)))
    return {ann}


def _strict_scalar(value: Any, kinds: set[Any]) -> None:
    """Pydantic's lax mode turns `true` into 1 and `64.0` into 64; a config value of the wrong
    kind is almost always a mistake (a shifted YAML line, a misread override), so refuse it."""
    if int in kinds and bool not in kinds:
        if isinstance(value, bool):
            raise ValueError(f"{str(value).lower()} is a boolean, not an integer")
        if isinstance(value, float) and float not in kinds:
            hint = f"; write {int(value)}" if value.is_integer() else ""
            raise ValueError(f"{value!r} is a float, not an integer{hint}")
    if float in kinds and bool not in kinds and isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is a boolean, not a number")
    if bool in kinds and int not in kinds and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        raise ValueError(f"{value!r} is not a boolean; write true or false")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_silent_coercion(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        ann = field.annotation
        if typing.get_origin(ann) is list and isinstance(value, list):  # e.g. list[int]
            kinds = _scalar_kinds(typing.get_args(ann)[0]) if typing.get_args(ann) else set()
            for item in value:
                _strict_scalar(item, kinds)
            return value
        _strict_scalar(value, _scalar_kinds(ann))
        return value
