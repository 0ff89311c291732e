"""Issue "The house, second pass": every error a command can meet is bad input (exit 2) or a run that had to stop
(exit 1; 75 for a stop on request), so the CLI needs no list of error classes."""

import importlib
import inspect
import pkgutil

import pytest

import scalevec
from scalevec.cli import main
from scalevec.errors import BadInput, RunStopped


def package_exceptions() -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(scalevec.__path__, "scalevec."):
        if info.name.startswith("scalevec.export.remote") or info.name == "scalevec.__main__":  # not library code
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_exception_class_of_the_package_is_one_of_the_two():
    found = package_exceptions()
    assert len(found) >= 10  # ConfigError, DataError, ExportError, HFImportError, CheckpointError, StoppedEarly, ...
    strays = [name for name, cls in found.items() if not issubclass(cls, (BadInput, RunStopped))]
    assert not strays, f"neither BadInput nor RunStopped: {strays}"
    assert not [name for name, cls in found.items() if issubclass(cls, BadInput) and issubclass(cls, RunStopped)]


def test_exit_codes_follow_the_base(monkeypatch, capsys):
    from scalevec import cli
    from scalevec.checkpoint import CheckpointError
    from scalevec.optim.policy import PolicyError
    from scalevec.train.preempt import StoppedEarly

    for error, code in ((PolicyError("bad table"), 2), (CheckpointError("torn file"), 1),
                        (StoppedEarly("stopped at step 3; continue with --resume"), 75)):
        def fail(args, error=error):
            raise error
        monkeypatch.setattr(cli, "cmd_env", fail)
        assert main(["env"]) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(error) in err
        assert ("error:" in err) == (code != 75)


@pytest.mark.parametrize("cls", [BadInput, RunStopped])
def test_bases_are_the_builtin_kinds_callers_expect(cls):
    assert issubclass(cls, ValueError if cls is BadInput else RuntimeError)


def test_import_apply_and_convert_errors_are_named_for_what_failed():
    from scalevec.apply import ApplyError
    from scalevec.convert import ConvertError
    from scalevec.export import ExportError
    from scalevec.hf_import import HFImportError

    for cls in (ApplyError, ConvertError, HFImportError):
        assert issubclass(cls, BadInput) and not issubclass(cls, ExportError), cls
