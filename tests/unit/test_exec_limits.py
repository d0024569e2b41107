"""check_exec_size: the pre-boot check of what the guest kernel can exec (pure)."""

from __future__ import annotations

import pytest

from matchlock.errors import CommandTooLargeError, UsageError
from matchlock.sandbox import check_exec_size
from matchlock.sandbox._exec_limits import ARG_MAX, EXEC_RESERVE, MAX_ARG_STRLEN


def test_counts_strings_nuls_and_pointers():
    assert check_exec_size(["ab", "c"], {"K": "v"}) == (3 + 8) + (2 + 8) + (4 + 8)
    assert check_exec_size([], ["K=v", "X="]) == (4 + 8) + (3 + 8)
    assert check_exec_size(["☃"], {}) == 3 + 1 + 8  # UTF-8 bytes, not characters


def test_one_string_over_max_arg_strlen_names_the_argument():
    ok = "a" * (MAX_ARG_STRLEN - 1)
    check_exec_size(["sh", ok], {})
    with pytest.raises(CommandTooLargeError) as e:
        check_exec_size(["sh", "-c", ok + "a"], {})
    msg = str(e.value)
    assert msg.startswith("argument argv[2] of the command is 128.0 KiB (131072 bytes)")
    assert "131071" in msg and "file or on stdin" in msg
    assert isinstance(e.value, UsageError)  # the CLI's one-line error, exit 1


def test_one_variable_over_max_arg_strlen_names_the_variable_not_its_value():
    value = "s3cr3t" * 200_000
    with pytest.raises(CommandTooLargeError) as e:
        check_exec_size(["true"], {"PATH": "/bin", "API_BLOB": value})
    msg = str(e.value)
    assert msg.startswith("environment variable API_BLOB is 1.1 MiB")
    assert "s3cr3t" not in msg
    with pytest.raises(CommandTooLargeError, match="variable API_BLOB "):
        check_exec_size(["true"], [f"API_BLOB={value}"])  # the request's list form


def test_the_total_is_arg_max_less_the_reserve():
    budget = ARG_MAX - EXEC_RESERVE
    fixed = check_exec_size(["x"], {})
    filler = "f" * (budget - fixed - 30 * 9)
    # A string per 100 KB keeps each under MAX_ARG_STRLEN; the total is what fails.
    parts = [filler[i:i + 100_000] for i in range(0, len(filler), 100_000)]
    total = check_exec_size(["x", *parts], {})
    assert budget - 300 < total <= budget
    assert check_exec_size(["x", *parts], {"P": "p" * (budget - total - 11)}) == budget
    limit = r"take 2\.0 MiB .* at most 2088960 bytes \(ARG_MAX 2 MiB less 8 KiB"
    with pytest.raises(CommandTooLargeError, match=limit):
        check_exec_size(["x", *parts], {"PAD": "p" * (budget - total + 1)})


def test_many_empty_strings_count_their_pointers():
    n = (ARG_MAX - EXEC_RESERVE) // 9
    check_exec_size([""] * n, {})
    with pytest.raises(CommandTooLargeError, match="ARG_MAX"):
        check_exec_size([""] * (n + 1), {})


def test_nul_and_non_utf8_are_refused_up_front():
    with pytest.raises(CommandTooLargeError, match=r"argv\[1\] of the command contains a NUL"):
        check_exec_size(["echo", "a\0b"], {})
    with pytest.raises(CommandTooLargeError, match="variable K contains a NUL"):
        check_exec_size(["true"], {"K": "x\0"})
    with pytest.raises(CommandTooLargeError, match="variable B is not valid UTF-8"):
        check_exec_size(["true"], {"B": b"\xff".decode("utf-8", "surrogateescape")})
