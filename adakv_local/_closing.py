"""``with`` support for the classes that own native memory and free it in ``close()``."""

from __future__ import annotations

from typing import TypeVar

_T = TypeVar("_T", bound="Closing")


class Closing:
    """Mixin: ``with obj: ...`` calls ``obj.close()`` on exit; subclasses define ``close``."""

    def close(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
