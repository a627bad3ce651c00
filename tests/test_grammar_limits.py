"""Constraints that would be costly to compile (issue 13): the size bounds, worked out by hand
(that engines of both grammar backends refuse ``OVERSIZED`` fast is tested in test_constrained.py,
on its engines); a compile that overruns its time budget is really stopped (no process keeps
burning CPU) and does not hold up the next one; and the engine serves constrained requests
normally afterwards."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from sglang_core.constrained.limits import MAX_REGEX_SIZE, MAX_REPEAT, check_constraint
from sglang_core.engine import Engine


@pytest.mark.parametrize("accepted, refused", [
    (f"a{{{MAX_REGEX_SIZE}}}", f"a{{{MAX_REGEX_SIZE + 1}}}"),
    (f"(ab){{{MAX_REGEX_SIZE // 2}}}", f"(ab){{{MAX_REGEX_SIZE // 2 + 1}}}"),
    (f"(a{{1,50}}|b){{{MAX_REGEX_SIZE // 51}}}", f"(a{{1,50}}|b){{{MAX_REGEX_SIZE // 51 + 1}}}"),
    (f"x+y{{{MAX_REGEX_SIZE - 2}}}z*", f"x{{2,}}y{{{MAX_REGEX_SIZE - 2}}}z*"),  # a loop counts its minimum
])
def test_regex_size_is_the_expanded_length(accepted, refused):
    """The bound counts characters with bounded repeats expanded (worked out by hand here)."""
    check_constraint("regex", accepted)
    with pytest.raises(ValueError, match="^regex: spells out more than"):
        check_constraint("regex", refused)


@pytest.mark.parametrize("keyword", ["minLength", "maxLength", "minItems", "maxItems", "maxProperties"])
def test_schema_counts_are_bounded(keyword):
    check_constraint("json_schema", json.dumps({keyword: MAX_REPEAT}))
    with pytest.raises(ValueError, match=f"^json_schema: {keyword} {MAX_REPEAT + 1} is above"):
        check_constraint("json_schema", json.dumps({keyword: MAX_REPEAT + 1}))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _children() -> list[int]:
    me = str(os.getpid())
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                kids.append(int(stat.parent.name))
        except (OSError, IndexError):  # gone meanwhile
            pass
    return kids


def _cpu_of_us_and_children() -> float:
    total = _cpu_seconds(os.getpid())
    for pid in _children():
        try:
            total += _cpu_seconds(pid)
        except OSError:
            pass
    return total


def test_overrunning_compile_is_stopped_and_others_go_on():
    """A regex within the size bounds whose automaton blows up (``(a|b)*a(a|b){20}``: about a
    million states when made deterministic; minutes to compile on outlines-core) overruns its
    budget (3 s): its request fails by name while an unconstrained request sent with it is served,
    the next constrained request is compiled and served right after, and nothing keeps computing
    (the CPU time of this process and its children stops growing once the engine is idle)."""
    with Engine(device="cpu", grammar_backend="outlines", grammar_compile_timeout_s=3) as eng:
        eng.generate("warm up", sampling_params={"max_new_tokens": 2, "regex": "(on|off)"})  # vocabulary, worker
        start = time.monotonic()
        slow, beside = eng.generate(["x", "y"], sampling_params=[
            {"max_new_tokens": 8, "regex": "(a|b)*a(a|b){20}"}, {"max_new_tokens": 3}])
        reason = slow["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and reason["message"].startswith("regex: compiling took longer than 3 s")
        assert beside["meta_info"]["completion_tokens"] == 3
        fast = eng.generate("Answer yes or no:", sampling_params={"max_new_tokens": 8, "regex": "(yes|no)"})
        assert re.fullmatch("(yes|no)", fast["text"])
        assert time.monotonic() - start < 20
        time.sleep(0.5)  # the engine settles
        before = _cpu_of_us_and_children()
        time.sleep(2)
        assert _cpu_of_us_and_children() - before < 0.5  # a wedged compile would add ~2 s
        eng.check_memory()


def test_compile_memory_is_bounded():
    """Past its memory budget a compile process dies, and only that request fails; the next
    compile gets a fresh process."""
    with Engine(device="cpu", grammar_backend="outlines", grammar_compile_memory_mb=256) as eng:
        # 300 states that each allow most of the vocabulary: about 800 MB to build (a compile
        # process starts at about 30 MB)
        big = eng.generate("x", sampling_params={"max_new_tokens": 4, "regex": ".{0,300}"})
        reason = big["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and reason["message"].startswith("regex: cannot be compiled"), reason
        fast = eng.generate("Answer yes or no:", sampling_params={"max_new_tokens": 8, "regex": "(yes|no)"})
        assert re.fullmatch("(yes|no)", fast["text"])
        eng.check_memory()


def test_a_failed_compile_is_remembered():
    """A constraint that failed to compile (past its budget, say) is not compiled again: a client
    repeating a slow constraint cannot hold a compile worker for the whole budget each time."""
    from sglang_core.constrained.compiler import GrammarCompiler
    from sglang_core.constrained.grammar import GrammarBackend

    class Refusing(GrammarBackend):
        calls = 0

        def compile(self, kind, spec):
            Refusing.calls += 1
            raise ValueError(f"{kind}: compiling took longer than 1 s; stopped")

    compiler = GrammarCompiler(Refusing(None, 10, 0))
    try:
        for _ in range(3):
            with pytest.raises(ValueError, match="^regex: compiling took longer"):
                compiler.get("regex", "(a|b)*a(a|b){20}").result(timeout=5)
        assert Refusing.calls == 1
    finally:
        compiler.shutdown()
