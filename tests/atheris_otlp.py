"""Coverage-guided differential fuzzing of the OTLP decoders with atheris (not part of the test run).

Each input goes to the C kernel and to its pure-Python twin (metrics), and to the
logs decoder. Both twins must agree: the same RowBinary for every table, or both
refuse the input with ``ValueError``. Anything else (a crash, another exception, a
difference) stops the fuzzer with the input saved by libFuzzer.

atheris is not a dependency; install it beside the project and run, for example::

    pip install --target /tmp/atheris_site atheris
    PYTHONPATH=/tmp/atheris_site .venv/bin/python tests/atheris_otlp.py -max_total_time=60 -max_len=4096 \\
        -artifact_prefix=/tmp/

The hypothesis tests (``tests/test_fuzz_otlp.py``) are what CI runs.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from stethoscope.errors import DecodeError
    from stethoscope.exporters.otlp import decode_logs
    from stethoscope.native import implementation

NATIVE = implementation("native").encode_metrics
PYTHON = implementation("python").encode_metrics


def _run(encode, data: bytes):
    try:
        return encode(data)
    except ValueError as exc:  # the kernels' one refusal
        return ("refused", str(exc))


STRICTER: dict[str, int] = {}  # inputs one twin refuses and the other reads, by who and why


def _strict(who: str, message: str) -> None:
    head = f"{who}: {message.split(' at offset')[0][:160]}"
    if head not in STRICTER:
        print(f"stricter {head}", file=sys.stderr)
    STRICTER[head] = STRICTER.get(head, 0) + 1


def one_input(data: bytes) -> None:
    try:
        decode_logs(data)
    except DecodeError:
        pass
    native, python = _run(NATIVE, data), _run(PYTHON, data)
    native_refused, python_refused = isinstance(native, tuple), isinstance(python, tuple)
    if native_refused and python_refused:
        return
    if native_refused or python_refused:
        # Malformed wire data the twins judge differently: the C kernel refuses a known field
        # with the wrong wire type or field number 0 (pinned in tests/test_native_otlp_rowbinary.py)
        # where protobuf keeps it as an unknown field; protobuf validates submessages the C
        # kernel skips unread (e.g. Resource.entity_refs). Either way nothing wrong is stored:
        # counted and allowed. Reading the same bytes into different rows is the bug to find.
        _strict("native" if native_refused else "protobuf", (native if native_refused else python)[1])
        return
    if native != python:
        raise AssertionError(f"twins read {data[:64]!r}... differently: native={str(native)[:200]} python={str(python)[:200]}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
