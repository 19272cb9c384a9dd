"""Request bodies of the HTTP API (pydantic, strict types), OpenAI's and this server's extensions.

Fields OpenAI defines keep its names and meaning; unknown fields are ignored (clients send
optional fields this server does not use), but a known field of the wrong type or out of range is
refused with a message naming it. Extensions: `branches` and `synthesis` (and `family`) on chat
completions, the branch handles, and /v1/parallel.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

Number = StrictInt | StrictFloat


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[TextPart]

    def plain(self) -> dict[str, str]:
        """{role, content} with the content as one string (text parts joined); "developer" as system."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class Sampling(_Body):
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    seed: StrictInt | None = None

    @property
    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class StreamOptions(_Body):
    include_usage: StrictBool = False


class HandoffChoice(_Body):
    convention: Literal["output_tokens", "release"] | None = None
    stop_tokens: Literal["chat", "eos_only"] | None = None


class ChatCompletionRequest(Sampling):
    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(default=1, ge=1, le=1)
    stop: StrictStr | list[StrictStr] | None = None
    # extensions: synthesis over stored branches
    branches: list[StrictStr] | None = None
    synthesis: Literal["cache", "text"] = "cache"
    family: StrictStr | None = None

    @field_validator("stop")
    @classmethod
    def _no_stop(cls, value):
        if value:
            raise ValueError("stop sequences are not supported by this server (generation ends on the model's "
                             "stop tokens or max_tokens)")
        return value


class BranchRequest(Sampling):
    """A worker the server decodes ({model, messages, ...}) or a branch given as text ({model, text},
    `messages` then being the worker prompt the text answers)."""

    model: StrictStr
    messages: list[Message] | None = None
    text: StrictStr | None = None
    handoff: HandoffChoice | None = None


class ParallelRequest(Sampling):
    """K workers on a question, then one synthesis over their branches."""

    model: StrictStr
    question: StrictStr = Field(min_length=1)
    k: StrictInt = Field(alias="K", ge=1, le=64)
    synthesis: Literal["cache", "text"] = "cache"
    synthesis_max_tokens: StrictInt | None = Field(default=None, ge=1)
    family: StrictStr | None = None
    keep_branches: StrictBool = True
