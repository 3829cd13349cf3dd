"""metadd_fast.argcheck: the library's argument checks (one error base, messages naming the
argument, what was expected and what was given)."""
import math

import numpy as np
import pytest
import torch

from metadd_fast import argcheck as ac
from metadd_fast.errors import InputError, InputTypeError


def refused(kind, match, f, *args, **kw):
    with pytest.raises(kind, match=match) as info:
        f(*args, **kw)
    assert isinstance(info.value, InputError)  # one base: programs and the CLI catch every one alike
    return str(info.value)


def test_type_errors_are_input_errors():
    assert issubclass(InputTypeError, TypeError) and issubclass(InputTypeError, InputError)
    assert issubclass(InputError, ValueError)


@pytest.mark.parametrize("value", [True, 1.0, "3", None, torch.tensor(3)])
def test_counts_are_ints(value):
    refused(InputTypeError, "^ipc: expected an int >= 1, got ", ac.positive_int, "ipc", value)


def test_count_ranges_and_normalization():
    assert ac.positive_int("ipc", np.int64(7)) == 7 and type(ac.positive_int("ipc", np.int64(7))) is int
    refused(InputError, r"^ipc: expected an int >= 1, got 0$", ac.positive_int, "ipc", 0)
    refused(InputError, r"and <= 2\*\*62", ac.positive_int, "ipc", 2 ** 70)
    refused(InputError, r"^seed: expected an int in \[0, 2\*\*63 - 1\], got ", ac.seed, "seed", 2 ** 70)
    refused(InputError, r"^seed: .* got -1$", ac.seed, "seed", -1)
    assert ac.seed("seed", 2 ** 63 - 1) == 2 ** 63 - 1
    assert ac.integer("k", 5, 1, 5) == 5
    refused(InputError, r"^k: expected an int in \[1, 5\], got 6$", ac.integer, "k", 6, 1, 5)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, -1e-9])
def test_positive_float(value):
    refused(InputError, r"^lr: expected a finite float > 0, got ", ac.positive_float, "lr", value)


def test_floats():
    assert ac.positive_float("lr", 2) == 2.0 and type(ac.positive_float("lr", 2)) is float
    refused(InputTypeError, "^lr: expected a finite float > 0, got bool$", ac.positive_float, "lr", True)
    refused(InputTypeError, "got str", ac.finite_float, "x", "1.0")
    refused(InputError, "^x: expected a finite float, got 1000000", ac.finite_float, "x", 10 ** 400)
    assert ac.fraction("alpha", 1) == 1.0
    refused(InputError, r"^alpha: expected a finite float in \(0, 1\], got 0.0$", ac.fraction, "alpha", 0.0)
    assert ac.nonnegative_float("w", 0) == 0.0
    refused(InputError, ">= 0", ac.nonnegative_float, "w", -0.5)


def test_boolean_choice_optional_no_effect():
    assert ac.boolean("relu", False) is False
    refused(InputTypeError, "^relu: expected a bool, got int$", ac.boolean, "relu", 1)
    assert ac.choice("init", "real", ("real", "noise")) == "real"
    refused(InputError, "^init: expected one of 'real', 'noise', got ", ac.choice, "init", torch.ones(2),
            ("real", "noise"))
    refused(InputError, "got 1$", ac.choice, "init", 1, (True, "x"))  # 1 == True, but it is not True
    assert ac.optional(ac.positive_int, "n", None) is None
    ac.no_effect("lr_net", 0.01, 0.01, "without DC")
    refused(InputError, r"^lr_net: has no effect for DM; expected 0.01 \(the default\), got 0.1$",
            ac.no_effect, "lr_net", 0.1, 0.01, "for DM")


def test_tensors():
    x = torch.zeros(2, 3, 8, 8)
    assert ac.images("images", x, channels=3, min_size=8) is x
    refused(InputTypeError, "^images: expected a floating tensor", ac.images, "images", x.long())
    refused(InputTypeError, "^images: expected a tensor, got list", ac.images, "images", [1.0])
    refused(InputError, r"^images: expected a 4-D \(B, C, H, W\) tensor, got shape \(3, 8, 8\)", ac.images,
            "images", x[0])
    refused(InputError, "^images: expected 1 channels", ac.images, "images", x, channels=1)
    refused(InputError, "at least 16x16", ac.images, "images", x, min_size=16)
    refused(InputError, "^images: expected a non-empty tensor", ac.images, "images", x[:0])
    x[0, 0, 0, 0] = math.nan
    ac.images("images", x)
    refused(InputError, "^images: expected finite values, got NaN or Inf", ac.images, "images", x, finite=True)
    y = torch.tensor([0, 2, 9])
    assert ac.labels("labels", y, n=3, num_classes=10) is y
    refused(InputError, r"^labels: expected values in \[0, 5\), got values in \[0, 9\]", ac.labels, "labels", y,
            num_classes=5)
    refused(InputTypeError, "^labels: expected an integer tensor", ac.labels, "labels", y.float())
    refused(InputError, r"^labels: expected a tensor of shape \(4,\), got shape \(3,\)", ac.labels, "labels", y,
            n=4)
    refused(InputError, "^t: expected a tensor on meta, got one on cpu", ac.tensor, "t", y, dtype="integer",
            device="meta")
    refused(InputTypeError, "^t: expected a torch.float64 tensor, got torch.int64", ac.tensor, "t", y,
            dtype=torch.float64)


def test_cli_reports_library_type_errors_on_one_line(monkeypatch, capsys):
    """An InputTypeError from the library ends like every InputError: one line, status 2."""
    from cli_helpers import one_line, run_main
    from metadd_fast import cli

    def bad(args):
        ac.positive_float("lr", "0.1")

    monkeypatch.setitem(cli.COMMANDS, "info", bad)
    code, err = run_main(["info"], capsys)
    assert code == 2
    assert one_line(err) == "metadd-fast info: lr: expected a finite float > 0, got str"


def test_cli_refuses_arch_for_sre2l(tmp_path, capsys):
    from cli_helpers import one_line, run_main

    code, err = run_main(["distill", "--method", "sre2l", "--arch", "LeNet", "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    one_line(err, "--arch: has no effect with --method sre2l")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
