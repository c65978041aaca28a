"""warn_user: warnings point at the user's line, past adapt's and torch's frames."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from adapt.core.errors import warn_user


def _library_function(module: str, callee: Callable[[], None]) -> Callable[[], None]:
    """A function whose frame belongs to ``module`` (as code in that package would) and calls
    ``callee``."""
    namespace: dict[str, Any] = {"__name__": module, "callee": callee}
    exec("def call():\n    callee()\n", namespace)
    return namespace["call"]  # type: ignore[no-any-return]


def _warning_in(module: str, category: type[Warning] = UserWarning) -> Callable[[], None]:
    """A function in ``module`` that calls warn_user itself."""
    namespace: dict[str, Any] = {"__name__": module, "warn_user": warn_user, "cat": category}
    exec("def call():\n    warn_user('deep', cat)\n", namespace)
    return namespace["call"]  # type: ignore[no-any-return]


def _record(fn: Callable[[], None]) -> warnings.WarningMessage:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fn()
    assert len(record) == 1
    return record[0]


def test_direct_call_points_at_the_caller() -> None:
    w = _record(lambda: warn_user("hello"))
    assert w.filename == __file__ and str(w.message) == "hello"
    assert w.category is UserWarning


def test_library_frames_are_skipped() -> None:
    inner = _warning_in("adapt.core.fake", RuntimeWarning)
    middle = _library_function("torch.optim.fake", inner)
    outer = _library_function("transformers.fake", middle)
    w = _record(outer)  # user → transformers → torch → adapt → warn_user
    assert w.filename == __file__ and w.category is RuntimeWarning


def test_other_packages_count_as_user_code() -> None:
    inner = _warning_in("adapt.core.fake")
    plugin = _library_function("adapt_gated_linear.layer", inner)  # a plugin is user code
    w = _record(plugin)
    assert w.filename == "<string>"  # the plugin's frame (exec'd code), not this file


def test_a_warning_from_library_code_alone_would_not_point_here() -> None:
    """Control: called directly, the library function's own frame is skipped too."""
    assert _record(_warning_in("adapt.core.fake")).filename == __file__
