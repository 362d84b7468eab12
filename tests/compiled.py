"""Counting a compiled fast path (migration_assets/atproto/_fastrepo.c) where a module calls it, so a test can
tell the compiled path was taken, not only that the result is right (the Python reference gives the same)."""


class CountedCalls:
    """Stands in for the compiled module in one caller: `name` is counted (calls, and those it answered
    rather than leaving to the Python path with None); every other function is the module's own."""

    def __init__(self, module, name: str) -> None:
        self._module, self._name = module, name
        self.calls = self.answered = 0

    def __getattr__(self, attribute: str):
        function = getattr(self._module, attribute)
        if attribute != self._name:
            return function

        def counted(*args):
            result = function(*args)
            self.calls += 1
            self.answered += result is not None
            return result

        return counted


def count_compiled(monkeypatch, caller, name: str) -> CountedCalls:
    """The compiled `name` as `caller` (a module holding it as `_fastrepo`) calls it, counted."""
    counted = CountedCalls(caller._fastrepo, name)
    monkeypatch.setattr(caller, "_fastrepo", counted)
    return counted
