"""The model's chat template (Jinja2, from the GGUF metadata) applied to messages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ModelError
from .params import Message, check_messages


class ChatTemplate:
    """Formats messages into the prompt text the model was trained on.

    Args:
        template: the ``tokenizer.chat_template`` string (None or empty: the model has none).
        bos_text, eos_text: the model's BOS/EOS token texts, which templates may use.
        model_name: for the error message when there is no template.
    """

    def __init__(self, template: str | None, *, bos_text: str, eos_text: str,
                 model_name: str) -> None:
        self.template = template
        self._bos, self._eos, self._name = bos_text, eos_text, model_name
        self._formatter: Any = None

    def format(self, messages: str | Sequence[Message]) -> str:
        """The prompt text for ``messages`` (validated first)."""
        msgs = check_messages(messages)
        if self._formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            if not self.template:
                raise ModelError(
                    f"{self._name} has no chat template in its GGUF metadata; "
                    "use complete() with your own prompt format"
                )
            try:
                self._formatter = Jinja2ChatFormatter(
                    template=self.template, eos_token=self._eos, bos_token=self._bos)
            except Exception as e:  # a damaged template does not compile
                raise ModelError(
                    f"the chat template in {self._name}'s GGUF metadata is invalid ({e}); "
                    "use complete() with your own prompt format") from e
        try:
            return str(self._formatter(messages=msgs).prompt)
        except Exception as e:
            raise ValueError(f"the model's chat template rejected these messages: {e}") from e
