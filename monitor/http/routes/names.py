"""Path parameters shared by several routes, as the router hands them over (match_info)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

# registry.model.is_valid_name: the document promises this much, and handlers answer 400
# for any other name.
NAME_PATTERN = "^[A-Za-z0-9._-]{1,128}$"


def _name(description: str) -> Any:  # a FieldInfo; pydantic types Field as Any
    return Field(pattern=NAME_PATTERN, description=description)


class WorkflowName(BaseModel):
    name: Annotated[str, _name("workflow name")]


class ServiceName(BaseModel):
    service: Annotated[str, _name("service name")]


class InstanceKey(BaseModel):
    service: Annotated[str, _name("service name")]
    id: Annotated[str, _name("instance id")]


class TopicName(BaseModel):
    topic: Annotated[str, _name("event topic")]


class SignalKey(BaseModel):
    id: Annotated[str, _name("process id")]
    name: Annotated[str, _name("signal name")]


class ProcessPageId(BaseModel):
    id: Annotated[str, _name("process id")]


class AssetName(BaseModel):
    name: Annotated[str, _name("asset")]
